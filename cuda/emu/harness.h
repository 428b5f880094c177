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
    }
    void* ptr() { return bytes ? mem.data() + start : nullptr; }
    template <typename T> T* as() { return reinterpret_cast<T*>(ptr()); }
    bool guards_ok() const {
        for (size_t i = 0; i < start; ++i)
            if (mem[i] != 0xCD) return false;
        for (size_t i = start + bytes; i < mem.size(); ++i)
            if (mem[i] != 0xCD) return false;
        return true;
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
