#!/usr/bin/env bash
# The one command run on a GPU machine (H100/H200, Python 3.12, torch 2.11 + CUDA 13.0, no network):
#
#   bash benches/gpu/check.sh [path/to/lmkern-*.whl]
#
# 1. install  the prebuilt abi3 wheel (default: the newest dist/lmkern-*.whl) with
#             pip install --no-deps --no-index --force-reinstall, and, when dist/wheels/ holds them,
#             the test-only wheels (transformers and its dependencies) that benches/gpu/prepare.sh
#             downloaded, so that the Hugging Face tests run instead of skipping
# 2. info     nvidia-smi, torch, lmkern (`lmkern info`) and lmkern.cuda_status()
# 3. tests    python -m pytest -m cuda -q -x tests                     (under `timeout`)
# 4. timings  python benches/gpu/timings.py                             (under `timeout`)
#             (if an lmkern kernel faults and breaks the CUDA context, rc 3: then once more with
#             --impls torch,compiled, so the copy bandwidth and the peers are still measured)
# 5. bench    lmkern bench --device cuda --quick                        (under `timeout`)
#
# Every step runs whatever the previous ones returned; each one's exit status is recorded and a
# summary printed at the end (rc 124: killed by its timeout; rc 5 from pytest: no test collected).
# The whole output goes to $OUT/check.log when OUT is set, else benches/results/check.log, next to
# gpu_timings.json and lmkern_bench_cuda.json. About 7 minutes at most. Exit status: 0 when every
# step returned 0, else 1. PYTHON overrides the interpreter (default python3).
set -u
set -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
RESULTS=${OUT:-$ROOT/benches/results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHONUNBUFFERED=1
WHEEL=${1:-}

# Time limits (seconds) per step; the sum stays under ~7 minutes.
T_INSTALL=60
T_INFO=60
T_TESTS=180
T_TIMINGS=170   # timings.py stops compiling peers past --budget, and starts no case past 1.5x
T_BENCH=60
T_PEERS=150     # only when lmkern broke the CUDA context in `timings`: the peers alone

NAMES=()
RCS=()
SECS=()

step() { # step NAME COMMAND...: run it, record its exit status and duration, never stop the script
    local name=$1
    shift
    local t0=$SECONDS
    echo
    echo "=================== $name: $*"
    "$@"
    local rc=$?
    NAMES+=("$name")
    RCS+=("$rc")
    SECS+=($((SECONDS - t0)))
    echo "------------------- $name: rc=$rc ($((SECONDS - t0)) s)"
    return 0
}

install_wheel() {
    local whl=$WHEEL
    if [ -z "$whl" ]; then
        whl=$(ls -t "$ROOT"/dist/lmkern-*.whl 2>/dev/null | head -n 1)
    fi
    if [ -z "$whl" ] || [ ! -f "$whl" ]; then
        echo "no wheel given and none in dist/ (lmkern-*.whl): the steps below use whatever lmkern is installed"
        return 1
    fi
    echo "wheel: $whl"
    timeout -k 5 "$T_INSTALL" "$PY" -m pip install --no-deps --no-index --force-reinstall --no-cache-dir "$whl" \
        || timeout -k 5 "$T_INSTALL" "$PY" -m pip install --no-deps --no-index --force-reinstall --no-cache-dir \
            --break-system-packages "$whl" || return 1
    if ls "$ROOT"/dist/wheels/transformers-*.whl >/dev/null 2>&1; then
        # Test-only; a failure here only makes the Hugging Face tests skip, as without the wheels.
        echo "test wheels: transformers from dist/wheels"
        timeout -k 5 "$T_INSTALL" "$PY" -m pip install --no-index --find-links "$ROOT/dist/wheels" -q transformers \
            || timeout -k 5 "$T_INSTALL" "$PY" -m pip install --no-index --find-links "$ROOT/dist/wheels" -q \
                --break-system-packages transformers \
            || echo "test wheels: install failed (the Hugging Face tests will skip)"
    fi
}

info() {
    local rc=0
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || rc=1
    # Run from outside the source tree, so the installed lmkern is the one imported.
    (cd /tmp && timeout -k 5 "$T_INFO" "$PY" - <<'EOF') || rc=1
import platform, torch
print(f"python {platform.python_version()}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
import lmkern
print(f"lmkern {lmkern.__version__} from {lmkern.__file__}")
print(f"lmkern.cuda_status(): {lmkern.cuda_status()!r}   (None = lmkern's CUDA kernels run here)")
EOF
    (cd /tmp && timeout -k 5 "$T_INFO" "$PY" -m lmkern.cli info) || rc=1
    return $rc
}

tests() {
    if [ ! -d tests ]; then
        echo "no tests/ folder"
        return 1
    fi
    timeout -k 10 "$T_TESTS" "$PY" -m pytest -m cuda -q --maxfail=25 -p no:cacheprovider tests
}

timings() {
    timeout -k 10 "$T_TIMINGS" "$PY" benches/gpu/timings.py --budget 110
}

timings_peers() {
    timeout -k 10 "$T_PEERS" "$PY" benches/gpu/timings.py --impls torch,compiled --budget 90
}

bench() {
    (cd /tmp && timeout -k 10 "$T_BENCH" "$PY" -m lmkern.cli bench --device cuda --quick --no-progress \
        --json "$RESULTS/lmkern_bench_cuda.json")
}

main() {
    local t0=$SECONDS
    echo "lmkern GPU check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname); repo $ROOT"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
    step install install_wheel
    step info info
    step tests tests
    step timings timings
    if [ "${RCS[${#RCS[@]}-1]}" -eq 3 ]; then
        # An lmkern kernel faulted and broke the CUDA context: still measure the copy bandwidth and peers.
        step peers timings_peers
    fi
    step bench bench

    echo
    echo "=================== summary ($((SECONDS - t0)) s)"
    local failed=0 i status
    printf '%-8s %5s %6s  %s\n' step rc secs status
    for i in "${!NAMES[@]}"; do
        case ${RCS[$i]} in
            0) status=ok ;;
            124 | 137) status="FAILED (timeout)" ;;
            5) status="FAILED (pytest: no test collected)" ;;
            3) status="FAILED (an lmkern kernel broke the CUDA context)" ;;
            *) status=FAILED ;;
        esac
        [ "${RCS[$i]}" -eq 0 ] || failed=1
        printf '%-8s %5s %6s  %s\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "$status"
    done
    echo "results: $RESULTS (check.log, gpu_timings*.json, lmkern_bench_cuda.json)"
    return $failed
}

main 2>&1 | tee "$RESULTS/check.log"
exit "${PIPESTATUS[0]}"
