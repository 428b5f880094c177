#!/usr/bin/env bash
# Launch-shape sweep of the CUDA norm kernels (kernel-only timings, one process per setting since the
# setting is read once per process). Run after check.sh has installed the wheel:
#   bash benches/gpu/sweep.sh            -> $OUT/sweep.log (or benches/results/sweep.log)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
RESULTS=${OUT:-benches/results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
{
    echo "lmkern norm launch-shape sweep: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    first=1
    for tune in "" \
        "bwd_block=1024" "bwd_vpt=2" "bwd_vpt=2,bwd_block=1024" "bwd_vpt=2,bwd_block=512" \
        "fwd_vpt=1" "fwd_vpt=4" "fwd_block=512" "fwd_block=1024"; do
        extra=()
        [ $first = 1 ] && extra=(--profile) && first=0
        LMKERN_CUDA_NORM_TUNE="$tune" timeout -k 5 40 "$PY" benches/gpu/tune_norm.py "${extra[@]}" \
            || echo "tune '$tune': rc=$?"
    done
} 2>&1 | tee "$RESULTS/sweep.log"
