#!/usr/bin/env bash
# PowerQuantLinear across token counts on a GPU machine, in one short call (after
# benches/gpu/prepare.sh built dist/):
#   run(command="bash benches/gpu/quant_tokens.sh", carry=["dist"], timeout_s=300)
# installs the newest dist/lmkern-*.whl, then benches/gpu/tune_quant.py (every output checked
# against the float64 product; bf16 4-bit g128): the default kernels through the op (the tensor-core
# one from 3 tokens, the fused path up to 32 tokens there), with the dense bf16 peer, at 1-33
# tokens and on the 14336 shapes at 1, 8 and 16; the same without PDL (pdl=0); the tensor-core
# kernel at 2 and 64 tokens (--direct: past the op's GEMV limit); the tiled kernel at 3-4 tokens
# (mma=0); then the quantization tests under the `cuda` marker; last, where Nsight Compute (ncu) is
# installed, a full profile of the 1-token tiled kernel and the 8-token tensor-core kernel at 4096²
# (QUANT_NCU=0 skips it). About 2.5 minutes.
# Output: $OUT/quant_tokens.log (or benches/results/quant_tokens.log), and ncu_*.txt beside it.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
RESULTS=${OUT:-benches/results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
tune() { # tune SETTINGS FLAGS...: tune_quant.py under LMKERN_CUDA_QUANT_TUNE=SETTINGS
    local s=$1
    shift
    echo "[$(date -u +%T)] ${s:-default} $*"
    LMKERN_CUDA_QUANT_TUNE="$s" timeout -k 5 90 "$PY" benches/gpu/tune_quant.py "$@" 2>&1 | grep -v "profiler\|_warn_once" || echo "$s: rc=$?"
}
S=4096x4096
{
    echo "lmkern quant tokens: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); wheel $(ls -t dist/lmkern-*.whl | head -n 1)"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    whl=$(ls -t dist/lmkern-*.whl | head -n 1)
    "$PY" -m pip install -q --no-deps --no-index --force-reinstall --no-cache-dir "$whl" || echo "install failed"
    tune "" --peer --cases "${S}x1,${S}x2,${S}x3,${S}x4,${S}x8,${S}x16,${S}x32,${S}x33,14336x4096x1,4096x14336x1,14336x4096x8,4096x14336x8,14336x4096x16,4096x14336x16"
    tune "pdl=0" --cases "${S}x1,${S}x8,${S}x16,4096x14336x1"
    tune "mma=1,pdl=1" --direct --cases "${S}x2,${S}x64"
    tune "mma=0" --cases "${S}x3,${S}x4"
    echo "[$(date -u +%T)] tests"
    timeout -k 5 150 "$PY" -m pytest -m cuda -q -x -p no:cacheprovider tests/test_quant_cuda.py 2>&1 | tail -15
    NCU=""
    [ "${QUANT_NCU:-1}" = 0 ] || NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    if [ -n "$NCU" ]; then
        echo "[$(date -u +%T)] ncu: $NCU"
        timeout -k 5 60 "$NCU" --kernel-name regex:quant_lintile4 --launch-skip 3 --launch-count 1 --set full \
            "$PY" benches/gpu/profile_quant.py --tokens 1 > "$RESULTS/ncu_lintile4_n1.txt" 2>&1
        echo "ncu tiled n1: rc=$? ($(wc -l < "$RESULTS/ncu_lintile4_n1.txt") lines)"
        timeout -k 5 60 "$NCU" --kernel-name regex:quant_linmma4 --launch-skip 3 --launch-count 1 --set full \
            "$PY" benches/gpu/profile_quant.py --tokens 8 > "$RESULTS/ncu_linmma4_n8.txt" 2>&1
        echo "ncu mma n8: rc=$? ($(wc -l < "$RESULTS/ncu_linmma4_n8.txt") lines)"
    else
        echo "no ncu run (QUANT_NCU=0, or none on this machine)"
    fi
    echo "[$(date -u +%T)] done"
} 2>&1 | tee "$RESULTS/quant_tokens.log"
