#!/usr/bin/env bash
# Instruction counts of compiled kernels, without a GPU: compiles a cuda/*.cu file with the pinned
# nvcc (.ci/install-nvcc.sh) for one architecture, disassembles it (cuobjdump + nvdisasm from PyPI,
# installed on first use into $REPO/.toolchain/sass, gitignored) and prints, per kernel whose name
# matches the pattern, ptxas's registers and spills and the static count of SASS instructions with
# the count of some opcodes. Static counts, not timings: how the "sm_90 SASS counts" in
# BENCHMARKS.md and in cuda/quant.cu's comments are made.
#
# Usage: cuda/sass.sh [PATTERN [FILE [ARCH]]]     defaults: 'linmma' cuda/quant.cu sm_90
#        SASS_OPS="HMMA LDS ..." to choose the opcodes counted; SASS_DUMP=dir to keep each
#        kernel's disassembly in dir/<kernel>.sass.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pattern="${1:-linmma}"
file="${2:-$repo/cuda/quant.cu}"
arch="${3:-sm_90}"
ops="${SASS_OPS:-HMMA FFMA LDS STS LDG BAR PRMT SHF LOP3 IADD3 IMAD STL LDL}"
python="${PYTHON:-python3}"

nvcc="$repo/.toolchain/nvcc/nvidia/cu13/bin/nvcc"
[[ -x "$nvcc" ]] || bash "$repo/.ci/install-nvcc.sh" >&2
tools="$repo/.toolchain/sass"
bin="$tools/nvidia/cu13/bin"
if [[ ! -x "$bin/cuobjdump" || ! -x "$bin/nvdisasm" ]]; then
    "$python" -m pip install -q --target "$tools" --no-deps nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86 >&2
fi
export PATH="$bin:$PATH"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$nvcc" -std=c++17 -O3 -arch="$arch" -cubin -Xptxas -v -I "$repo/cuda" -o "$work/k.cubin" "$file" 2>"$work/ptxas.txt"

# ptxas -v: "Compiling entry function 'K'", then its spills and its registers.
declare -A regs spills
current=""
while IFS= read -r line; do
    if [[ "$line" =~ Compiling\ entry\ function\ \'([^\']+)\' ]]; then
        current="${BASH_REMATCH[1]}"
    elif [[ -n "$current" && "$line" =~ ([0-9]+)\ bytes\ spill\ stores ]]; then
        spills[$current]="${BASH_REMATCH[1]}"
    elif [[ -n "$current" && "$line" =~ Used\ ([0-9]+)\ registers ]]; then
        regs[$current]="${BASH_REMATCH[1]}"
    fi
done <"$work/ptxas.txt"

cuobjdump -sass "$work/k.cubin" >"$work/all.sass"
kernels=$(grep -oE "Function : [A-Za-z0-9_]+" "$work/all.sass" | cut -d' ' -f3 | grep -E "$pattern" | sort || true)
[[ -n "$kernels" ]] || { echo "cuda/sass.sh: no kernel of $file matches '$pattern'" >&2; exit 1; }
printf "%-36s %5s %6s %6s" kernel regs spill instr
for op in $ops; do printf " %5s" "$op"; done
echo
for k in $kernels; do
    # The kernel's instructions: lines "/*addr*/ OPCODE ..." between its header and the next one.
    awk -v k="$k" '/Function : /{on = ($3 == k)} on && /^[[:space:]]+\/\*[0-9a-f]+\*\//' "$work/all.sass" >"$work/k.sass"
    [[ -z "${SASS_DUMP:-}" ]] || { mkdir -p "$SASS_DUMP"; cp "$work/k.sass" "$SASS_DUMP/$k.sass"; }
    printf "%-36s %5s %6s %6s" "$k" "${regs[$k]:-?}" "${spills[$k]:-0}" "$(wc -l <"$work/k.sass")"
    for op in $ops; do
        # the opcode, with or without a predicate and a modifier suffix
        printf " %5s" "$(grep -cE "\*/[[:space:]]+(@!?U?P[0-9T] +)?$op(\.|[[:space:]])" "$work/k.sass" || true)"
    done
    echo
done
