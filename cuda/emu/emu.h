// A tiny CPU emulator of the CUDA execution model, enough to run lmkern's kernel sources unchanged
// on a machine without a GPU (compiled by a host C++ compiler with -DLMKERN_EMU).
//
// Each thread of a block runs on a coroutine (started once with makecontext, then switched with
// _setjmp/_longjmp, which skip the signal-mask system calls of swapcontext); blocks run one after
// another, and coroutine i runs thread i of every block of every launch (starting coroutines was
// most of the emulator's time when each block made its own). __syncthreads()
// waits until every thread of the block has arrived, __shfl_xor_sync() until all 32 lanes of the
// warp have; anything else (a barrier some threads never reach, a shuffle with missing lanes or
// mixed offsets) is reported as an error and aborts. __shared__ variables become function-local
// statics, which is per-block storage because blocks run one at a time; like dynamic shared memory
// they are poisoned (NaN bytes) before every block.
//
// It checks the control flow and indexing of a kernel, not its speed or memory-model subtleties;
// built with -fsanitize=thread (cuda/check.sh does), it also checks that nothing but a barrier of
// their block orders two threads' accesses to a byte, one of them a write (racecheck.h).
#pragma once

#ifndef LMKERN_EMU
#error "define LMKERN_EMU when compiling the emulator"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <setjmp.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <type_traits>
#include <algorithm>
#include <map>
#include <string>
#include <memory>
#include <vector>

// The CUDA headers define these for host compilers; give them emulator meanings.
#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static

// The emulator's own bookkeeping run by kernel threads (switching, a thread's saved state, warp
// collectives): not instrumented in the race-check build. It touches no kernel memory, and its
// accesses were most of the hooks' calls: without them the race-check runs take a quarter less time.
#define EMU_BOOKKEEPING [[gnu::no_sanitize_thread]]

inline float __uint_as_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

// Byte n of the result is byte (s >> 4n) & 7 of the 8 bytes y:x (x the low word), as CUDA's
// __byte_perm without the sign-replicate mode.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t v = (uint64_t)x | ((uint64_t)y << 32);
    unsigned r = 0;
    for (int n = 0; n < 4; ++n) r |= (unsigned)((v >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
    return r;
}

// 1 + the index of x's lowest set bit, 0 for x = 0, as CUDA's __ffs.
inline int __ffs(int x) { return x == 0 ? 0 : __builtin_ctz((unsigned)x) + 1; }

namespace emu {

enum State { Runnable, AtBarrier, AtShuffle, AtMma, AtMbar, Done };

// An mbarrier of the bulk copies (lmkern::mbar_init): arrivals still due in the current phase, the
// bytes announced and the bytes of the copies issued against it, and those copies. Once all
// arrivals are in and the bytes match, the phase is ready; its copies land (bytes move) and it
// completes only when a thread waits on this barrier: as late as the GPU may make them visible.
struct Mbar {
    uint32_t count = 0, pending = 0, phase = 0;
    bool ready = false;
    int64_t expected = 0, issued = 0;
    struct Copy { void* dst; const void* src; size_t bytes; };
    std::vector<Copy> copies;
};

// Per block: a thread's state; the coroutine that runs it is Block::coroutines[its index].
struct Thread {
    uint3 tid;
    State state = Runnable;
    float shfl_value = 0.0f;
    int shfl_offset = 0;
    unsigned shfl_mask = 0;
    float shfl_result = 0.0f;
    // mma_16816: this lane's fragments (A, B and C in, D out) and the element type (1 bf16, 2 f16).
    uint32_t mma_a[4] = {}, mma_b[2] = {};
    float mma_c[4] = {};
    int mma_kind = 0;
    // cp.async copies issued and not yet waited for (they land at cp_async_wait_all).
    struct Copy { void* dst; const void* src; size_t bytes; };
    std::vector<Copy> async_copies;
};

// Coroutine i loops over the body (emu::entry) and runs thread i of each block. Each is allocated
// once and never moves: a started ucontext_t points into itself.
struct Coroutine {
    ucontext_t ctx;
    jmp_buf jb;  // where it waits: at a barrier, a warp collective, or done with its block
    bool started = false;
    std::vector<char> stack;
};

struct Block {
    dim3 grid, block;
    uint3 idx;
    std::vector<Thread> threads;
    std::vector<std::unique_ptr<Coroutine>> coroutines;
    std::vector<unsigned char> dynamic_smem;
    ucontext_t scheduler;
    jmp_buf scheduler_jb;
    size_t current = 0;
    const std::function<void()>* body = nullptr;
    std::map<const void*, Mbar> mbars;  // by address, set up by mbar_init
    uint64_t mbar_events = 0;           // phases made ready or completed so far (wakes the waiters)
};

// A plain global, not a function-local static: every threadIdx reads it, and a local static's
// guard check on each call was a tenth of the emulator's time.
inline Block the_block;
EMU_BOOKKEEPING inline Block& block() { return the_block; }
EMU_BOOKKEEPING inline Thread& self() { return block().threads[block().current]; }

// The kernels' __shared__ arrays, which are function-local statics here: every writable object
// symbol of this executable named _ZZN6lmkern... (a static local to a function of namespace lmkern;
// device code has no other writable statics), read from its own symbol table once. launch()
// poisons them before each block, as it does dynamic shared memory: on the GPU shared memory is
// undefined when a block starts, whereas a static would hold the previous block's values and hide
// a read before the write. (Section attributes cannot gather them: GCC puts the statics of template
// functions in COMDAT sections of their own.)
struct SharedRange {
    unsigned char* p;
    size_t n;
    std::string name;  // the symbol (mangled)
};

inline int main_program_base(struct dl_phdr_info* info, size_t, void* base) {
    *static_cast<uintptr_t*>(base) = info->dlpi_addr;  // the first object listed is the executable
    return 1;
}

inline const std::vector<SharedRange>& static_shared() {
    static const std::vector<SharedRange> ranges = [] {
        std::vector<unsigned char> img;
        if (FILE* f = fopen("/proc/self/exe", "rb")) {
            unsigned char buf[1 << 16];
            for (size_t k; (k = fread(buf, 1, sizeof buf, f)) > 0;) img.insert(img.end(), buf, buf + k);
            fclose(f);
        }
        uintptr_t base = 0;
        dl_iterate_phdr(main_program_base, &base);
        std::vector<SharedRange> found;
        bool symtab = false;
        if (img.size() >= sizeof(Elf64_Ehdr)) {
            const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(img.data());
            const auto* sh = reinterpret_cast<const Elf64_Shdr*>(img.data() + eh->e_shoff);
            for (int i = 0; i < eh->e_shnum; ++i) {
                if (sh[i].sh_type != SHT_SYMTAB) continue;
                symtab = true;
                const char* names = reinterpret_cast<const char*>(img.data() + sh[sh[i].sh_link].sh_offset);
                const auto* sym = reinterpret_cast<const Elf64_Sym*>(img.data() + sh[i].sh_offset);
                for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
                    const Elf64_Sym& s = sym[k];
                    if (ELF64_ST_TYPE(s.st_info) != STT_OBJECT || s.st_size == 0 || s.st_shndx == SHN_UNDEF ||
                        s.st_shndx >= eh->e_shnum || (sh[s.st_shndx].sh_flags & SHF_WRITE) == 0 ||
                        strncmp(names + s.st_name, "_ZZN6lmkern", 11) != 0)
                        continue;
                    found.push_back({reinterpret_cast<unsigned char*>(base + s.st_value), (size_t)s.st_size, names + s.st_name});
                }
            }
        }
        if (!symtab) {
            fprintf(stderr, "emu: no symbol table in /proc/self/exe (stripped?): cannot poison static shared memory\n");
            exit(3);
        }
        return found;
    }();
    return ranges;
}

[[noreturn]] inline void fail(const char* what) {
    const Block& b = block();
    fprintf(stderr, "emu: %s (block %u, thread %u,%u)\n", what, b.idx.x, b.threads[b.current].tid.x,
            b.threads[b.current].tid.y);
    exit(3);
}

// A memory access as the race check sees it: a read, a write, or an atomic operation (an
// mbarrier's arrivals and waits, which may meet each other unordered but not a plain write, such as
// the barrier's initialization).
enum RaceKind { RACE_READ, RACE_WRITE, RACE_ATOMIC };

}  // namespace emu

// The race-check build (compiled with -fsanitize=thread): racecheck.h.
#if defined(__SANITIZE_THREAD__)
#include "racecheck.h"
#endif

namespace emu {

// Where the race-check build learns what it checks; nothing in the other builds.
// A point that orders all of a block's threads (block start, barrier, mbarrier phase) was passed.
inline void race_new_interval() {
#if defined(__SANITIZE_THREAD__)
    ++race::interval;
#endif
}
// Thread i of the block runs on the coroutine stack [stack, stack + bytes) (i >= 0), or the
// scheduler does (-1).
EMU_BOOKKEEPING inline void race_running(int i, const void* stack = nullptr, size_t bytes = 0) {
#if defined(__SANITIZE_THREAD__)
    race::running = i < 0 ? race::NONE : 1 + race::block_index * 1024 + (uint32_t)i;
    race::stack_lo = reinterpret_cast<uintptr_t>(stack), race::stack_n = bytes;
#else
    (void)i, (void)stack, (void)bytes;
#endif
}
// Accesses the compiler does not see (done by the emulator's library calls for the kernel): a
// copy's destination written at its issue, an mbarrier initialized (WRITE) or arrived at / waited
// on (ATOMIC).
inline void race_access(const void* p, size_t bytes, RaceKind kind) {
#if defined(__SANITIZE_THREAD__)
    race::access(p, bytes, kind);
#else
    (void)p, (void)bytes, (void)kind;
#endif
}
// A launch starts: global memory accesses of earlier launches are ordered before its own.
inline void race_launch_start() {
#if defined(__SANITIZE_THREAD__)
    ++race::launch_serial;
#endif
}

// A block starts: the race check learns its index in the launch and where its dynamic shared memory is.
inline void race_block_start() {
#if defined(__SANITIZE_THREAD__)
    const Block& b = block();
    race::block_start((b.idx.z * b.grid.y + b.idx.y) * b.grid.x + b.idx.x, b.dynamic_smem.data(),
                      b.dynamic_smem.size());
#endif
    race_new_interval();
}

// Jump to a context saved by _setjmp. Under AddressSanitizer, libc's _longjmp itself, through a
// pointer: ASan's interceptor (and the call ASan adds before any noreturn call) first "unpoisons the
// stack being left", a sigaltstack system call and a shadow clear on every switch (three quarters
// of the emulator's time under ASan), and needless here: a coroutine's frames are resumed later,
// not abandoned, and a fresh coroutine's stack is cleared by the swapcontext that starts it. The
// jump itself must leave no frame with poisoned redzones behind (always inlined, no locals): ASan
// would keep that poison, and later frames at those addresses would report false overflows.
#if defined(__SANITIZE_ADDRESS__)
using LongJmp = void (*)(struct __jmp_buf_tag*, int);
inline LongJmp find_libc_longjmp() {
    void* libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    void* f = libc ? dlsym(libc, "_longjmp") : nullptr;
    if (!f) {
        fprintf(stderr, "emu: libc's _longjmp not found\n");
        exit(3);
    }
    return (LongJmp)f;
}
inline const LongJmp libc_longjmp = find_libc_longjmp();
#endif

EMU_BOOKKEEPING [[gnu::always_inline]] inline void jump(jmp_buf jb) {
#if defined(__SANITIZE_ADDRESS__)
    libc_longjmp(jb, 1);
#else
    _longjmp(jb, 1);
#endif
}

EMU_BOOKKEEPING inline void yield(State s) {
    Block& b = block();
    b.threads[b.current].state = s;
    if (!_setjmp(b.coroutines[b.current]->jb)) jump(b.scheduler_jb);
}

// A coroutine's whole life: run the current block's thread, then wait (Done) to be resumed for the
// next block's. Never returns (to uc_link).
EMU_BOOKKEEPING inline void entry() {
    for (;;) {
        (*block().body)();
        if (!self().async_copies.empty()) fail("cp.async copies never waited for");
        yield(Done);
    }
}

// Run thread i until it yields or finishes.
EMU_BOOKKEEPING inline void resume(size_t i) {
    Block& b = block();
    Coroutine& co = *b.coroutines[i];
    b.current = i;
    if (!_setjmp(b.scheduler_jb)) {
        race_running((int)i, co.stack.data(), co.stack.size());
        if (!co.started) {
            co.started = true;
            swapcontext(&b.scheduler, &co.ctx);
        } else {
            jump(co.jb);
        }
    }
    race_running(-1);
}

// One element of a bf16x2 / f16x2 register as float (half h: 0 the low 16 bits).
inline float mma_elem(uint32_t reg, int h, int kind) {
    const uint16_t bits = (uint16_t)(reg >> (16 * h));
    if (kind == 1) {
        const uint32_t f = (uint32_t)bits << 16;
        float v;
        memcpy(&v, &f, 4);
        return v;
    }
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 over a warp's fragments, laid out
// as the PTX ISA gives them (lane = 4·groupID + threadID_in_group, g and t below):
//   A (16×16): a0,a1 = A[g][2t, 2t+1], a2,a3 = A[g+8][2t, 2t+1], a4,a5 = A[g][2t+8, 2t+9],
//              a6,a7 = A[g+8][2t+8, 2t+9]; register i holds a(2i) low, a(2i+1) high;
//   B (16×8, k × n): b0,b1 = B[2t, 2t+1][g], b2,b3 = B[2t+8, 2t+9][g];
//   C, D (16×8): c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1].
// D = A·B + C, summed in double and rounded once (the hardware's fp32 order is unspecified).
inline void mma_16816_warp(Thread* lanes) {
    const int kind = lanes[0].mma_kind;
    double A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        const Thread& th = lanes[l];
        for (int h = 0; h < 2; ++h) {
            A[g][2 * t + h] = mma_elem(th.mma_a[0], h, kind);
            A[g + 8][2 * t + h] = mma_elem(th.mma_a[1], h, kind);
            A[g][2 * t + 8 + h] = mma_elem(th.mma_a[2], h, kind);
            A[g + 8][2 * t + 8 + h] = mma_elem(th.mma_a[3], h, kind);
            B[2 * t + h][g] = mma_elem(th.mma_b[0], h, kind);
            B[2 * t + 8 + h][g] = mma_elem(th.mma_b[1], h, kind);
            C[g][2 * t + h] = th.mma_c[h];
            C[g + 8][2 * t + h] = th.mma_c[2 + h];
        }
    }
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
            double s = C[row][col];
            for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
            lanes[l].mma_c[i] = (float)s;
        }
    }
}

constexpr size_t STACK = 64 * 1024;

// The lanes of warp w when its lanes wait at the warp-collective `at` (nullptr when none does).
// Called when nothing is runnable: a warp where only some lanes wait there has the others waiting
// elsewhere or done, so the run fails with `what`.
inline Thread* warp_at(size_t w, State at, const char* what) {
    Block& b = block();
    Thread* lanes = &b.threads[w * 32];
    const size_t nl = b.threads.size() - w * 32 < 32 ? b.threads.size() - w * 32 : 32;
    bool any = false, all = true;
    for (size_t l = 0; l < nl; ++l) {
        any |= lanes[l].state == at;
        all &= lanes[l].state == at;
    }
    if (!any) return nullptr;
    if (!all || nl != 32) {
        b.current = w * 32;
        fail(what);
    }
    return lanes;
}

// Run `kernel` (a call of the extern "C" kernel with its arguments) over the whole grid.
inline void launch(dim3 grid, dim3 blockdim, size_t smem_bytes, const std::function<void()>& kernel) {
    Block& b = block();
    const size_t nthreads = (size_t)blockdim.x * blockdim.y * blockdim.z;
    if (nthreads == 0 || nthreads > 1024 || grid.x == 0) {
        fprintf(stderr, "emu: invalid launch grid %u block %ux%ux%u\n", grid.x, blockdim.x, blockdim.y, blockdim.z);
        exit(3);
    }
    b.grid = grid;
    b.block = blockdim;
    b.body = &kernel;
    b.threads.assign(nthreads, Thread{});
    race_launch_start();
    while (b.coroutines.size() < nthreads) {
        auto co = std::make_unique<Coroutine>();
        co->stack.resize(STACK);
        getcontext(&co->ctx);
        co->ctx.uc_stack.ss_sp = co->stack.data();
        co->ctx.uc_stack.ss_size = STACK;
        co->ctx.uc_link = &b.scheduler;
        makecontext(&co->ctx, entry, 0);
        b.coroutines.push_back(std::move(co));
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                b.idx = make_uint3(bx, by, bz);
                // Fresh, poisoned dynamic shared memory for every block.
                b.dynamic_smem.assign(smem_bytes + 16, 0xFF);  // NaN floats
                for (const SharedRange& r : static_shared()) memset(r.p, 0xFF, r.n);
                race_block_start();
                b.mbars.clear();
                uint64_t events_seen = b.mbar_events;
                for (size_t i = 0; i < nthreads; ++i) {
                    Thread& t = b.threads[i];
                    t = Thread{};
                    t.tid = make_uint3(i % blockdim.x, (i / blockdim.x) % blockdim.y, i / (blockdim.x * blockdim.y));
                }
                for (;;) {
                    for (size_t i = 0; i < nthreads; ++i) {
                        if (b.threads[i].state != Runnable) continue;
                        resume(i);
                    }
                    bool all_done = true, any_barrier = false, any_mbar = false, progressed = false;
                    for (const Thread& t : b.threads) {
                        all_done &= t.state == Done;
                        any_barrier |= t.state == AtBarrier;
                        any_mbar |= t.state == AtMbar;
                    }
                    if (all_done) {
                        for (const auto& m : b.mbars)
                            if (!m.second.copies.empty()) fail("bulk copies that no thread waited for when the block exits");
                        break;
                    }
                    // Warp shuffles: a warp whose lanes all wait at a shuffle exchanges values.
                    for (size_t w = 0; w * 32 < nthreads; ++w) {
                        Thread* lanes = warp_at(w, AtShuffle, "__shfl_xor_sync without all 32 lanes of the warp");
                        if (lanes == nullptr) continue;
                        for (size_t l = 0; l < 32; ++l) {
                            if (lanes[l].shfl_mask != 0xffffffffu || lanes[l].shfl_offset != lanes[0].shfl_offset) {
                                b.current = w * 32 + l;
                                fail("__shfl_xor_sync with a partial mask or mixed offsets");
                            }
                        }
                        for (size_t l = 0; l < 32; ++l) lanes[l].shfl_result = lanes[l ^ lanes[0].shfl_offset].shfl_value;
                        for (size_t l = 0; l < 32; ++l) lanes[l].state = Runnable;
                        progressed = true;
                    }
                    // Tensor-core MMA: a warp whose lanes all wait at mma_16816 multiplies.
                    for (size_t w = 0; w * 32 < nthreads; ++w) {
                        Thread* lanes = warp_at(w, AtMma, "mma_16816 without all 32 lanes of the warp");
                        if (lanes == nullptr) continue;
                        for (size_t l = 0; l < 32; ++l) {
                            if (lanes[l].mma_kind != lanes[0].mma_kind) {
                                b.current = w * 32 + l;
                                fail("mma_16816 with mixed element types");
                            }
                        }
                        mma_16816_warp(lanes);
                        for (size_t l = 0; l < 32; ++l) lanes[l].state = Runnable;
                        progressed = true;
                    }
                    if (progressed) continue;
                    // mbarrier waits: retried once a phase has become ready or completed since they
                    // last looked; if none has, none will (every thread waits somewhere).
                    if (any_mbar) {
                        if (b.mbar_events == events_seen) fail("deadlock: an mbarrier phase that never completes");
                        events_seen = b.mbar_events;
                        for (Thread& t : b.threads)
                            if (t.state == AtMbar) t.state = Runnable;
                        continue;
                    }
                    // Block barrier: every thread must be there (none finished, none elsewhere).
                    if (any_barrier) {
                        for (size_t i = 0; i < nthreads; ++i) {
                            if (b.threads[i].state != AtBarrier) {
                                b.current = i;
                                fail("__syncthreads not reached by every thread of the block");
                            }
                        }
                        for (Thread& t : b.threads) t.state = Runnable;
                        race_new_interval();
                        continue;
                    }
                    fail("deadlock");
                }
            }
}

// The byte ranges a test declares prefetchable (the kernel's own buffers): prefetch_l2 fails the
// run on an address outside them, since on the GPU a stray prefetch is silent. Empty: no check.
inline std::vector<std::pair<const unsigned char*, size_t>>& prefetch_ranges() {
    static std::vector<std::pair<const unsigned char*, size_t>> r;
    return r;
}

}  // namespace emu

// By value, and bookkeeping: these reads of the emulator's own state (most of a kernel's memory
// accesses) skip the race check's hooks.
namespace emu {
EMU_BOOKKEEPING inline uint3 thread_idx() { return the_block.threads[the_block.current].tid; }
EMU_BOOKKEEPING inline uint3 block_idx() { return the_block.idx; }
EMU_BOOKKEEPING inline dim3 block_dim() { return the_block.block; }
EMU_BOOKKEEPING inline dim3 grid_dim() { return the_block.grid; }
}  // namespace emu
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

EMU_BOOKKEEPING inline void __syncthreads() { ::emu::yield(::emu::AtBarrier); }

EMU_BOOKKEEPING inline float __shfl_xor_sync(unsigned mask, float v, int offset) {
    ::emu::Thread& t = ::emu::self();
    t.shfl_value = v;
    t.shfl_offset = offset;
    t.shfl_mask = mask;
    ::emu::yield(::emu::AtShuffle);
    return ::emu::self().shfl_result;
}

namespace lmkern {
// One kernel at a time: programmatic dependent launch has nothing to wait for. prefetch_l2 checks
// the address against emu::prefetch_ranges() and reads the byte; prefetch_l2_bulk the range.
inline void griddep_wait() {}
inline void griddep_launch_dependents() {}
inline void prefetch_l2(const void* p) {
    const unsigned char* b = static_cast<const unsigned char*>(p);
    bool ok = ::emu::prefetch_ranges().empty();
    for (const auto& r : ::emu::prefetch_ranges()) ok |= b >= r.first && b < r.first + r.second;
    if (!ok) ::emu::fail("prefetch_l2 outside the kernel's buffers");
    (void)*static_cast<const volatile unsigned char*>(p);
}
// prefetch_l2_bulk: the range must be 16-byte aligned and lie in one of the buffers.
inline void prefetch_l2_bulk(const void* p, uint32_t bytes) {
    const unsigned char* b = static_cast<const unsigned char*>(p);
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0 || bytes % 16 != 0 || bytes == 0) ::emu::fail("prefetch_l2_bulk: not 16-byte aligned");
    bool ok = ::emu::prefetch_ranges().empty();
    for (const auto& r : ::emu::prefetch_ranges()) ok |= b >= r.first && b + bytes <= r.first + r.second;
    if (!ok) ::emu::fail("prefetch_l2_bulk outside the kernel's buffers");
    (void)*static_cast<const volatile unsigned char*>(p);
    (void)*static_cast<const volatile unsigned char*>(b + bytes - 1);
}

// Bulk copies on mbarriers (common.cuh has the contract): a copy's destination holds garbage (NaN
// bytes) from its issue until a thread waits on its barrier once the phase is ready (emu::Mbar);
// then every copy of the phase lands at once. So reading copied bytes without the wait that covers
// them, copying over bytes still to be read, announcing other bytes than the phase's copies bring
// (the GPU would hang: here a deadlock fails the run), arriving more often than the count, a phase
// nobody waits for, and a misaligned or empty copy or one outside the kernel's buffers all fail.
inline ::emu::Mbar& mbar_at(const uint64_t* bar) {
    auto it = ::emu::block().mbars.find(bar);
    if (it == ::emu::block().mbars.end()) ::emu::fail("mbarrier used before mbar_init");
    return it->second;
}
inline void mbar_ready_if_done(::emu::Mbar& m) {
    if (m.pending != 0 || m.issued != m.expected) return;
    m.ready = true;
    ++::emu::block().mbar_events;
    ::emu::race_new_interval();
}
inline void mbar_init(uint64_t* bar, uint32_t count) {
    if (reinterpret_cast<uintptr_t>(bar) % 8 != 0 || count == 0) ::emu::fail("mbar_init: misaligned or a count of 0");
    ::emu::race_access(bar, 8, ::emu::RACE_WRITE);
    ::emu::Mbar m;
    m.count = m.pending = count;
    ::emu::block().mbars[bar] = m;
}
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    ::emu::race_access(bar, 8, ::emu::RACE_ATOMIC);
    ::emu::Mbar& m = mbar_at(bar);
    if (m.pending == 0) ::emu::fail("mbarrier: more arrivals than its count in one phase (or on a phase nobody waited for)");
    --m.pending;
    m.expected += bytes;
    mbar_ready_if_done(m);
}
inline void bulk_copy_to_shared(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
    if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0 || bytes % 16 != 0 || bytes == 0)
        ::emu::fail("bulk_copy_to_shared: not 16-byte aligned, or empty");
    const unsigned char* b = static_cast<const unsigned char*>(src);
    bool ok = ::emu::prefetch_ranges().empty();
    for (const auto& r : ::emu::prefetch_ranges()) ok |= b >= r.first && b + bytes <= r.first + r.second;
    if (!ok) ::emu::fail("bulk_copy_to_shared: source outside the kernel's buffers");
    ::emu::race_access(bar, 8, ::emu::RACE_ATOMIC);
    ::emu::race_access(dst, bytes, ::emu::RACE_WRITE);
    ::emu::Mbar& m = mbar_at(bar);
    memset(dst, 0xFF, bytes);
    m.copies.push_back({dst, src, bytes});
    m.issued += bytes;
    if (m.ready) ::emu::fail("bulk_copy_to_shared: a copy on a phase already complete");
    mbar_ready_if_done(m);
}
inline void fence_proxy_async_shared() {}  // one proxy here
inline void mbar_wait(uint64_t* bar, uint32_t parity) {
    ::emu::race_access(bar, 8, ::emu::RACE_ATOMIC);
    for (;;) {
        ::emu::Mbar& m = mbar_at(bar);
        if ((m.phase & 1) != parity) return;
        if (m.ready) {  // the phase completes: its copies land
            for (const ::emu::Mbar::Copy& c : m.copies) memcpy(c.dst, c.src, c.bytes);
            m.copies.clear();
            m.phase ^= 1;
            m.pending = m.count;
            m.expected = m.issued = 0;
            m.ready = false;
            ++::emu::block().mbar_events;
            ::emu::race_new_interval();
            return;
        }
        ::emu::yield(::emu::AtMbar);
    }
}

// d += a·b on the tensor cores (see emu::mma_16816_warp): a warp-collective call.
template <typename T>
EMU_BOOKKEEPING inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ::emu::Thread& t = ::emu::self();
    for (int i = 0; i < 4; ++i) t.mma_a[i] = a[i], t.mma_c[i] = d[i];
    t.mma_b[0] = b[0], t.mma_b[1] = b[1];
    t.mma_kind = std::is_same<T, __nv_bfloat16>::value ? 1 : 2;
    ::emu::yield(::emu::AtMma);
    for (int i = 0; i < 4; ++i) d[i] = ::emu::self().mma_c[i];
}

// cp.async as the hardware guarantees it and no more: the destination holds garbage (NaN bytes)
// from the copy's issue until the issuing thread waits (cp_async_wait_all), when the bytes move. So a
// kernel that reads copied bytes before the wait that covers them (or another thread's copies
// without a barrier after that thread's wait), or that copies over bytes it or another thread still
// has to read, reads poisoned or stale shared memory and fails its checks; a misaligned copy fails
// the run.
template <int BYTES>
inline void cp_async(void* dst, const void* src) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    if (reinterpret_cast<uintptr_t>(dst) % BYTES != 0 || reinterpret_cast<uintptr_t>(src) % BYTES != 0)
        ::emu::fail("cp.async: an address not aligned to the copy's size");
    ::emu::race_access(dst, BYTES, ::emu::RACE_WRITE);
    memset(dst, 0xFF, BYTES);
    ::emu::self().async_copies.push_back({dst, src, BYTES});
}
inline void cp_async_wait_all() {
    ::emu::Thread& t = ::emu::self();
    for (const ::emu::Thread::Copy& c : t.async_copies) memcpy(c.dst, c.src, c.bytes);
    t.async_copies.clear();
}

template <typename T>
inline T* dynamic_smem() {
    return reinterpret_cast<T*>(::emu::block().dynamic_smem.data());
}
}  // namespace lmkern
