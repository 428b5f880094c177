// What the emulator tests (cuda/emu/*_emu.cpp) share: host conversions of the element types, guarded
// buffers, and the check counter. Include after emu.h and the kernel source.
#pragma once

#include <stdint.h>
#include <string.h>

#include <cstdio>
#include <string>
#include <vector>

template <typename T> float to_f(T v) { return lmkern::to_float(v); }
template <typename T> T from_f(float v) { return lmkern::from_float<T>(v); }

// Built with AddressSanitizer (cuda/check.sh's second emulator pass), a buffer's guard bytes are
// poisoned: a kernel that reads (or writes) outside its buffers is reported where it does, with
// the stack, instead of reading guard bytes that may not show in its outputs.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define EMU_POISON(p, n) ((void)(p), (void)(n))
#define EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

// Built with the race check (racecheck.h), a buffer's bytes are watched while it lives.
#if defined(__SANITIZE_THREAD__)
#define EMU_TRACK(p, n) ::emu::race::track((p), (n))
#define EMU_UNTRACK(p) ::emu::race::untrack(p)
#else
#define EMU_TRACK(p, n) ((void)(p), (void)(n))
#define EMU_UNTRACK(p) ((void)(p))
#endif

// A buffer with guard bytes on both sides; data starts `misalign` bytes after a 256-byte boundary
// and is poisoned (0xFF: NaN for every float type) so that unwritten outputs show.
struct Buf {
    std::vector<unsigned char> mem;
    size_t start = 0, bytes = 0;
    static constexpr size_t GUARD = 512;
    Buf() = default;
    Buf(size_t nbytes, size_t misalign, unsigned char poison = 0xFF) : bytes(nbytes) {
        mem.assign(nbytes + 2 * GUARD + 512, 0xCD);
        uintptr_t base = reinterpret_cast<uintptr_t>(mem.data()) + GUARD;
        uintptr_t aligned = (base + 255) & ~uintptr_t(255);
        start = aligned - reinterpret_cast<uintptr_t>(mem.data()) + misalign;
        memset(mem.data() + start, poison, nbytes);
        poison_guards();
        EMU_TRACK(mem.data() + start, nbytes);
    }
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
    // A moved-from Buf is empty (its vector's bytes moved, still tracked under the same address).
    Buf(Buf&& o) noexcept : mem(std::move(o.mem)), start(o.start), bytes(o.bytes) { o.mem.clear(), o.bytes = 0; }
    Buf& operator=(Buf&& o) noexcept {
        if (this != &o) {
            release();
            mem = std::move(o.mem), start = o.start, bytes = o.bytes;
            o.mem.clear(), o.bytes = 0;
        }
        return *this;
    }
    ~Buf() { release(); }
    void* ptr() { return bytes ? mem.data() + start : nullptr; }
    template <typename T> T* as() { return reinterpret_cast<T*>(ptr()); }
    bool guards_ok() const {
        EMU_UNPOISON(mem.data(), mem.size());
        bool ok = true;
        for (size_t i = 0; i < start; ++i) ok &= mem[i] == 0xCD;
        for (size_t i = start + bytes; i < mem.size(); ++i) ok &= mem[i] == 0xCD;
        poison_guards();
        return ok;
    }

private:
    void poison_guards() const {
        if (mem.empty()) return;
        EMU_POISON(mem.data(), start);
        EMU_POISON(mem.data() + start + bytes, mem.size() - start - bytes);
    }
    void unpoison_all() const {
        if (!mem.empty()) EMU_UNPOISON(mem.data(), mem.size());
    }
    void release() {
        if (mem.empty()) return;
        unpoison_all();
        EMU_UNTRACK(mem.data() + start);
    }
};

static int failures = 0, checks = 0;

// Count a check; print the first 30 failures.
static void expect(bool ok, const std::string& what) {
    ++checks;
    if (!ok) {
        ++failures;
        if (failures <= 30) fprintf(stderr, "FAIL: %s\n", what.c_str());
    }
}

// The summary line and the exit status of a test program.
static int finish(const char* name) {
    printf("%s: %d checks, %d failures\n", name, checks, failures);
    return failures == 0 ? 0 : 1;
}
