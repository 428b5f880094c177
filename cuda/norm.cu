// Fused RMSNorm / CRMSNorm forward and backward (Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm
// Transformers"). The math, the buffers and the weight-gradient partition are documented in
// rust/core/src/norm/mod.rs; the launcher that picks a kernel and its shape is
// rust/core/src/norm/cuda.rs.
//
// Entry points, for <t> in {f32, bf16, f16} (60 kernels):
//   norm_fwd_<t>[_v16][_r1|_r2|_r4]   forward: y, h (with residual), rstd
//   norm_fwd_<t>_s16_r1|_r2|_r4
//   norm_bwd_<t>[_v16][_r1|_r2]       backward: dx, and per-part float32 weight-gradient partials
//   norm_bwd_<t>_s16_r1|_r2
//   norm_dw_reduce_<t>                dw = scale · Σ_parts partial (block 32×32, one column per x)
// _v16 kernels move 16-byte packs (VW = 16/sizeof(T) elements; the launcher checks n % VW == 0
// and 16-byte alignment of every row-sized buffer), _s16 kernels 16-byte packs between a head
// and a tail of single elements (any n; see RowSplit), the others one element (VW = 1).
// _r<VPT> kernels keep the row in registers: blockDim.x threads per row (a multiple of 32), each
// holding VPT packs (n/VW <= VPT · blockDim.x), blockDim.y rows per block (blockDim.x·blockDim.y
// <= 1024; the _s16 backward takes one row per block, blockDim.y == 1). Kernels without _r take a
// row of any length, one row per block (blockDim.y == 1), and read it twice (the second time
// mostly from L1/L2).
// Forward grids stride over row groups; backward grids stride over the `parts` row ranges of
// norm/mod.rs (dw_parts), one range per block at a time, so that the partial sums of the weight
// gradient are deterministic.
//
// All rows are contiguous, row-major [rows, n]; row offsets are 64-bit. cuda/emu runs these
// kernels unchanged on a CPU emulator against a float64 reference (cuda/check.sh).
#include "common.cuh"

namespace lmkern {
namespace norm {

// Kernel parameter blocks, passed by value. Mirrored field for field by #[repr(C)] structs in
// rust/core/src/norm/cuda.rs; the sizes are asserted on both sides.
struct FwdParams {
    const void* x;         // [rows, n] T
    const void* residual;  // [rows, n] T or null
    const void* weight;    // [n] T or null (then the factor (offset + w) is 1)
    void* y;               // [rows, n] T
    void* h;               // [rows, n] T, written iff residual is given
    float* rstd;           // [rows] float or null (not stored)
    int64_t rows;
    int32_t n;
    int32_t crms;          // 0: RMSNorm, 1: CRMSNorm
    float eps;
    float inv_div;         // 1/n (RMSNorm) or 1/(n+1) (CRMSNorm)
    float offset;
    float scale;
};
static_assert(sizeof(FwdParams) == 80, "FwdParams layout must match the Rust mirror");

struct BwdParams {
    const void* dy;        // [rows, n] T
    const void* h;         // [rows, n] T (the normalized input)
    const void* weight;    // [n] T or null
    const float* rstd;     // [rows] float
    const void* dh_out;    // [rows, n] T or null
    void* dx;              // [rows, n] T
    float* dw_partial;     // [parts, n] float or null (then no weight gradient)
    int64_t rows;
    int64_t parts;         // part p covers rows [p*rows/parts, (p+1)*rows/parts)
    int32_t n;
    int32_t crms;
    float inv_div;
    float offset;
    float scale;
    int32_t pad_;
};
static_assert(sizeof(BwdParams) == 96, "BwdParams layout must match the Rust mirror");

struct ReduceParams {
    const float* partial;  // [parts, n] float
    void* dw;              // [n] T
    int64_t parts;
    int32_t n;
    float scale;
};
static_assert(sizeof(ReduceParams) == 32, "ReduceParams layout must match the Rust mirror");

// The reduction of forward row sums: (Σh²) or (Σh², Σh); returns r.
__device__ __forceinline__ float fwd_rstd(float ss, float s, const FwdParams& p, float* red) {
    if (p.crms) {
        float v[2] = {ss, s};
        row_sum<2>(v, red);
        return 1.0f / sqrtf((v[0] + v[1] * v[1]) * p.inv_div + p.eps);
    }
    float v[1] = {ss};
    row_sum<1>(v, red);
    return 1.0f / sqrtf(v[0] * p.inv_div + p.eps);
}

// ---------------------------------------------------------------------------------------------
// The forward also runs in place (rms_norm_: y over x, h over residual), so x, residual, y and h
// carry no __restrict__, and x and residual are read through load_inout, whose pointer is not
// __restrict__ either (load_pack's is, which lets nvcc pick the read-only ld.global.nc: not for
// memory the kernel writes). In place is correct because each element is read before it is
// written and only by the thread that writes it, the written value depending on the read one,
// except h in the looped kernel's second pass: read back by the thread that stored it.
// ---------------------------------------------------------------------------------------------
template <typename T, int VW>
__device__ __forceinline__ Pack<T, VW> load_inout(const T* base, int64_t pack_index) {
    return reinterpret_cast<const Pack<T, VW>*>(base)[pack_index];
}

// The forward's partial row sums over a thread's packs (zeros outside the row): ss += Σh², s += Σh.
template <typename T, int VW, int VPT>
__device__ __forceinline__ void add_row_sums(const Pack<T, VW> (&hv)[VPT], float& ss, float& s) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        float f[VW];
        unpack(hv[k], f);
#pragma unroll
        for (int e = 0; e < VW; ++e) {
            ss = fmaf(f[e], f[e], ss);
            s += f[e];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward, row in registers.
// ---------------------------------------------------------------------------------------------
template <typename T, int VW, int VPT>
__device__ __forceinline__ void fwd_reg(const FwdParams& p) {
    using P = Pack<T, VW>;
    const T* x = static_cast<const T*>(p.x);
    const T* res = static_cast<const T*>(p.residual);
    const T* __restrict__ w = static_cast<const T*>(p.weight);
    T* y = static_cast<T*>(p.y);
    T* hout = static_cast<T*>(p.h);
    __shared__ float red[2 * 32];

    const int nv = p.n / VW;
    const int tx = threadIdx.x;
    const int64_t step = (int64_t)gridDim.x * blockDim.y;
    for (int64_t base = (int64_t)blockIdx.x * blockDim.y; base < p.rows; base += step) {
        const int64_t row = base + threadIdx.y;
        const bool active = row < p.rows;
        const int64_t row_pack = row * nv;

        P hv[VPT] = {};
        if (res != nullptr) {
            P rv[VPT] = {};
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                const int i = tx + k * blockDim.x;
                if (active && i < nv) {
                    hv[k] = load_inout<T, VW>(x, row_pack + i);
                    rv[k] = load_inout<T, VW>(res, row_pack + i);
                }
            }
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                const int i = tx + k * blockDim.x;
                if (active && i < nv) {
                    float a[VW], b[VW];
                    unpack(hv[k], a);
                    unpack(rv[k], b);
#pragma unroll
                    for (int e = 0; e < VW; ++e) a[e] += b[e];
                    hv[k] = pack_floats<T, VW>(a);  // h is rounded to T, then used
                    store_pack<T, VW>(hout, row_pack + i, hv[k]);
                }
            }
        } else {
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                const int i = tx + k * blockDim.x;
                if (active && i < nv) hv[k] = load_inout<T, VW>(x, row_pack + i);
            }
        }

        float ss = 0.0f, s = 0.0f;
        add_row_sums<T, VW, VPT>(hv, ss, s);

        const float r = fwd_rstd(ss, s, p, red);  // every thread of the block calls this
        if (active && tx == 0 && p.rstd != nullptr) p.rstd[row] = r;
        const float rs = r * p.scale;

#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            launder(hv[k]);
            const int i = tx + k * blockDim.x;
            if (active && i < nv) {
                float f[VW];
                unpack(hv[k], f);
                if (w != nullptr) {
                    float wf[VW];
                    unpack(load_pack<T, VW>(w, i), wf);  // small and shared by all rows: an L1 hit
#pragma unroll
                    for (int e = 0; e < VW; ++e) f[e] = f[e] * rs * (p.offset + wf[e]);
                } else {
#pragma unroll
                    for (int e = 0; e < VW; ++e) f[e] = f[e] * rs;
                }
                store_pack<T, VW>(y, row_pack + i, pack_floats<T, VW>(f));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward, any row length: one row per block (blockDim.y == 1), two passes over the row. With a
// residual, the second pass reads h back from where the first wrote it: one tensor instead of
// two, and right in place too, where residual has become h by then.
// ---------------------------------------------------------------------------------------------
template <typename T, int VW>
__device__ __forceinline__ void fwd_loop(const FwdParams& p) {
    const T* x = static_cast<const T*>(p.x);
    const T* res = static_cast<const T*>(p.residual);
    const T* __restrict__ w = static_cast<const T*>(p.weight);
    T* y = static_cast<T*>(p.y);
    T* hout = static_cast<T*>(p.h);
    __shared__ float red[2 * 32];

    const int64_t nv = p.n / VW;
    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const int64_t row_pack = row * nv;
        float ss = 0.0f, s = 0.0f;
        for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
            float f[VW];
            unpack(load_inout<T, VW>(x, row_pack + i), f);
            if (res != nullptr) {
                float b[VW];
                unpack(load_inout<T, VW>(res, row_pack + i), b);
#pragma unroll
                for (int e = 0; e < VW; ++e) f[e] += b[e];
                const auto hv = pack_floats<T, VW>(f);  // h is rounded to T, then used
                store_pack<T, VW>(hout, row_pack + i, hv);
                unpack(hv, f);
            }
#pragma unroll
            for (int e = 0; e < VW; ++e) {
                ss = fmaf(f[e], f[e], ss);
                s += f[e];
            }
        }

        const float r = fwd_rstd(ss, s, p, red);
        if (threadIdx.x == 0 && p.rstd != nullptr) p.rstd[row] = r;
        const float rs = r * p.scale;

        for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
            float f[VW];
            // This thread stored these h elements in the first pass (same i): its own writes.
            unpack(load_inout<T, VW>(res != nullptr ? static_cast<const T*>(hout) : x, row_pack + i), f);
            if (w != nullptr) {
                float wf[VW];
                unpack(load_pack<T, VW>(w, i), wf);
#pragma unroll
                for (int e = 0; e < VW; ++e) f[e] = f[e] * rs * (p.offset + wf[e]);
            } else {
#pragma unroll
                for (int e = 0; e < VW; ++e) f[e] = f[e] * rs;
            }
            store_pack<T, VW>(y, row_pack + i, pack_floats<T, VW>(f));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rows cut at 16-byte boundaries (_s16 kernels): for rows that 16-byte packs from the row's start
// do not fit (n not a multiple of VW, as CRMSNorm's odd d − 1, or a base not 16-byte aligned).
// A row is `head` elements up to the first 16-byte boundary of its address, `packs` whole packs,
// then `tail` elements. The launcher checks that the row buffers' addresses agree mod 16 (and are
// multiples of sizeof(T)), so one cut fits them all, and that the packs fit in registers
// (packs <= n/VW <= VPT · blockDim.x). The head and tail elements (at most 2·(VW − 1) < 32) are
// one each for the first threads of the row; the weight is read element by element (its
// alignment differs from row to row): its columns repeat every row, so they hit L1.
// ---------------------------------------------------------------------------------------------
template <typename T, int VW>
struct RowSplit {
    int head = 0, packs = 0, tail = 0;

    // The cut of the row starting at element `offset` of `base`.
    __device__ __forceinline__ static RowSplit of(const void* base, int64_t offset, int n) {
        RowSplit s;
        const uint64_t addr = reinterpret_cast<uint64_t>(base) + (uint64_t)offset * sizeof(T);
        const int mis = (int)(addr % 16) / (int)sizeof(T);  // elements past the last boundary
        const int head = (VW - mis) % VW;
        s.head = head < n ? head : n;
        s.packs = (n - s.head) / VW;
        s.tail = n - s.head - s.packs * VW;
        return s;
    }
    __device__ __forceinline__ int edges() const { return head + tail; }
    // Column of edge element k < edges(): the head first, then the tail.
    __device__ __forceinline__ int edge_col(int k) const { return k < head ? k : head + packs * VW + (k - head); }
};

// The factor (offset + w) of VW columns starting at column c, element by element (1 without weight).
template <typename T, int VW>
__device__ __forceinline__ void weight_factor_at(const T* __restrict__ w, int c, float offset, float (&wf)[VW]) {
#pragma unroll
    for (int e = 0; e < VW; ++e) wf[e] = w != nullptr ? offset + to_float(w[c + e]) : 1.0f;
}

template <typename T>
__device__ __forceinline__ float weight_factor_one(const T* __restrict__ w, int c, float offset) {
    return w != nullptr ? offset + to_float(w[c]) : 1.0f;
}

// Forward of cut rows, row in registers: as fwd_reg, plus one edge element per thread.
template <typename T, int VW, int VPT>
__device__ __forceinline__ void fwd_split(const FwdParams& p) {
    using P = Pack<T, VW>;
    const T* x = static_cast<const T*>(p.x);
    const T* res = static_cast<const T*>(p.residual);
    const T* __restrict__ w = static_cast<const T*>(p.weight);
    T* y = static_cast<T*>(p.y);
    T* hout = static_cast<T*>(p.h);
    __shared__ float red[2 * 32];

    const int tx = threadIdx.x;
    const int64_t step = (int64_t)gridDim.x * blockDim.y;
    for (int64_t base = (int64_t)blockIdx.x * blockDim.y; base < p.rows; base += step) {
        const int64_t row = base + threadIdx.y;
        const bool active = row < p.rows;
        const int64_t off = active ? row * p.n : 0;
        const RowSplit<T, VW> sp = active ? RowSplit<T, VW>::of(p.x, off, p.n) : RowSplit<T, VW>{};
        const int64_t body = off + sp.head;  // first element of the packs: 16-byte aligned
        const bool edge = tx < sp.edges();
        const int ecol = edge ? sp.edge_col(tx) : 0;

        P hv[VPT] = {};
        float he = 0.0f;  // this thread's edge element of h (0 if none)
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const int i = tx + k * blockDim.x;
            if (i < sp.packs) hv[k] = load_inout<T, VW>(x + body, i);
        }
        if (edge) he = to_float(x[off + ecol]);
        if (res != nullptr) {
            P rv[VPT] = {};
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                const int i = tx + k * blockDim.x;
                if (i < sp.packs) rv[k] = load_inout<T, VW>(res + body, i);
            }
            const float re = edge ? to_float(res[off + ecol]) : 0.0f;
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                const int i = tx + k * blockDim.x;
                if (i < sp.packs) {
                    float a[VW], b[VW];
                    unpack(hv[k], a);
                    unpack(rv[k], b);
#pragma unroll
                    for (int e = 0; e < VW; ++e) a[e] += b[e];
                    hv[k] = pack_floats<T, VW>(a);  // h is rounded to T, then used
                    store_pack<T, VW>(hout + body, i, hv[k]);
                }
            }
            if (edge) {
                const T hr = from_float<T>(he + re);
                hout[off + ecol] = hr;
                he = to_float(hr);
            }
        }

        float ss = he * he, s = he;
        add_row_sums<T, VW, VPT>(hv, ss, s);

        const float r = fwd_rstd(ss, s, p, red);  // every thread of the block calls this
        if (active && tx == 0 && p.rstd != nullptr) p.rstd[row] = r;
        const float rs = r * p.scale;

#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            launder(hv[k]);
            const int i = tx + k * blockDim.x;
            if (i < sp.packs) {
                float f[VW], wf[VW];
                unpack(hv[k], f);
                weight_factor_at<T, VW>(w, sp.head + i * VW, p.offset, wf);
#pragma unroll
                for (int e = 0; e < VW; ++e) f[e] = f[e] * rs * wf[e];
                store_pack<T, VW>(y + body, i, pack_floats<T, VW>(f));
            }
        }
        if (edge) y[off + ecol] = from_float<T>(he * rs * weight_factor_one(w, ecol, p.offset));
    }
}

// ---------------------------------------------------------------------------------------------
// Backward helpers.
// ---------------------------------------------------------------------------------------------
// Row sums of the backward: c' = Σ dy·(offset+w)·h (c = scale·c'), and Σh for CRMSNorm. Returns
// the coefficients of dx = a·dy·(offset+w) − b·(h + shift):
//   a = r·scale,  b = r³·inv_div·c,  shift = Σh (CRMSNorm) or 0. (b is formed as ((r·c)·inv_div·r)·r,
// in range for rows of RMS within ~1e±19 as the forward's sums.)
struct BwdCoef {
    float a, b, shift;
};

__device__ __forceinline__ BwdCoef bwd_coef(float cp, float s, float r, const BwdParams& p, float* red) {
    BwdCoef q;
    q.a = r * p.scale;
    if (p.crms) {
        float v[2] = {cp, s};
        row_sum<2>(v, red);
        q.b = r * (v[0] * p.scale) * p.inv_div * r * r;  // r·c first: r³ alone underflows at RMS ~1e13
        q.shift = v[1];
    } else {
        float v[1] = {cp};
        row_sum<1>(v, red);
        q.b = r * (v[0] * p.scale) * p.inv_div * r * r;  // r·c first: r³ alone underflows at RMS ~1e13
        q.shift = 0.0f;
    }
    return q;
}

// Part `part` of `parts` covers rows [part*rows/parts, (part+1)*rows/parts) (floor division),
// exactly as the CPU kernels partition them.
__device__ __forceinline__ void part_range(int64_t part, const BwdParams& p, int64_t& r0, int64_t& r1) {
    r0 = part * p.rows / p.parts;
    r1 = (part + 1) * p.rows / p.parts;
}

// The factor (offset + w) of VW columns starting at pack i (1 without weight).
template <typename T, int VW>
__device__ __forceinline__ void weight_factor(const T* __restrict__ w, int64_t i, float offset, float (&wf)[VW]) {
    if (w != nullptr) {
        unpack(load_pack<T, VW>(w, i), wf);
#pragma unroll
        for (int e = 0; e < VW; ++e) wf[e] += offset;
    } else {
#pragma unroll
        for (int e = 0; e < VW; ++e) wf[e] = 1.0f;
    }
}

// Store VW floats at dst[0..VW) (dst 16-byte aligned when VW >= 4), in packs of at most 16 bytes.
template <int VW>
__device__ __forceinline__ void store_floats(float* dst, const float (&v)[VW]) {
    constexpr int FW = VW >= 4 ? 4 : 1;
#pragma unroll
    for (int q = 0; q < VW; q += FW) {
        float t[FW];
#pragma unroll
        for (int e = 0; e < FW; ++e) t[e] = v[q + e];
        *reinterpret_cast<Pack<float, FW>*>(dst + q) = pack_floats<float, FW>(t);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, row in registers. One block per part (grid-stride over parts); the block walks its
// part blockDim.y rows at a time. Each thread owns the same columns in every row, so it
// accumulates its columns' weight-gradient partial in registers; the blockDim.y row slots are
// then combined in slot order through dynamic shared memory
// ((blockDim.y − 1) · blockDim.x · VPT · VW floats; none needed when blockDim.y == 1).
// ---------------------------------------------------------------------------------------------
template <typename T, int VW, int VPT>
__device__ __forceinline__ void bwd_reg(const BwdParams& p) {
    using P = Pack<T, VW>;
    const T* __restrict__ dy = static_cast<const T*>(p.dy);
    const T* __restrict__ hin = static_cast<const T*>(p.h);
    const T* __restrict__ w = static_cast<const T*>(p.weight);
    const float* __restrict__ rstd = p.rstd;
    const T* __restrict__ dh_out = static_cast<const T*>(p.dh_out);
    T* __restrict__ dx = static_cast<T*>(p.dx);
    float* __restrict__ dw_partial = p.dw_partial;
    __shared__ float red[2 * 32];
    float* slots = dynamic_smem<float>();

    const int nv = p.n / VW;
    const int tx = threadIdx.x;

    for (int64_t part = blockIdx.x; part < p.parts; part += gridDim.x) {
        int64_t r0, r1;
        part_range(part, p, r0, r1);
        float acc[VPT][VW];
#pragma unroll
        for (int k = 0; k < VPT; ++k)
#pragma unroll
            for (int e = 0; e < VW; ++e) acc[k][e] = 0.0f;

        // Loads of one row's packs (zeros outside the part or the row). With VPT == 1 the loop is
        // software-pipelined: the next row's loads are issued before this row's reduction, so
        // they are in flight while it waits; with VPT == 2 there are no registers for that, and
        // dh_out is only loaded after the reduction.
        constexpr bool pipelined = VPT == 1;
        auto load_row = [&](int64_t row, P (&d)[VPT], P (&hh)[VPT], P (&g)[VPT], float& rr) {
            const bool ok = row < r1;
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                const int i = tx + k * blockDim.x;
                if (ok && i < nv) {
                    d[k] = load_pack<T, VW>(dy, row * nv + i);
                    hh[k] = load_pack<T, VW>(hin, row * nv + i);
                    g[k] = pipelined && dh_out != nullptr ? load_pack<T, VW>(dh_out, row * nv + i) : P{};
                } else {
                    d[k] = P{};
                    hh[k] = P{};
                    g[k] = P{};
                }
            }
            rr = ok ? rstd[row] : 0.0f;
        };

        P dyv[VPT], hv[VPT], gv[VPT];
        float r = 0.0f;
        if constexpr (pipelined) load_row(r0 + threadIdx.y, dyv, hv, gv, r);
        for (int64_t base = r0; base < r1; base += blockDim.y) {
            const int64_t row = base + threadIdx.y;
            const bool active = row < r1;
            const int64_t row_pack = row * nv;

            P dyn[VPT], hn[VPT], gn[VPT];
            float rn = 0.0f;
            if constexpr (pipelined) {
                load_row(row + blockDim.y, dyn, hn, gn, rn);
            } else {
                load_row(row, dyv, hv, gv, r);
            }

            // Before the reduction: c' and Σh, and the weight-gradient partial dy·h·r.
            float cp = 0.0f, s = 0.0f;
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                const int i = tx + k * blockDim.x;
                float dyf[VW], hf[VW], wf[VW];
                unpack(dyv[k], dyf);
                unpack(hv[k], hf);
                weight_factor<T, VW>(w, i < nv ? i : 0, p.offset, wf);
#pragma unroll
                for (int e = 0; e < VW; ++e) {
                    cp = fmaf(dyf[e] * wf[e], hf[e], cp);
                    s += hf[e];
                    acc[k][e] = fmaf(dyf[e] * hf[e], r, acc[k][e]);
                }
            }

            const BwdCoef q = bwd_coef(cp, s, r, p, red);  // every thread of the block calls this

#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                launder(dyv[k]);
                launder(hv[k]);
                const int i = tx + k * blockDim.x;
                if (active && i < nv) {
                    float dyf[VW], hf[VW], wf[VW], d[VW];
                    unpack(dyv[k], dyf);
                    unpack(hv[k], hf);
                    weight_factor<T, VW>(w, i, p.offset, wf);
#pragma unroll
                    for (int e = 0; e < VW; ++e) d[e] = q.a * dyf[e] * wf[e] - q.b * (hf[e] + q.shift);
                    if (dh_out != nullptr) {
                        float g[VW];
                        unpack(pipelined ? gv[k] : load_pack<T, VW>(dh_out, row_pack + i), g);
#pragma unroll
                        for (int e = 0; e < VW; ++e) d[e] += g[e];
                    }
                    store_pack<T, VW>(dx, row_pack + i, pack_floats<T, VW>(d));
                }
            }

            if constexpr (pipelined) {
#pragma unroll
                for (int k = 0; k < VPT; ++k) {
                    dyv[k] = dyn[k];
                    hv[k] = hn[k];
                    gv[k] = gn[k];
                }
                r = rn;
            }
        }

        if (dw_partial != nullptr) {
            if (blockDim.y > 1) {
                // Slot ty > 0 parks its sums; slot 0 adds them in slot order.
                constexpr int PER = VPT * VW;
                const int stride = blockDim.x;
                if (threadIdx.y > 0) {
                    float* mine = slots + (int64_t)(threadIdx.y - 1) * PER * stride;
#pragma unroll
                    for (int k = 0; k < VPT; ++k)
#pragma unroll
                        for (int e = 0; e < VW; ++e) mine[(k * VW + e) * stride + tx] = acc[k][e];
                }
                __syncthreads();
                if (threadIdx.y == 0) {
#pragma unroll 1
                    for (int t = 1; t < (int)blockDim.y; ++t) {
                        const float* theirs = slots + (int64_t)(t - 1) * PER * stride;
#pragma unroll
                        for (int k = 0; k < VPT; ++k)
#pragma unroll
                            for (int e = 0; e < VW; ++e) acc[k][e] += theirs[(k * VW + e) * stride + tx];
                    }
                }
                __syncthreads();  // slots are reused by the next part
            }
            if (threadIdx.y == 0) {
                float* prow = dw_partial + part * p.n;
#pragma unroll
                for (int k = 0; k < VPT; ++k) {
                    const int i = tx + k * blockDim.x;
                    if (i < nv) store_floats<VW>(prow + (int64_t)i * VW, acc[k]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, any row length: one block per part (blockDim.y == 1), rows one at a time, two passes
// per row. The weight-gradient partial is accumulated in place in dw_partial: each thread owns
// the same columns in every row, so its read-modify-writes are ordered by program order.
// ---------------------------------------------------------------------------------------------
template <typename T, int VW>
__device__ __forceinline__ void bwd_loop(const BwdParams& p) {
    const T* __restrict__ dy = static_cast<const T*>(p.dy);
    const T* __restrict__ hin = static_cast<const T*>(p.h);
    const T* __restrict__ w = static_cast<const T*>(p.weight);
    const float* __restrict__ rstd = p.rstd;
    const T* __restrict__ dh_out = static_cast<const T*>(p.dh_out);
    T* __restrict__ dx = static_cast<T*>(p.dx);
    __shared__ float red[2 * 32];

    const int64_t nv = p.n / VW;
    for (int64_t part = blockIdx.x; part < p.parts; part += gridDim.x) {
        int64_t r0, r1;
        part_range(part, p, r0, r1);
        float* prow = p.dw_partial != nullptr ? p.dw_partial + part * p.n : nullptr;
        if (prow != nullptr) {
            for (int64_t i = threadIdx.x; i < nv; i += blockDim.x)
#pragma unroll
                for (int e = 0; e < VW; ++e) prow[i * VW + e] = 0.0f;
        }

        for (int64_t row = r0; row < r1; ++row) {
            const int64_t row_pack = row * nv;
            const float r = rstd[row];
            float cp = 0.0f, s = 0.0f;
            for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
                float dyf[VW], hf[VW], wf[VW];
                unpack(load_pack<T, VW>(dy, row_pack + i), dyf);
                unpack(load_pack<T, VW>(hin, row_pack + i), hf);
                weight_factor<T, VW>(w, i, p.offset, wf);
#pragma unroll
                for (int e = 0; e < VW; ++e) {
                    cp = fmaf(dyf[e] * wf[e], hf[e], cp);
                    s += hf[e];
                }
            }
            const BwdCoef q = bwd_coef(cp, s, r, p, red);

            for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
                float dyf[VW], hf[VW], wf[VW], d[VW];
                unpack(load_pack<T, VW>(dy, row_pack + i), dyf);
                unpack(load_pack<T, VW>(hin, row_pack + i), hf);
                weight_factor<T, VW>(w, i, p.offset, wf);
#pragma unroll
                for (int e = 0; e < VW; ++e) d[e] = q.a * dyf[e] * wf[e] - q.b * (hf[e] + q.shift);
                if (dh_out != nullptr) {
                    float g[VW];
                    unpack(load_pack<T, VW>(dh_out, row_pack + i), g);
#pragma unroll
                    for (int e = 0; e < VW; ++e) d[e] += g[e];
                }
                store_pack<T, VW>(dx, row_pack + i, pack_floats<T, VW>(d));
                if (prow != nullptr) {
#pragma unroll
                    for (int e = 0; e < VW; ++e) prow[i * VW + e] = fmaf(dyf[e] * hf[e], r, prow[i * VW + e]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward of cut rows (see RowSplit), row in registers, one row at a time (blockDim.y == 1). A
// thread's columns change with the row's cut, so the part's weight-gradient partial is summed in
// dynamic shared memory, column j at j + j/32 (n + n/32 floats: the padding spreads a warp's
// stride-VW columns over all 32 banks). Within a row every column has one owner; a barrier after
// each row's reduction orders one row's additions before the next row's, so each column is summed
// in row order.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ int padded_col(int j) { return j + (j >> 5); }

template <typename T, int VW, int VPT>
__device__ __forceinline__ void bwd_split(const BwdParams& p) {
    using P = Pack<T, VW>;
    const T* __restrict__ dy = static_cast<const T*>(p.dy);
    const T* __restrict__ hin = static_cast<const T*>(p.h);
    const T* __restrict__ w = static_cast<const T*>(p.weight);
    const T* __restrict__ dh_out = static_cast<const T*>(p.dh_out);
    T* __restrict__ dx = static_cast<T*>(p.dx);
    __shared__ float red[2 * 32];
    float* dws = p.dw_partial != nullptr ? dynamic_smem<float>() : nullptr;

    const int tx = threadIdx.x;
    for (int64_t part = blockIdx.x; part < p.parts; part += gridDim.x) {
        int64_t r0, r1;
        part_range(part, p, r0, r1);
        if (dws != nullptr) {
            for (int j = tx; j < p.n; j += blockDim.x) dws[padded_col(j)] = 0.0f;
            // The barrier after the first row's reduction orders these before any addition.
        }

        for (int64_t row = r0; row < r1; ++row) {
            const int64_t off = row * p.n;
            const RowSplit<T, VW> sp = RowSplit<T, VW>::of(p.dy, off, p.n);
            const int64_t body = off + sp.head;
            const bool edge = tx < sp.edges();
            const int ecol = edge ? sp.edge_col(tx) : 0;
            const float r = p.rstd[row];

            P dyv[VPT] = {}, hv[VPT] = {};
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                const int i = tx + k * blockDim.x;
                if (i < sp.packs) {
                    dyv[k] = load_pack<T, VW>(dy + body, i);
                    hv[k] = load_pack<T, VW>(hin + body, i);
                }
            }
            const float dye = edge ? to_float(dy[off + ecol]) : 0.0f;
            const float hve = edge ? to_float(hin[off + ecol]) : 0.0f;
            const float wfe = weight_factor_one(w, ecol, p.offset);

            float cp = dye * wfe * hve, s = hve;
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                const int i = tx + k * blockDim.x;
                float dyf[VW], hf[VW], wf[VW];
                unpack(dyv[k], dyf);  // zeros outside the row
                unpack(hv[k], hf);
                weight_factor_at<T, VW>(w, i < sp.packs ? sp.head + i * VW : 0, p.offset, wf);
#pragma unroll
                for (int e = 0; e < VW; ++e) {
                    cp = fmaf(dyf[e] * wf[e], hf[e], cp);
                    s += hf[e];
                }
            }

            const BwdCoef q = bwd_coef(cp, s, r, p, red);  // every thread of the block calls this
            // A one-warp row sums without a barrier: order the previous row's additions here.
            if (dws != nullptr && blockDim.x == 32) __syncthreads();

#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                launder(dyv[k]);
                launder(hv[k]);
                const int i = tx + k * blockDim.x;
                if (i < sp.packs) {
                    const int c = sp.head + i * VW;
                    float dyf[VW], hf[VW], wf[VW], d[VW];
                    unpack(dyv[k], dyf);
                    unpack(hv[k], hf);
                    weight_factor_at<T, VW>(w, c, p.offset, wf);
#pragma unroll
                    for (int e = 0; e < VW; ++e) d[e] = q.a * dyf[e] * wf[e] - q.b * (hf[e] + q.shift);
                    if (dh_out != nullptr) {
                        float g[VW];
                        unpack(load_pack<T, VW>(dh_out + body, i), g);
#pragma unroll
                        for (int e = 0; e < VW; ++e) d[e] += g[e];
                    }
                    store_pack<T, VW>(dx + body, i, pack_floats<T, VW>(d));
                    if (dws != nullptr) {
#pragma unroll
                        for (int e = 0; e < VW; ++e) {
                            float& acc = dws[padded_col(c + e)];
                            acc = fmaf(dyf[e] * hf[e], r, acc);
                        }
                    }
                }
            }
            if (edge) {
                float d = q.a * dye * wfe - q.b * (hve + q.shift);
                if (dh_out != nullptr) d += to_float(dh_out[off + ecol]);
                dx[off + ecol] = from_float<T>(d);
                if (dws != nullptr) {
                    float& acc = dws[padded_col(ecol)];
                    acc = fmaf(dye * hve, r, acc);
                }
            }
        }

        if (dws != nullptr) {
            __syncthreads();  // the last row's additions
            float* prow = p.dw_partial + part * p.n;
            for (int j = tx; j < p.n; j += blockDim.x) prow[j] = dws[padded_col(j)];
            __syncthreads();  // before the next part clears dws
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dw[j] = T(scale · Σ_p partial[p][j]). Block (32, 32): threadIdx.x picks the column, threadIdx.y
// one of 32 contiguous chunks of parts, chunk c = [c*parts/32, (c+1)*parts/32). Each chunk is
// summed in increasing p, then the chunk sums in increasing c: a fixed, shape-only order.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void dw_reduce(const ReduceParams& p) {
    __shared__ float chunk[32][33];
    const float* __restrict__ partial = p.partial;
    const int64_t col = (int64_t)blockIdx.x * 32 + threadIdx.x;
    const int64_t p0 = (int64_t)threadIdx.y * p.parts / 32;
    const int64_t p1 = (int64_t)(threadIdx.y + 1) * p.parts / 32;
    float acc = 0.0f;
    if (col < p.n) {
#pragma unroll 4
        for (int64_t q = p0; q < p1; ++q) acc += partial[q * p.n + col];
    }
    chunk[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < p.n) {
        float t = 0.0f;
#pragma unroll
        for (int c = 0; c < 32; ++c) t += chunk[c][threadIdx.x];
        static_cast<T*>(p.dw)[col] = from_float<T>(p.scale * t);
    }
}

}  // namespace norm
}  // namespace lmkern

// ---------------------------------------------------------------------------------------------
// extern "C" entry points. Every kernel accepts blocks of up to 1024 threads (the launch bound
// caps registers at 64 per thread).
// ---------------------------------------------------------------------------------------------
#define LMKERN_NORM_FWD(NAME, ...)                                                         \
    extern "C" __global__ void __launch_bounds__(1024)                                         \
        NAME(const __grid_constant__ lmkern::norm::FwdParams p) {                              \
        lmkern::norm::__VA_ARGS__(p);                                                          \
    }
#define LMKERN_NORM_BWD(NAME, ...)                                                         \
    extern "C" __global__ void __launch_bounds__(1024)                                         \
        NAME(const __grid_constant__ lmkern::norm::BwdParams p) {                              \
        lmkern::norm::__VA_ARGS__(p);                                                          \
    }

#define LMKERN_NORM_ENTRIES(T, TN, VEC)                                          \
    LMKERN_NORM_FWD(norm_fwd_##TN, fwd_loop<T, 1>)                               \
    LMKERN_NORM_FWD(norm_fwd_##TN##_v16, fwd_loop<T, VEC>)                       \
    LMKERN_NORM_FWD(norm_fwd_##TN##_r1, fwd_reg<T, 1, 1>)                        \
    LMKERN_NORM_FWD(norm_fwd_##TN##_r2, fwd_reg<T, 1, 2>)                        \
    LMKERN_NORM_FWD(norm_fwd_##TN##_r4, fwd_reg<T, 1, 4>)                        \
    LMKERN_NORM_FWD(norm_fwd_##TN##_v16_r1, fwd_reg<T, VEC, 1>)                  \
    LMKERN_NORM_FWD(norm_fwd_##TN##_v16_r2, fwd_reg<T, VEC, 2>)                  \
    LMKERN_NORM_FWD(norm_fwd_##TN##_v16_r4, fwd_reg<T, VEC, 4>)                  \
    LMKERN_NORM_BWD(norm_bwd_##TN, bwd_loop<T, 1>)                               \
    LMKERN_NORM_BWD(norm_bwd_##TN##_v16, bwd_loop<T, VEC>)                       \
    LMKERN_NORM_BWD(norm_bwd_##TN##_r1, bwd_reg<T, 1, 1>)                        \
    LMKERN_NORM_BWD(norm_bwd_##TN##_r2, bwd_reg<T, 1, 2>)                        \
    LMKERN_NORM_BWD(norm_bwd_##TN##_v16_r1, bwd_reg<T, VEC, 1>)                  \
    LMKERN_NORM_BWD(norm_bwd_##TN##_v16_r2, bwd_reg<T, VEC, 2>)                  \
    LMKERN_NORM_FWD(norm_fwd_##TN##_s16_r1, fwd_split<T, VEC, 1>)                \
    LMKERN_NORM_FWD(norm_fwd_##TN##_s16_r2, fwd_split<T, VEC, 2>)                \
    LMKERN_NORM_FWD(norm_fwd_##TN##_s16_r4, fwd_split<T, VEC, 4>)                \
    LMKERN_NORM_BWD(norm_bwd_##TN##_s16_r1, bwd_split<T, VEC, 1>)                \
    LMKERN_NORM_BWD(norm_bwd_##TN##_s16_r2, bwd_split<T, VEC, 2>)                \
    extern "C" __global__ void __launch_bounds__(1024)                           \
        norm_dw_reduce_##TN(const __grid_constant__ lmkern::norm::ReduceParams p) { \
        lmkern::norm::dw_reduce<T>(p);                                           \
    }

LMKERN_NORM_ENTRIES(float, f32, 4)
LMKERN_NORM_ENTRIES(__nv_bfloat16, bf16, 8)
LMKERN_NORM_ENTRIES(__half, f16, 8)
