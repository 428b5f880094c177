#!/usr/bin/env bash
# Compile check of the CUDA kernels (no GPU needed): every cuda/*.cu, on its own,
# with the nvcc 13.0 toolchain, for sm_80 and sm_90, warnings as errors (device and host); then
# checks that PTX for compute_90 declares ISA version 9.0 (what the GPU machines' 13.0 driver takes).
#
# nvcc is found as rust/core/build.rs finds it, first hit wins:
#   $LMKERN_NVCC; $REPO/.toolchain/nvcc/nvidia/cu13/bin/nvcc (.ci/install-nvcc.sh puts it there);
#   nvcc on PATH; $CUDA_HOME/bin/nvcc; <dir>/bin/nvcc for the first dir of nvidia.cu13.__path__
#   (of $PYO3_PYTHON, else python3) that has one.
#
# Then, unless --no-emu, runs the kernels themselves on the CPU emulator (cuda/emu: every *_emu.cpp
# is built with the host compiler against the same CUDA headers and must pass), twice: with the
# race check (cuda/emu/racecheck.h: two threads touching a byte of shared memory or of a test
# buffer, one writing, with no barrier of their block between, fail), and under AddressSanitizer
# and UBSan's alignment check (a kernel reading outside its buffers, or a vector access at a
# misaligned address, fails); these runs go side by side, one per core.
#
# CI runs it with --no-nvcc (the emulators only): its `LMKERN_NVCC_STRICT=1 cargo test --features
# cuda` compiles the kernels with these same checks once (rust/core/build.rs), for every target the
# wheel embeds, in the one translation unit the wheel is built from.
#
# Usage: cuda/check.sh [-v] [--no-emu | --no-nvcc]     (-v: print ptxas register/spill statistics)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
verbose=0
emu=1
compile=1
for arg in "$@"; do
    case "$arg" in
        -v) verbose=1 ;;
        --no-emu) emu=0 ;;
        --no-nvcc) compile=0 ;;
        *) echo "usage: cuda/check.sh [-v] [--no-emu | --no-nvcc]" >&2; exit 2 ;;
    esac
done
if [[ $emu == 0 && $compile == 0 ]]; then
    echo "cuda/check.sh: --no-emu and --no-nvcc leave nothing to check" >&2
    exit 2
fi

find_nvcc() {
    if [[ -n "${LMKERN_NVCC:-}" ]]; then
        echo "$LMKERN_NVCC"; return 0
    fi
    local local_nvcc="$repo/.toolchain/nvcc/nvidia/cu13/bin/nvcc"
    if [[ -f "$local_nvcc" ]]; then
        echo "$local_nvcc"; return 0
    fi
    if command -v nvcc >/dev/null 2>&1; then
        command -v nvcc; return 0
    fi
    if [[ -n "${CUDA_HOME:-}" && -f "$CUDA_HOME/bin/nvcc" ]]; then
        echo "$CUDA_HOME/bin/nvcc"; return 0
    fi
    local py="${PYO3_PYTHON:-python3}" roots root
    if roots="$("$py" -c 'import nvidia.cu13 as m; print("\n".join(m.__path__))' 2>/dev/null)"; then
        while IFS= read -r root; do
            if [[ -n "$root" && -f "$root/bin/nvcc" ]]; then
                echo "$root/bin/nvcc"; return 0
            fi
        done <<<"$roots"
    fi
    return 1
}

if ! nvcc="$(find_nvcc)"; then
    echo "cuda/check.sh: nvcc not found; install the pinned toolchain with .ci/install-nvcc.sh" >&2
    exit 2
fi
version="$("$nvcc" --version)" || { echo "cuda/check.sh: $nvcc does not run" >&2; exit 2; }
if ! grep -q "release 13\.0," <<<"$version"; then
    echo "cuda/check.sh: $nvcc is not the 13.0 toolchain:" >&2
    echo "$version" >&2
    echo "install the pinned one with .ci/install-nvcc.sh (or point LMKERN_NVCC at it)" >&2
    exit 2
fi
echo "nvcc: $nvcc ($(grep -oE 'V[0-9]+\.[0-9.]+' <<<"$version" | head -1))"

inc=()
nvcc_root="$(cd "$(dirname "$nvcc")/.." && pwd)"
[[ -f "$nvcc_root/include/cuda_bf16.h" ]] && inc=(-I "$nvcc_root/include")

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

flags=(-O3 -std=c++17 -Werror all-warnings -Xcompiler -Wall,-Werror "${inc[@]}" -I "$here")
[[ $verbose == 1 ]] && flags+=(-Xptxas -v)

status=0
shopt -s nullglob
units=("$here"/*.cu)
if [[ ${#units[@]} -eq 0 ]]; then
    echo "cuda/check.sh: no .cu files in $here" >&2
    exit 1
fi
(( compile )) || units=()   # --no-nvcc: nvcc only lends its CUDA headers to the emulators
for cu in "${units[@]}"; do
    name="$(basename "$cu" .cu)"
    t0=$SECONDS
    echo "== $name.cu: sm_80, sm_90, compute_90 PTX"
    # One nvcc call, the targets in parallel (--threads 0); --keep leaves the compute_90 PTX (what
    # the wheel embeds, from the same front-end pass as sm_90) in $tmp/$name.keep for the check below.
    mkdir -p "$tmp/$name.keep"
    if ! "$nvcc" -fatbin --threads 0 --keep --keep-dir "$tmp/$name.keep" "${flags[@]}" \
        -gencode arch=compute_80,code=sm_80 -gencode "arch=compute_90,code=[sm_90,compute_90]" \
        -o "$tmp/$name.fatbin" "$cu"; then
        echo "FAILED: $name.cu (if ptxas said 'Unsupported .version': nvidia-nvvm does not match nvcc 13.0;" \
            "use .ci/install-nvcc.sh)" >&2
        status=1
        continue
    fi
    ptx="$tmp/$name.keep/$name.compute_90.ptx"
    if [[ ! -f "$ptx" ]]; then
        echo "FAILED: $name.cu: nvcc kept no compute_90 PTX at $ptx" >&2
        status=1
        continue
    fi
    ptx_version="$(grep -m1 '^\.version' "$ptx" | awk '{print $2}')"
    if [[ "$ptx_version" != "9.0" ]]; then
        echo "FAILED: $name.cu: PTX ISA $ptx_version, expected 9.0 (mismatched nvidia-nvvm?)" >&2
        status=1
        continue
    fi
    echo "   ok (PTX ISA $ptx_version; $((SECONDS - t0)) s)"
done

if [[ $emu == 1 ]]; then
    cxx="${CXX:-g++}"
    # One job per program and build: with the race check, and under AddressSanitizer (harness.h
    # poisons the guard bytes around every buffer, so a kernel that reads outside its buffers fails
    # there; the other build sees only writes outside them) with UBSan's alignment check (a vector
    # pack at an address its size does not divide, which x86 reads but a GPU faults on, fails there
    # too). A job builds and runs one program on one core, so the jobs run side by side, one per
    # core; each job's output is printed whole once all have ended, in a fixed order.
    emu_job() {  # emu_job SRC MODE: output to $tmp/<name>.<mode>.log, exit status to .rc
        local src="$1" mode="$2" name out bin rc=0
        name="$(basename "$src" .cpp)"
        out="$tmp/$name.$mode"
        bin="$tmp/${name}_$mode"
        local t0=$SECONDS
        {
            if [[ $mode == race ]]; then
                echo "== emu/$name.cpp: kernels on the CPU emulator, with the race check"
                # -U_FORTIFY_SOURCE: the emulator switches stacks with _longjmp, which fortified
                # glibc refuses. -fsanitize=thread only instruments (compile step): racecheck.h
                # defines the hooks it calls, so the link step leaves libtsan out.
                if ! "$cxx" -std=c++17 -O2 -U_FORTIFY_SOURCE -Wall -Wno-unknown-pragmas -DLMKERN_EMU \
                    -fsanitize=thread --param=tsan-instrument-func-entry-exit=0 \
                    "${inc[@]}" -I "$here" -c -o "$bin.o" "$src" || ! "$cxx" -o "$bin" "$bin.o" -ldl; then
                    echo "FAILED: emu/$name.cpp does not build with the race check"
                    rc=1
                elif ! "$bin"; then
                    echo "FAILED: emu/$name"
                    rc=1
                fi
            else
                echo "== emu/$name.cpp: the same under AddressSanitizer and UBSan's alignment check"
                if ! "$cxx" -std=c++17 -O1 -g -fsanitize=address,alignment -fno-sanitize-recover=alignment \
                    -fno-omit-frame-pointer -U_FORTIFY_SOURCE \
                    -Wall -Wno-unknown-pragmas -DLMKERN_EMU "${inc[@]}" -I "$here" -o "$bin" "$src" -ldl; then
                    echo "FAILED: emu/$name.cpp does not build with -fsanitize=address,alignment"
                    rc=1
                else
                    # ASan warns that it does not fully support the emulator's makecontext
                    # coroutines; those warning lines are dropped.
                    ASAN_OPTIONS=detect_leaks=0 "$bin" 2>"$out.err" || rc=$?
                    grep -v -e "ASan doesn't fully support makecontext" \
                        -e "ASan is ignoring requested __asan_handle_no_return" \
                        -e "False positive error reports may follow" -e "google/sanitizers/issues/189" \
                        "$out.err" || true
                    if [[ $rc != 0 ]]; then
                        echo "FAILED: emu/$name under AddressSanitizer / UBSan alignment"
                        rc=1
                    fi
                fi
            fi
            echo "   ($((SECONDS - t0)) s to build and run)"
        } >"$out.log" 2>&1
        echo "$rc" >"$out.rc"
    }
    cores="$(nproc 2>/dev/null || echo 1)"
    sources=("$here"/emu/*_emu.cpp)
    # Each program's two builds one after the other: norm_emu's (the longest) start first.
    for src in "${sources[@]}"; do
        for mode in race asan; do
            while (( $(jobs -rp | wc -l) >= cores )); do
                wait -n || true
            done
            emu_job "$src" "$mode" &
        done
    done
    wait
    for mode in race asan; do
        for src in "${sources[@]}"; do
            out="$tmp/$(basename "$src" .cpp).$mode"
            cat "$out.log"
            if [[ "$(cat "$out.rc" 2>/dev/null)" != 0 ]]; then
                status=1
            fi
        done
    done
fi
exit $status
