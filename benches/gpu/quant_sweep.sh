#!/usr/bin/env bash
# PowerQuantLinear on a GPU machine, in one short call (after benches/gpu/prepare.sh built dist/):
#   run(command="bash benches/gpu/quant_sweep.sh", carry=["dist"], timeout_s=590)
# installs the newest dist/lmkern-*.whl, then benches/gpu/tune_quant.py (which checks every output
# against the float64 product): the default kernels (rust/core/src/quant/cuda.rs: PDL per shape, the
# tensor-core kernel from 3 tokens where it fits) with the dense bf16 peer and cuBLAS on the codes'
# bytes; the unmeasured variants (rust/core/src/quant/cuda.rs, TILE_VARIANTS): first the tensor-core
# kernels with lane-private pair tables (linear_mma_lp), 16 rows a block and 8: 58 and 59 (x in
# shared memory) at 1 token on the three shapes, 55 and 51 at 1-8 tokens at 4096² and at 1 token on
# both 14336 shapes, 56, 52 and 54 (other rings and blocks) at 1 and 8 tokens, 58, 55 and 51 without
# PDL, 57 and 53 at 16 and 32 tokens; the default at 1 token once more (drift); the quantization
# tests under the `cuda` marker (among them the linear under each tuning, test_linear_tuned_launch),
# and the other tests under the `cuda` marker (CUDA code no GPU has run yet, the norm kernels' _s16
# path among it); then the tiled kernel's variants: at 1 token 48 (row tiles by bulk copies, in
# chunks of 4 rows) at 4096² and both 14336 shapes, 50 (one chunk), 45 (specialized for in_features
# 4096 / g128, the sums through shared memory), 40 (the same without), 43 (TILE_UNIFORM and the
# shared-memory sums, every shape) at the three shapes, 47 (TILE_UNIFORM alone); at 2 tokens 49, 46,
# 41, 44; 42 (specialized for 14336 → 4096); 45 without PDL; the tensor-core kernel at 1-16 tokens
# (mma=1) and never (mma=0). (Without PDL, the variants of blocks of 128 threads (24-25) and a grid
# of one block per SM were measured in benches/results/2026-11-27-h200-9-quant-staged-mma.) Most
# wanted first, in case the call runs out of time (what ran is in the log). About 7 minutes (stop
# 16's sweep: ~10 s a tune line, ~1 min per test file set): with a machine's start, most of a
# session's 15 device minutes, so it is the session's one call. Output:
# $OUT/quant_sweep.log (or benches/results/quant_sweep.log), written as it goes.
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
    all="4096x4096x1,4096x4096x2,4096x4096x4,4096x4096x8,14336x4096x1,4096x14336x1"
    tune "variant=58" 1 "--peer --cases 4096x4096x1,14336x4096x1,4096x14336x1"
    tune "variant=59" 1 "--cases 4096x4096x1,14336x4096x1,4096x14336x1"
    tune "variant=55" 1,2,4,8 "--cases $all"
    tune "variant=51" 1,2,4,8 "--cases $all"
    tune "variant=56" 1,8 "--cases 4096x4096x1,4096x4096x8"
    tune "variant=52" 1,8 "--cases 4096x4096x1,4096x4096x8"
    tune "variant=54" 1,8 "--cases 4096x4096x1,4096x4096x8"
    tune "variant=58,pdl=0" 1 "--cases 4096x4096x1"
    tune "variant=55,pdl=0" 1 "--cases 4096x4096x1"
    tune "variant=51,pdl=0" 1 "--cases 4096x4096x1"
    tune "variant=57" 16,32 "--cases 4096x4096x16,4096x4096x32"
    tune "variant=53" 16,32 "--cases 4096x4096x16,4096x4096x32"
    tune "" 1 "--cases 4096x4096x1,14336x4096x1,4096x14336x1"
    echo "[$(date -u +%T)] tests"
    timeout -k 5 200 "$PY" -m pytest -m cuda -q --maxfail=10 -p no:cacheprovider tests/test_quant_cuda.py 2>&1 | tail -40
    # Before the older variants: these run the CUDA code no GPU has run yet (the norm kernels' _s16
    # path among them), which matters more than the timings below.
    echo "[$(date -u +%T)] the other tests under the cuda marker"
    timeout -k 5 150 "$PY" -m pytest -m cuda -q -p no:cacheprovider --maxfail=25 tests --ignore=tests/test_quant_cuda.py 2>&1 | tail -15
    tune "variant=48" 1 "--peer --cases 4096x4096x1,14336x4096x1,4096x14336x1"
    tune "variant=50" 1 "--cases 4096x4096x1"
    tune "variant=45" 1 "--cases 4096x4096x1"
    tune "variant=40" 1 "--cases 4096x4096x1"
    tune "variant=43" 1 "--peer --cases 4096x4096x1,14336x4096x1,4096x14336x1"
    tune "variant=47" 1 "--cases 4096x4096x1"
    tune "variant=49" 2 "--peer --cases 4096x4096x2"
    tune "variant=46" 2 "--cases 4096x4096x2"
    tune "variant=41" 2 "--cases 4096x4096x2"
    tune "variant=44" 2 "--cases 4096x4096x2,14336x4096x2"
    tune "variant=42" 1 "--cases 4096x14336x1"
    tune "variant=45,pdl=0" 1 "--cases 4096x4096x1"
    tune "mma=1" 1,2,4,8,16 "--direct --peer"
    tune "mma=0" 4,8
    echo "[$(date -u +%T)] done"
} 2>&1 | tee "$RESULTS/quant_sweep.log"
# The 1-, 2- and 8-token lines at 4096², fastest first (1 token: the issue's case), to pick a winner at a glance.
summary=$(for case in "W4096x4096 b1 " "W4096x4096 b2 " "W4096x4096 b8 "; do
    echo "== $case fastest first"
    grep -F "$case" "$RESULTS/quant_sweep.log" | awk '{for (i = 1; i <= NF; i++) if ($i == "lmkern") print $(i + 1), $0}' \
        | sort -n | cut -d' ' -f2- | head -n 16
done)
echo "$summary" | tee -a "$RESULTS/quant_sweep.log"
