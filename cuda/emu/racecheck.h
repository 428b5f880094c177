// Race check for the emulator (what compute-sanitizer's racecheck does for shared memory on a GPU,
// here for global memory too): two threads touching the same byte, at least one of them writing,
// with nothing ordering them, fail the run.
//
// Included by emu.h (which it uses) when the emulator is built with GCC's ThreadSanitizer
// instrumentation (-fsanitize=thread at compile time only; cuda/check.sh's race-check build),
// which calls __tsan_readN / __tsan_writeN before every memory access, but linked without libtsan:
// the hooks are defined here. They check accesses
// made by kernel threads to shared memory (dynamic, and the kernels' __shared__ statics) and to the
// test buffers (harness.h's Buf registers its bytes); everything else (a thread's stack, the
// emulator's state) returns at once, and the emulator's bookkeeping (EMU_BOOKKEEPING) is not
// instrumented at all.
//
// What orders two threads here is what orders them on the GPU in lmkern's kernels, which use no
// atomics, flags or grid-wide barriers: only a barrier of their block. Every point that orders a
// block's threads (the block's start, a __syncthreads every thread reached, an mbarrier phase made
// ready or completed) starts a new interval. Two accesses race when they come from different
// threads of one block in one interval, or from threads of different blocks of one launch (global
// memory). Warp shuffles and the warp-collective MMA order no memory, as on the GPU (where a
// warp's lanes need __syncwarp to see each other's stores; the kernels use none, and the emulator
// has none: one added must order its warp's lanes here too).
//
// Each byte keeps its last writer and, for the latest interval, its reader (or "several"), and
// which block(s) read it. A race is reported only when one exists in the emulator's run: coroutines
// switch only at barriers and warp collectives, so two accesses counted as unordered are ordered by
// nothing. An mbarrier phase orders only its arrivers and waiters but starts an interval for all, so
// a race across one is missed (none is reported falsely). Launches are ordered one after another:
// the overlap programmatic dependent launch allows before griddep_wait is not checked.
#pragma once

#ifndef __SANITIZE_THREAD__
#error "racecheck.h is for the -fsanitize=thread build of the emulator"
#endif

#include <algorithm>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <cstdio>
#include <string>
#include <vector>

namespace emu {
namespace race {

// A thread is 1 + its block's index in the launch · 1024 + its index in the block (0: none).
constexpr uint32_t NONE = 0, SEVERAL = 0xFFFFFFFFu;        // for the reader
constexpr uint32_t NO_BLOCK = 0xFFFFFFFFu, BLOCKS = 0xFFFFFFFEu;  // for the readers' block
inline uint32_t block_of(uint32_t thread) { return (thread - 1) >> 10; }

struct Cell {
    uint32_t scope;     // the block (shared memory) or launch (global) of the accesses below
    uint32_t writer, w_interval;
    uint32_t reader, r_interval;  // the reader(s) in interval r_interval
    uint32_t r_block;   // the block of every reader in this scope, NO_BLOCK none, BLOCKS several
};

// The state the hooks read: plain globals, so the (uninstrumented) hooks call nothing instrumented.
inline uint32_t interval = 1, block_serial = 0, launch_serial = 0;
inline uint32_t running = NONE;           // the thread running, NONE outside kernel threads
inline uintptr_t stack_lo = 0, stack_n = 0;  // its coroutine's stack (its locals: never shared)
inline uint32_t block_index = 0;          // the running block's index in its launch
inline uintptr_t dyn_lo = 0, dyn_n = 0;   // dynamic shared memory of the current block
inline Cell* dyn_cells = nullptr;
inline uintptr_t st_lo = 0, st_n = 0;     // the span of the __shared__ statics
inline Cell* st_cells = nullptr;
inline const unsigned char* st_tracked = nullptr;  // 1 where the span's byte is a __shared__ static
struct Tracked { uintptr_t lo, n; Cell* cells; };
inline Tracked buffers[256];              // the test buffers alive (harness.h's Buf), by address
inline int nbuffers = 0;
// A bit per 4 KiB page (page number modulo FILTER_BITS) that holds a byte of a buffer alive: most
// accesses, to the emulator's own state, then return after one look instead of a binary search.
constexpr uintptr_t FILTER_BITS = 1u << 16;
inline uint64_t page_filter[FILTER_BITS / 64];
inline void filter_add(uintptr_t lo, uintptr_t n) {
    const uintptr_t first = lo >> 12, last = (lo + n - 1) >> 12;
    for (uintptr_t p = first; p <= last && p - first < FILTER_BITS; ++p)
        page_filter[p % FILTER_BITS / 64] |= uint64_t{1} << (p % 64);
}
inline char message[600];
inline std::vector<Cell> dyn_shadow, st_shadow;  // (resized outside kernel threads)
inline std::vector<unsigned char> st_mask;

// A block starts (host code): its index in the launch, where its dynamic shared memory is, and
// (at the first block of the run) where the __shared__ statics are.
inline void block_start(uint32_t index, const void* dyn, size_t dyn_bytes) {
    block_index = index;
    if (block_index >= (1u << 22)) fail("race check: more than 2^22 blocks in one launch");
    ++block_serial;
    dyn_lo = reinterpret_cast<uintptr_t>(dyn);
    dyn_n = dyn_bytes;
    if (dyn_shadow.size() < dyn_n) dyn_shadow.resize(dyn_n);
    dyn_cells = dyn_shadow.data();
    static bool statics_mapped = false;
    if (statics_mapped) return;
    statics_mapped = true;
    uintptr_t lo = UINTPTR_MAX, hi = 0;
    for (const SharedRange& r : static_shared()) {
        lo = std::min(lo, reinterpret_cast<uintptr_t>(r.p));
        hi = std::max(hi, reinterpret_cast<uintptr_t>(r.p) + r.n);
    }
    if (lo >= hi) return;
    st_shadow.resize(hi - lo);
    st_mask.assign(hi - lo, 0);
    for (const SharedRange& r : static_shared()) memset(&st_mask[reinterpret_cast<uintptr_t>(r.p) - lo], 1, r.n);
    st_lo = lo, st_n = hi - lo;
    st_cells = st_shadow.data(), st_tracked = st_mask.data();
}

// Buffers register their bytes while they live (host code only).
inline void track(const void* p, size_t n) {
    if (p == nullptr || n == 0) return;
    if (nbuffers == 256) {
        fprintf(stderr, "emu race check: more than 256 buffers alive\n");
        exit(3);
    }
    Cell* cells = static_cast<Cell*>(calloc(n, sizeof(Cell)));  // zero pages until touched
    if (cells == nullptr) {
        fprintf(stderr, "emu race check: out of memory for a buffer of %zu bytes\n", n);
        exit(3);
    }
    int i = nbuffers++;
    for (; i > 0 && buffers[i - 1].lo > reinterpret_cast<uintptr_t>(p); --i) buffers[i] = buffers[i - 1];
    buffers[i] = {reinterpret_cast<uintptr_t>(p), n, cells};
    filter_add(reinterpret_cast<uintptr_t>(p), n);
}
inline void untrack(const void* p) {
    for (int i = 0; i < nbuffers; ++i) {
        if (buffers[i].lo == reinterpret_cast<uintptr_t>(p)) {
            free(buffers[i].cells);
            for (--nbuffers; i < nbuffers; ++i) buffers[i] = buffers[i + 1];
            memset(page_filter, 0, sizeof page_filter);
            for (int k = 0; k < nbuffers; ++k) filter_add(buffers[k].lo, buffers[k].n);
            return;
        }
    }
}

inline std::string thread_name(uint32_t t) {
    if (t == SEVERAL) return "several threads";
    return "block " + std::to_string(block_of(t)) + " thread " + std::to_string((t - 1) & 1023);
}

// Where byte k of a shadow is (host code: running is NONE).
inline std::string where_is(const Cell* cells, uintptr_t k) {
    if (cells == dyn_cells) return "dynamic shared memory, byte " + std::to_string(k);
    if (cells == st_cells) {
        for (const SharedRange& r : static_shared()) {
            const uintptr_t at = st_lo + k, p = reinterpret_cast<uintptr_t>(r.p);
            if (at >= p && at < p + r.n) return "__shared__ " + r.name + ", byte " + std::to_string(at - p);
        }
    }
    return "a global buffer, byte " + std::to_string(k);
}

// Fails the run: the running thread touched byte k of `cells` after thread `other` did, unordered.
[[gnu::no_sanitize_thread]] inline void report(const char* what, const Cell* cells, uintptr_t k, uint32_t other) {
    const uint32_t me = running;
    running = NONE;  // no checks while failing
    snprintf(message, sizeof message, "race (%s) at %s: %s, then %s, with no barrier between", what,
             where_is(cells, k).c_str(), thread_name(other).c_str(), thread_name(me).c_str());
    fail(message);
}

// Two accesses by `a` (earlier, in interval ia) and the running thread (now) are unordered.
[[gnu::no_sanitize_thread]] inline bool unordered(uint32_t a, uint32_t ia) {
    return a != NONE && a != running && (block_of(a) != block_index || ia == interval);
}

[[gnu::no_sanitize_thread]] inline void check(Cell* cells, uintptr_t k, uint32_t scope, RaceKind kind) {
    Cell& c = cells[k];
    if (c.scope != scope) c = Cell{scope, NONE, 0, NONE, 0, NO_BLOCK};
    const bool write = kind == RACE_WRITE;
    if (unordered(c.writer, c.w_interval)) {
        const char* what = write ? "write after write" : kind == RACE_READ ? "read after write" : "atomic after write";
        report(what, cells, k, c.writer);
    }
    if (kind == RACE_ATOMIC) return;
    if (write) {
        const bool other_block = c.r_block != NO_BLOCK && c.r_block != block_index;
        const bool this_interval = c.r_interval == interval && c.reader != NONE && c.reader != running;
        if (other_block || this_interval)
            report("write after read", cells, k, this_interval || c.r_block != BLOCKS ? c.reader : SEVERAL);
        c.writer = running, c.w_interval = interval;
    } else {
        c.r_block = c.r_block == NO_BLOCK || c.r_block == block_index ? block_index : BLOCKS;
        if (c.r_interval != interval || c.reader == NONE) c.reader = running, c.r_interval = interval;
        else if (c.reader != running) c.reader = SEVERAL;
    }
}

[[gnu::no_sanitize_thread]] inline void access(const void* p, size_t bytes, RaceKind kind) {
    if (running == NONE) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a - stack_lo < stack_n) return;  // the thread's own locals: never shared
    if (a - dyn_lo < dyn_n) {
        for (uintptr_t k = a - dyn_lo; k < a - dyn_lo + bytes && k < dyn_n; ++k)
            check(dyn_cells, k, block_serial, kind);
        return;
    }
    if (a - st_lo < st_n) {
        for (uintptr_t k = a - st_lo; k < a - st_lo + bytes && k < st_n; ++k)
            if (st_tracked[k]) check(st_cells, k, block_serial, kind);
        return;
    }
    if (!(page_filter[(a >> 12) % FILTER_BITS / 64] >> ((a >> 12) % 64) & 1)) return;
    // The last buffer starting at or below a (binary search).
    int lo = 0, hi = nbuffers;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (buffers[mid].lo <= a) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0) return;
    const Tracked& b = buffers[lo - 1];
    if (a - b.lo < b.n)
        for (uintptr_t k = a - b.lo; k < a - b.lo + bytes && k < b.n; ++k) check(b.cells, k, launch_serial, kind);
}

}  // namespace race
}  // namespace emu

// The instrumentation's entry points (GCC's -fsanitize=thread calls these; no libtsan is linked).
#define LMKERN_RACE_HOOK(NAME, N, KIND) \
    extern "C" [[gnu::no_sanitize_thread]] void NAME(void* p) { ::emu::race::access(p, N, ::emu::RACE_##KIND); }
#define LMKERN_RACE_HOOKS(N)                                \
    LMKERN_RACE_HOOK(__tsan_read##N, N, READ)               \
    LMKERN_RACE_HOOK(__tsan_write##N, N, WRITE)             \
    LMKERN_RACE_HOOK(__tsan_unaligned_read##N, N, READ)     \
    LMKERN_RACE_HOOK(__tsan_unaligned_write##N, N, WRITE)
LMKERN_RACE_HOOKS(1)
LMKERN_RACE_HOOKS(2)
LMKERN_RACE_HOOKS(4)
LMKERN_RACE_HOOKS(8)
LMKERN_RACE_HOOKS(16)
#undef LMKERN_RACE_HOOKS
#undef LMKERN_RACE_HOOK
extern "C" [[gnu::no_sanitize_thread]] void __tsan_read_range(void* p, unsigned long n) {
    ::emu::race::access(p, n, ::emu::RACE_READ);
}
extern "C" [[gnu::no_sanitize_thread]] void __tsan_write_range(void* p, unsigned long n) {
    ::emu::race::access(p, n, ::emu::RACE_WRITE);
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
// Function-local statics' initialization guards (host code only; one thread).
#define LMKERN_RACE_LOAD(NAME, T) \
    extern "C" [[gnu::no_sanitize_thread]] T NAME(const volatile T* a, int) { return *a; }
LMKERN_RACE_LOAD(__tsan_atomic8_load, uint8_t)
LMKERN_RACE_LOAD(__tsan_atomic32_load, uint32_t)
LMKERN_RACE_LOAD(__tsan_atomic64_load, uint64_t)
#undef LMKERN_RACE_LOAD
