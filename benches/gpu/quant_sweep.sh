#!/usr/bin/env bash
# PowerQuantLinear on a GPU machine, in one short call (after benches/gpu/prepare.sh built dist/):
#   run(command="bash benches/gpu/quant_sweep.sh", carry=["dist"])
# installs the newest dist/lmkern-*.whl, runs the quantization tests under the `cuda` marker (among
# them the tiled linear with and without PDL and under each tuning variant,
# test_linear_tuned_launch), then benches/gpu/tune_quant.py: the default kernels (PDL where a row is
# one pass, rust/core/src/quant/cuda.rs, pdl_by_default) with the dense bf16 peer and cuBLAS on the
# codes' bytes; never with PDL (pdl=0) and always (pdl=1), at 1 and 2 tokens; the tuning variants
# of rust/core/src/quant/cuda.rs (TILE_VARIANTS: other PDL prefetches) with PDL. Most wanted first,
# in case the call runs out of time. About 2.5 minutes. Output: $OUT/quant_sweep.log (or
# benches/results/quant_sweep.log).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
RESULTS=${OUT:-benches/results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
{
    echo "lmkern quant sweep: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); git $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    whl=$(ls -t dist/lmkern-*.whl | head -n 1)
    "$PY" -m pip install -q --no-deps --no-index --force-reinstall --no-cache-dir "$whl" || echo "install failed"
    timeout -k 5 120 "$PY" -m pytest -m cuda -q -x -p no:cacheprovider tests/test_quant_cuda.py 2>&1 | tail -15
    timeout -k 5 60 "$PY" benches/gpu/tune_quant.py --peer || echo "default: rc=$?"
    for pdl in 0 1; do
        LMKERN_CUDA_QUANT_TUNE="pdl=$pdl" timeout -k 5 40 "$PY" benches/gpu/tune_quant.py --tokens 1,2 || echo "pdl=$pdl: rc=$?"
    done
    for v in 21 22 23; do
        LMKERN_CUDA_QUANT_TUNE="variant=$v,pdl=1" timeout -k 5 30 "$PY" benches/gpu/tune_quant.py --tokens 1 || echo "variant $v, pdl: rc=$?"
    done
} 2>&1 | tee "$RESULTS/quant_sweep.log"
