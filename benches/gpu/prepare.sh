#!/usr/bin/env bash
# Run HERE (the CPU machine, with network) before a GPU session: everything check.sh needs on the
# GPU machine, which has no network, into dist/ (gitignored), to be carried with the run:
#
#   bash benches/gpu/prepare.sh          then   run(command="bash benches/gpu/check.sh", carry=["dist"])
#
# 1. dist/lmkern-*.whl   the abi3 wheel with the CUDA kernels (nvcc 13.0 from .ci/install-nvcc.sh;
#                         LMKERN_REQUIRE_CUDA=1 makes the build fail rather than drop them)
# 2. dist/wheels/        cp312 wheels of `transformers` and its dependencies, so that the Hugging
#                         Face model tests under the `cuda` marker (tests/test_convert.py) run there
#                         instead of skipping. numpy and torch are left out: the GPU machine has them.
# The carry limit is 64 MiB in all; the sizes are printed at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}

bash .ci/install-nvcc.sh
rm -f dist/lmkern-*.whl
LMKERN_NVCC="$ROOT/.toolchain/nvcc/nvidia/cu13/bin/nvcc" LMKERN_REQUIRE_CUDA=1 \
    "$PY" -m maturin build --release -o dist

rm -rf dist/wheels
"$PY" -m pip download "transformers>=5" -d dist/wheels -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any
rm -f dist/wheels/numpy-*.whl dist/wheels/torch-*.whl

du -sh dist/lmkern-*.whl dist/wheels
du -sh dist
