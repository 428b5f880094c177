// Tests of the emulator's race check (racecheck.h) on small kernels written for it:
// each racy kernel must fail its run (in a child process: a failure ends the process) with the race
// named, and each correct twin must pass. So a race-check build whose hooks stopped being called (a
// compiler flag lost, a hook renamed) fails here instead of passing everything. In the other
// builds (cuda/check.sh's ASan one) the racy kernels are expected to pass: nothing checks there.
//
// Build and run (cuda/check.sh does):
//   g++ -std=c++17 -O2 -DLMKERN_EMU -fsanitize=thread --param=tsan-instrument-func-entry-exit=0
//       -I<cuda include> -Icuda -c cuda/emu/racecheck_emu.cpp -o r.o && g++ r.o -o r -ldl && ./r
#include "emu.h"
#include "../common.cuh"
#include "harness.h"

#include <sys/wait.h>
#include <unistd.h>

// In namespace lmkern: the emulator tracks the __shared__ statics of lmkern's functions only.
namespace lmkern {
namespace selftest {

// Thread 0 writes a static shared float, every thread reads it; `barrier`: with __syncthreads between.
void static_write_read(float* out, bool barrier) {
    __shared__ float s[32];
    if (threadIdx.x == 0) s[0] = 1.0f;
    if (barrier) __syncthreads();
    out[threadIdx.x] = s[0];
}

// Every thread reads dynamic shared byte 0..3, then thread 0 overwrites it.
void dynamic_read_write(float* out, bool barrier) {
    float* d = dynamic_smem<float>();
    if (threadIdx.x == 0) d[0] = 2.0f;
    __syncthreads();
    out[threadIdx.x] = d[0];
    if (barrier) __syncthreads();
    if (threadIdx.x == 0) d[0] = 3.0f;
}

// Two threads write the same static shared float.
void static_write_write(float* out, bool barrier) {
    __shared__ float s[32];
    if (threadIdx.x == 1) s[3] = 1.0f;
    if (barrier) __syncthreads();
    if (threadIdx.x == 2) s[3] = 2.0f;
    __syncthreads();
    out[threadIdx.x] = s[3];
}

// A warp shuffle orders no shared memory: lane 0 writes, the lanes shuffle, lane 1 reads.
// `barrier`: a __syncthreads after the write instead.
void shuffle_is_no_barrier(float* out, bool barrier) {
    __shared__ float s[32];
    if (threadIdx.x == 0) s[5] = 4.0f;
    if (barrier) __syncthreads();
    const float v = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1);
    out[threadIdx.x] = v + (threadIdx.x == 1 ? s[5] : 0.0f);
}

// No race: each thread writes then reads its own word, and all threads read words nobody writes.
void own_words_and_shared_reads(float* out, bool) {
    __shared__ float s[65];
    if (threadIdx.x == 0) s[64] = 5.0f;
    __syncthreads();
    s[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = s[threadIdx.x] + s[64];
}

// Global memory, in place: each thread reads its right neighbour's element, then writes its own.
void global_neighbour_in_place(float* out, bool barrier) {
    const float v = out[(threadIdx.x + 1) % blockDim.x];
    if (barrier) __syncthreads();
    out[threadIdx.x] = v + 1.0f;
}

// Global memory across blocks (the test launches two): thread 0 of each block writes element 0
// (`barrier` = false) or its block's element (true: no barrier orders blocks, so the correct twin
// writes apart).
void global_two_blocks(float* out, bool apart) {
    if (threadIdx.x == 0) out[apart ? blockIdx.x : 0] = (float)blockIdx.x;
}

}  // namespace selftest
}  // namespace lmkern

#if defined(__SANITIZE_THREAD__)
static constexpr bool CHECKING = true;
#else
static constexpr bool CHECKING = false;
#endif

// Run `kernel` on `blocks` blocks of 64 threads in a child process; true when the child reported a
// race (and failed), false when it finished.
static bool races(void (*kernel)(float*, bool), bool barrier, unsigned blocks, const char* name) {
    int pipefd[2];
    if (pipe(pipefd) != 0) return false;
    const pid_t pid = fork();
    if (pid == 0) {
        close(pipefd[0]);
        dup2(pipefd[1], 2);
        Buf out(64 * sizeof(float), 0, 0);
        emu::launch(dim3(blocks), dim3(64), 64, [&] { kernel(out.as<float>(), barrier); });
        _exit(0);
    }
    close(pipefd[1]);
    std::string err;
    char buf[512];
    for (ssize_t k; (k = read(pipefd[0], buf, sizeof buf)) > 0;) err.append(buf, (size_t)k);
    close(pipefd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    const bool exited = WIFEXITED(status);
    const int code = exited ? WEXITSTATUS(status) : -1;
    const bool race = err.find("emu: race (") != std::string::npos;
    expect(exited && (code == 0 || (code == 3 && race)),
           std::string(name) + ": the child ended with status " + std::to_string(status) + ": " + err);
    return code == 3 && race;
}

int main() {
    using namespace lmkern::selftest;
    struct Case { void (*kernel)(float*, bool); unsigned blocks; const char* name; bool racy_without_barrier; };
    const Case cases[] = {
        {static_write_read, 1, "static shared: write, then other threads read", true},
        {dynamic_read_write, 1, "dynamic shared: reads, then another thread writes", true},
        {static_write_write, 1, "static shared: two threads write", true},
        {shuffle_is_no_barrier, 1, "a shuffle between a write and another lane's read", true},
        {own_words_and_shared_reads, 1, "own words, shared reads", false},
        {global_neighbour_in_place, 1, "global in place: read a neighbour's element, write one's own", true},
        {global_two_blocks, 2, "global: two blocks write one element (with the flag: their own)", true},
    };
    for (const Case& c : cases) {
        const bool without = races(c.kernel, false, c.blocks, c.name);
        expect(without == (CHECKING && c.racy_without_barrier),
               std::string(c.name) + " without the barrier: " + (without ? "a race reported" : "no race reported"));
        expect(!races(c.kernel, true, c.blocks, c.name), std::string(c.name) + " with the barrier: a race reported");
    }
    return finish(CHECKING ? "racecheck_emu (race check on)" : "racecheck_emu (no race check in this build)");
}
