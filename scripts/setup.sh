#!/usr/bin/env bash
# Create .venv and install the project with every step explicit.
# torch is installed FIRST and on its own: a plain dependency resolution would pull the
# multi-GB CUDA build. Here `torch==2.13.0` resolves to the CPU build; elsewhere set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (or a CUDA index) to choose the build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else "Python 3.11 or 3.12 is required")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/python -c 'import torch, monai, SimpleITK, pydicom, prefect; print("installed: torch", torch.__version__, "| monai", monai.__version__, "| SimpleITK", SimpleITK.Version_VersionString(), "| prefect", prefect.__version__)'
