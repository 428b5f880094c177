#!/usr/bin/env bash
# Install the pinned nvcc 13.0 toolchain from PyPI into $REPO/.toolchain/nvcc (gitignored), where
# rust/core/build.rs and cuda/check.sh look for it: $REPO/.toolchain/nvcc/nvidia/cu13/bin/nvcc.
#
# The pins matter: unpinned nvidia-nvvm / nvidia-cuda-crt resolve to 13.5, whose PTX ISA 9.5 the
# GPU machines' 13.0 driver (and nvcc 13.0's own ptxas) rejects. Idempotent: does nothing when the
# toolchain is already there and works.
#
# Usage: .ci/install-nvcc.sh        (env PYTHON: the interpreter whose pip to use; default python3)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/.toolchain/nvcc"
nvcc="$dest/nvidia/cu13/bin/nvcc"
python="${PYTHON:-python3}"

packages=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)

works() {
    [[ -x "$nvcc" ]] \
        && "$nvcc" --version 2>/dev/null | grep -q "release 13\.0," \
        && [[ -f "$dest/nvidia/cu13/include/cuda_bf16.h" ]] \
        && [[ -d "$dest/nvidia/cu13/nvvm" ]]
}

if works; then
    echo "nvcc 13.0 toolchain already at $dest"
    exit 0
fi

# Install into a fresh directory next to the destination, then move it in place, so an
# interrupted install never leaves a half toolchain where the build would find it.
mkdir -p "$repo/.toolchain"
staging="$(mktemp -d "$repo/.toolchain/nvcc.staging.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
"$python" -m pip install --disable-pip-version-check --no-deps --no-compile --target "$staging" "${packages[@]}"
rm -rf "$dest"
mv "$staging" "$dest"
trap - EXIT

if ! works; then
    echo "install-nvcc.sh: installed into $dest but $nvcc does not work" >&2
    exit 1
fi
echo "installed: $("$nvcc" --version | grep -oE 'V[0-9]+\.[0-9.]+' | head -1) at $nvcc"
