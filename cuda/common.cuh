// Shared device helpers for lmkern's CUDA kernels: element conversions, aligned vector packs and
// deterministic warp/row reductions. Header-only; every function is __device__ __forceinline__.
//
// Conventions for every kernel in cuda/*.cu:
//   - extern "C" entry points named <op>_<dtype>[_variant], dtype in {f32, bf16, f16};
//   - arithmetic accumulates in float;
//   - launch configurations are chosen by the Rust launcher (rust/core/src/<family>/cuda.rs) and
//     depend on the shape only, so results are bitwise reproducible run to run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace lmkern {

// ---------------------------------------------------------------------------------------------
// Element conversions (float accumulation, round-to-nearest-even on store, as torch does).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// ---------------------------------------------------------------------------------------------
// Packs: VW consecutive elements moved with one load/store, kept in 32-bit words (a 2-byte pack in
// one 16-bit word) so that a 16-byte pack costs 4 registers. VW * sizeof(T) is 16 for the
// vectorized kernels (the launcher checks n % VW == 0 and 16-byte alignment) or sizeof(T) for the
// scalar ones. Element e of a pack is element e in memory (little-endian halves of each word).
// ---------------------------------------------------------------------------------------------
template <typename T, int VW> struct alignas(sizeof(T) * VW) Pack {
    static constexpr int BYTES = sizeof(T) * VW;
    static_assert(BYTES == 2 || BYTES % 4 == 0, "a pack is one 16-bit word or whole 32-bit words");
    static constexpr int NW = BYTES == 2 ? 1 : BYTES / 4;
    using Word = typename std::conditional<BYTES == 2, uint16_t, uint32_t>::type;
    Word w[NW];
};

template <typename T, int VW>
__device__ __forceinline__ Pack<T, VW> load_pack(const T* __restrict__ base, int64_t pack_index) {
    return reinterpret_cast<const Pack<T, VW>*>(base)[pack_index];
}

template <typename T, int VW>
__device__ __forceinline__ void store_pack(T* __restrict__ base, int64_t pack_index, const Pack<T, VW>& p) {
    reinterpret_cast<Pack<T, VW>*>(base)[pack_index] = p;
}

// Pack <-> VW floats.
template <int VW>
__device__ __forceinline__ void unpack(const Pack<float, VW>& p, float (&f)[VW]) {
#pragma unroll
    for (int e = 0; e < VW; ++e) f[e] = __uint_as_float(p.w[e]);
}
template <int VW>
__device__ __forceinline__ void unpack(const Pack<__nv_bfloat16, VW>& p, float (&f)[VW]) {
    if constexpr (VW == 1) {
        f[0] = __uint_as_float(static_cast<uint32_t>(p.w[0]) << 16);
    } else {
#pragma unroll
        for (int j = 0; j < VW / 2; ++j) {
            f[2 * j] = __uint_as_float(p.w[j] << 16);
            f[2 * j + 1] = __uint_as_float(p.w[j] & 0xffff0000u);
        }
    }
}
template <int VW>
__device__ __forceinline__ void unpack(const Pack<__half, VW>& p, float (&f)[VW]) {
    if constexpr (VW == 1) {
        f[0] = __half2float(__ushort_as_half(p.w[0]));
    } else {
#pragma unroll
        for (int j = 0; j < VW / 2; ++j) {
            __half2_raw raw;
            raw.x = static_cast<unsigned short>(p.w[j] & 0xffffu);
            raw.y = static_cast<unsigned short>(p.w[j] >> 16);
            const float2 v = __half22float2(__half2(raw));
            f[2 * j] = v.x;
            f[2 * j + 1] = v.y;
        }
    }
}

template <typename T, int VW>
__device__ __forceinline__ Pack<T, VW> pack_floats(const float (&f)[VW]) {
    Pack<T, VW> p;
    if constexpr (std::is_same<T, float>::value) {
#pragma unroll
        for (int e = 0; e < VW; ++e) p.w[e] = __float_as_uint(f[e]);
    } else if constexpr (VW == 1) {
        if constexpr (std::is_same<T, __nv_bfloat16>::value) {
            p.w[0] = __bfloat16_as_ushort(__float2bfloat16_rn(f[0]));
        } else {
            p.w[0] = __half_as_ushort(__float2half_rn(f[0]));
        }
    } else {
#pragma unroll
        for (int j = 0; j < VW / 2; ++j) {
            if constexpr (std::is_same<T, __nv_bfloat16>::value) {
                const __nv_bfloat162_raw b = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
                p.w[j] = static_cast<uint32_t>(b.x) | (static_cast<uint32_t>(b.y) << 16);
            } else {
                const __half2_raw b = __floats2half2_rn(f[2 * j], f[2 * j + 1]);
                p.w[j] = static_cast<uint32_t>(b.x) | (static_cast<uint32_t>(b.y) << 16);
            }
        }
    }
    return p;
}

// Make the compiler forget what it knows about a pack's contents (an empty asm that "modifies"
// each word). Used right after a block-wide reduction so that values derived from the pack before
// it (float conversions) are recomputed from the pack's few registers instead of being kept alive
// across the barrier: it keeps register use, and so occupancy, in check. No effect on values.
template <typename T, int VW>
__device__ __forceinline__ void launder(Pack<T, VW>& p) {
#ifndef LMKERN_EMU
#pragma unroll
    for (int j = 0; j < Pack<T, VW>::NW; ++j) {
        if constexpr (Pack<T, VW>::BYTES == 2) {
            asm volatile("" : "+h"(p.w[j]));
        } else {
            asm volatile("" : "+r"(p.w[j]));
        }
    }
#else
    (void)p;
#endif
}

#ifndef LMKERN_EMU
// The block's dynamic shared memory (its size is set at launch), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
    extern __shared__ __align__(16) unsigned char lmkern_dynamic_smem[];
    return reinterpret_cast<T*>(lmkern_dynamic_smem);
}

// d += a·b on the tensor cores (sm_80+): mma.sync m16n8k16, bf16 or f16 inputs (T), float
// accumulation; a, b and d are this lane's fragments as the PTX ISA lays them out (cuda/emu/emu.h,
// mma_16816_warp, spells the layout out). Every lane of the warp takes part.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        static_assert(std::is_same<T, __half>::value, "mma_16816 takes bf16 or f16");
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// An asynchronous global → shared copy of 4, 8 or 16 bytes (cp.async, sm_80+; 16 bytes bypass L1),
// both addresses aligned to its size. It lands only once the issuing thread has waited for it
// (cp_async_wait_all), and other threads see it only after a barrier that follows that wait;
// cuda/emu/emu.h models exactly this (the destination is garbage from the issue, the bytes move at
// the wait). Unlike a load into a register, it occupies no register scoreboard: waiting for it
// does not wait for the thread's other loads in flight.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    if constexpr (BYTES == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src), "n"(BYTES) : "memory");
    }
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Programmatic dependent launch (sm_90+; no-ops on older GPUs, and when the launch did not ask for
// it): griddep_wait returns once the kernels this one depends on have completed and their memory
// is visible; griddep_launch_dependents lets the next kernel in the stream, if launched with PDL,
// start its blocks before this one completes. prefetch_l2 brings the line holding `p` into L2:
// safe even on memory a still-running kernel writes, since L2 is where every write lands.
__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }
// The `bytes` bytes from `p` into L2 in one request (a bulk prefetch, sm_90+; a no-op before, where
// nothing launches with PDL). p 16-byte aligned, bytes a multiple of 16.
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#else
    (void)p, (void)bytes;
#endif
}

// Bulk copies global → shared that complete on an mbarrier (sm_90+: the tensor memory accelerator;
// on older GPUs they trap, and the launcher never picks a kernel that uses them there). A barrier
// is set up once by one thread (mbar_init, then a __syncthreads before anyone uses it); each phase
// completes when its `count` arrivals (mbar_arrive_expect_tx, which also announces the bytes the
// phase's copies will bring) have happened and those bytes have landed. bulk_copy_to_shared:
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from src to dst, counted against the
// barrier's current phase; issued by any thread, in any order with the arrival. mbar_wait(bar, P)
// returns once the phase of parity P has completed: the copied bytes are then visible to the
// waiting thread. cuda/emu/emu.h models the same contract (garbage in dst until the phase
// completes; a phase whose bytes never match hangs, as on the GPU, and fails the run).
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"((uint32_t)__cvta_generic_to_shared(bar)), "r"(count) : "memory");
#else
    (void)bar, (void)count;
    __trap();
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"((uint32_t)__cvta_generic_to_shared(bar)),
                 "r"(bytes)
                 : "memory");
#else
    (void)bar, (void)bytes;
    __trap();
#endif
}
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(src), "r"(bytes), "r"((uint32_t)__cvta_generic_to_shared(bar))
                 : "memory");
#else
    (void)dst, (void)src, (void)bytes, (void)bar;
    __trap();
#endif
}
// Orders this thread's earlier shared-memory accesses (and, after a barrier, the block's) before
// its later bulk copies, which go through the async proxy: after mbar_init (so the copies see the
// barrier set up) and before copying over shared memory the block wrote with plain stores.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t done;
    do {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"((uint32_t)__cvta_generic_to_shared(bar)), "r"(parity)
            : "memory");
    } while (!done);
#else
    (void)bar, (void)parity;
    __trap();
#endif
}
#endif

// ---------------------------------------------------------------------------------------------
// Reductions.
// ---------------------------------------------------------------------------------------------
constexpr unsigned FULL_MASK = 0xffffffffu;

// v, for a v already the same on every lane of the warp (a warp index), taken from lane 0 so that
// the compiler knows it is: branches on it are warp-uniform, and shared-memory bases in the code
// they guard can stay in uniform registers (LDS [R + UR] rather than an add per load). The emulator
// runs the warp's lanes one by one and needs no hint.
__device__ __forceinline__ int warp_uniform(int v) {
#ifndef LMKERN_EMU
    return __shfl_sync(FULL_MASK, v, 0);
#else
    return v;
#endif
}

// Butterfly sum over the 32 lanes of a warp. Every lane ends with the bitwise same value: at each
// step lane i computes v_i + v_(i^o) and lane i^o computes v_(i^o) + v_i, equal by commutativity.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Sum K values over the threads of one row of a 2-D block: the row is threadIdx.y, and its
// blockDim.x threads (a multiple of 32, so no warp straddles two rows) hold one partial each.
// `smem` holds K * 32 floats; blockDim.x * blockDim.y <= 1024, so at most 32 warps in all.
// Every thread of the block must call this (it may __syncthreads). On return every thread of the
// row holds the row's sums, bitwise equal across the row. The order of summation depends on the
// block shape only.
template <int K>
__device__ __forceinline__ void row_sum(float (&v)[K], float* smem) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
    const int warps_per_row = blockDim.x >> 5;  // uniform across the block
    if (warps_per_row == 1) return;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int slot0 = threadIdx.y * warps_per_row;
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < K; ++k) smem[k * 32 + slot0 + warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const float t = lane < warps_per_row ? smem[k * 32 + slot0 + lane] : 0.0f;
        v[k] = warp_sum(t);
    }
    __syncthreads();  // smem may be reused by the next call
}

}  // namespace lmkern
