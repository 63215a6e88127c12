#!/usr/bin/env bash
# Create .venv and install lorakit with its test extras. Torch is installed first, pinned, so that pip
# never resolves a different (multi-GB) build through another package's dependency on torch.
# Override the torch requirement with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0+cu128" with your index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,bench,serve,ray,quantize,federated,diffusion,recipes]"
