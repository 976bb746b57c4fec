#!/usr/bin/env bash
# Create or reuse the virtual environment .venv, install torch first, then this package with its extras.
#
# torch comes first because a plain "torch" requirement resolves to a large CUDA build on Linux. Set TORCH_SPEC
# to the build you want, for example
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
# torch is installed only when .venv has none, so remove .venv before switching builds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options such as --index-url
    .venv/bin/python -m pip install --quiet $TORCH_SPEC
fi
.venv/bin/python -m pip install --quiet -e ".[dev,translation]"

# The Hub tests serve models through olah, a Hub-compatible server. olah 0.5.4 pins an older psutil than the
# project's other dependencies, so it gets a virtual environment of its own.
if [ ! -x .venv-olah/bin/olah-cli ]; then
    "$PYTHON" -m venv .venv-olah
    .venv-olah/bin/python -m pip install --quiet olah==0.5.4
fi
.venv/bin/python -c "import torch, transformers, nvc_hf; print(f'nvc_hf {nvc_hf.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
