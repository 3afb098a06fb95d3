#!/usr/bin/env bash
# Download, on a machine with package-registry access, the wheels the lent GPU machine
# lacks (diffusers and importlib_metadata, for its Python 3.12) into ./.whl, where
# tools/gpu_bench.sh and tools/gpu_check.sh install them from. .whl/ is git-ignored.
#
#   tools/fetch_gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYVER="${1:-3.12}"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers importlib_metadata
ls -1 .whl
