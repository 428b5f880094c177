#!/usr/bin/env bash
# PowerQuantLinear on a GPU machine, in one short call (after benches/gpu/prepare.sh built dist/):
#   run(command="bash benches/gpu/quant_sweep.sh", carry=["dist"], timeout_s=480)
# installs the newest dist/lmkern-*.whl, then benches/gpu/tune_quant.py (which checks every output
# against the float64 product): the default kernels (PDL where a row is one pass,
# rust/core/src/quant/cuda.rs, pdl_by_default) with the dense bf16 peer and cuBLAS on the codes'
# bytes; the staged kernel (staged=1, variants 31-32: codes by cp.async in groups of rows, each
# group's lookups as soon as it has landed; with and without PDL); the tensor-core kernel (mma=1,
# 1-16 tokens through _fused_gemv, without and with PDL); then the quantization tests under the
# `cuda` marker (among them the linear under each of these tunings, test_linear_tuned_launch); then
# the staged kernel with PDL everywhere and with a grid of one block per SM, the default kernel's
# two 8-token tiles at 16 tokens, and, with PDL, the launches that leave room on every SM for the
# next kernel's blocks (blocks of 128 threads: variants 24-26; blocks_per_sm=1), the codebooks by
# cp.async (28, 29), the bulk prefetch (25, 27) and the other prefetches (21-23); last, the other
# tests under the `cuda` marker. Most wanted first, in case the call runs out of time. The staged and
# tensor-core lines carry the dense peer too (--peer), so their ratios stand on any card. About 7
# minutes; everything up to the tests about 2.5. Output: $OUT/quant_sweep.log (or
# benches/results/quant_sweep.log), written as it goes.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
RESULTS=${OUT:-benches/results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
tune() { # tune SETTINGS TOKENS [FLAGS]: tune_quant.py under LMKERN_CUDA_QUANT_TUNE=SETTINGS
    echo "[$(date -u +%T)] $1"
    LMKERN_CUDA_QUANT_TUNE="$1" timeout -k 5 60 "$PY" benches/gpu/tune_quant.py --tokens "$2" ${3:-} || echo "$1: rc=$?"
}
{
    echo "lmkern quant sweep: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); wheel $(ls -t dist/lmkern-*.whl | head -n 1)"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    whl=$(ls -t dist/lmkern-*.whl | head -n 1)
    "$PY" -m pip install -q --no-deps --no-index --force-reinstall --no-cache-dir "$whl" || echo "install failed"
    timeout -k 5 60 "$PY" benches/gpu/tune_quant.py --peer || echo "default: rc=$?"
    tune "staged=1" 1,2 --peer
    tune "staged=1,pdl=0" 1,2
    tune "variant=31,pdl=1" 1
    tune "variant=32,pdl=1" 1
    tune "mma=1" 1,2,4,8,16 "--direct --peer"
    tune "mma=1,pdl=1" 1,2 --direct
    echo "[$(date -u +%T)] tests"
    timeout -k 5 200 "$PY" -m pytest -m cuda -q -x -p no:cacheprovider tests/test_quant_cuda.py 2>&1 | tail -15
    tune "staged=1,pdl=1" 1
    tune "staged=1,blocks_per_sm=1,pdl=1" 1
    tune "pdl=0" 16 --direct
    tune "variant=24,pdl=1" 1
    tune "variant=28,pdl=1" 1
    tune "variant=29,pdl=1" 1
    tune "blocks_per_sm=1,pdl=1" 1
    tune "variant=25,pdl=1" 1
    tune "variant=22,pdl=1" 1
    tune "variant=28,pdl=0" 1
    tune "variant=27,pdl=1" 1
    tune "variant=26,pdl=1" 2
    tune "variant=21,pdl=1" 1
    tune "variant=23,pdl=1" 1
    echo "[$(date -u +%T)] the other tests under the cuda marker"
    timeout -k 5 150 "$PY" -m pytest -m cuda -q -p no:cacheprovider --maxfail=25 tests --ignore=tests/test_quant_cuda.py 2>&1 | tail -15
    echo "[$(date -u +%T)] done"
} 2>&1 | tee "$RESULTS/quant_sweep.log"
