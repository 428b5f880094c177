#!/usr/bin/env bash
# PowerQuantLinear on a GPU machine, in one short call (after benches/gpu/prepare.sh built dist/):
#   run(command="bash benches/gpu/quant_sweep.sh", carry=["dist"])
# installs the newest dist/lmkern-*.whl, runs the quantization tests under the `cuda` marker, then
# benches/gpu/tune_quant.py for the default kernels (with the dense bf16 peer) and for each tuning
# variant of rust/core/src/quant/cuda.rs (TILE_VARIANTS), then the quant tests and timings once more
# with the tiled dequantizer (LMKERN_CUDA_QUANT_TUNE=deq=tiled). About 2.5 minutes. Output:
# $OUT/quant_sweep.log (or benches/results/quant_sweep.log).
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
    for v in 1 2 3 4 5 6 7 8 9 10; do
        LMKERN_CUDA_QUANT_TUNE="variant=$v" timeout -k 5 40 "$PY" benches/gpu/tune_quant.py || echo "variant $v: rc=$?"
    done
    # The tiled dequantizer (off by default until this run has checked it): the quant tests again
    # with it, then the timings (the 16-token case is the dequantizer + cuBLAS).
    echo "== LMKERN_CUDA_QUANT_TUNE=deq=tiled"
    LMKERN_CUDA_QUANT_TUNE="deq=tiled" timeout -k 5 120 "$PY" -m pytest -m cuda -q -x -p no:cacheprovider \
        tests/test_quant_cuda.py 2>&1 | tail -15
    LMKERN_CUDA_QUANT_TUNE="deq=tiled" timeout -k 5 40 "$PY" benches/gpu/tune_quant.py || echo "deq=tiled: rc=$?"
} 2>&1 | tee "$RESULTS/quant_sweep.log"
