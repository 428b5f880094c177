#!/usr/bin/env bash
# The Rust core's tests under AddressSanitizer (nightly rustc), once per CPU kernel width
# (LMKERN_CPU_ISA): the unsafe SIMD kernels read and write through raw pointers, and valgrind cannot
# run AVX-512 code, so this is what checks them for out-of-bounds accesses (the tests size every
# buffer exactly: tests/quant_cpu.rs, every_cpu_path_on_awkward_shapes). A check, not a build step:
# skipped with a warning and exit status 75 where the nightly toolchain cannot be installed (.ci/run
# then runs the narrower kernels' tests without ASan).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup toolchain list | grep -q '^nightly' && ! rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
    echo "warning: could not install the nightly toolchain; AddressSanitizer run skipped" >&2
    exit 75
fi
target=$(rustc +nightly -vV | sed -n 's/^host: //p')
for isa in avx512 avx2 baseline; do
    echo "+ LMKERN_CPU_ISA=$isa cargo +nightly test -p lmkern-core (AddressSanitizer)"
    LMKERN_CPU_ISA=$isa RUSTFLAGS="-Zsanitizer=address" CARGO_TARGET_DIR=target/asan \
        cargo +nightly test -p lmkern-core --target "$target" --quiet
done
