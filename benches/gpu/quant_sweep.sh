#!/usr/bin/env bash
# PowerQuantLinear on a GPU machine, in one short call (after benches/gpu/prepare.sh built dist/):
#   run(command="bash benches/gpu/quant_sweep.sh", carry=["dist"])
# installs the newest dist/lmkern-*.whl, runs the quantization tests under the `cuda` marker (the
# cp.async linear's among them), then benches/gpu/tune_quant.py for the default kernels (with the
# dense bf16 peer and the read floors); for the cp.async linear (LMKERN_CUDA_QUANT_TUNE=lin=async:
# 1 and 2 tokens take it), and once more launched with PDL (pdl=1); for the tuning variants of
# rust/core/src/quant/cuda.rs (TILE_VARIANTS) not yet settled, each on the cases of its own token
# tile (11-14: the streamed kernel, linear_stream; 16-17: other shapes of the cp.async kernel; 1:
# table-last A/B), with the linear tests under variant 11; then the quant tests and the timings
# with the tiled dequantizer (deq=tiled). Most wanted first, in case the call runs out
# of time. About 4 minutes. Output:
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
    # The cp.async linear (off by default until this run has checked it; the tests above ran it,
    # with and without PDL, in test_linear_async_kernel): the timings of every case (1 and 2
    # tokens take it).
    echo "== LMKERN_CUDA_QUANT_TUNE=lin=async"
    LMKERN_CUDA_QUANT_TUNE="lin=async" timeout -k 5 40 "$PY" benches/gpu/tune_quant.py || echo "lin=async: rc=$?"
    # The same launched with programmatic dependent launch (each call's first codes into L2 while
    # the call before it finishes; its correctness test ran in the tests above).
    LMKERN_CUDA_QUANT_TUNE="lin=async,pdl=1" timeout -k 5 40 "$PY" benches/gpu/tune_quant.py --peer --tokens 1,2 || echo "pdl: rc=$?"
    for v in 11 12 13 16 17 1; do
        LMKERN_CUDA_QUANT_TUNE="variant=$v" timeout -k 5 40 "$PY" benches/gpu/tune_quant.py --tokens 1 || echo "variant $v: rc=$?"
    done
    LMKERN_CUDA_QUANT_TUNE="variant=14" timeout -k 5 40 "$PY" benches/gpu/tune_quant.py --tokens 2 || echo "variant 14: rc=$?"
    # The streamed kernel's first run on hardware: the linear tests under one of its variants.
    for v in 11; do
        echo "== LMKERN_CUDA_QUANT_TUNE=variant=$v: linear tests"
        LMKERN_CUDA_QUANT_TUNE="variant=$v" timeout -k 5 60 "$PY" -m pytest -m cuda -q -x -p no:cacheprovider \
            -k "linear" tests/test_quant_cuda.py 2>&1 | tail -5
    done
    # The tiled dequantizer (off by default until this run has checked it): the quant tests again
    # with it, then the timings (the 16-token case is the dequantizer + cuBLAS).
    echo "== LMKERN_CUDA_QUANT_TUNE=deq=tiled"
    LMKERN_CUDA_QUANT_TUNE="deq=tiled" timeout -k 5 120 "$PY" -m pytest -m cuda -q -x -p no:cacheprovider \
        tests/test_quant_cuda.py 2>&1 | tail -15
    LMKERN_CUDA_QUANT_TUNE="deq=tiled" timeout -k 5 40 "$PY" benches/gpu/tune_quant.py || echo "deq=tiled: rc=$?"
} 2>&1 | tee "$RESULTS/quant_sweep.log"
