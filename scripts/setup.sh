#!/usr/bin/env bash
# Set up a virtual environment in .venv with splitlearn and its dependencies.
#   bash scripts/setup.sh          # runtime dependencies
#   bash scripts/setup.sh --dev    # plus pytest, ruff, mypy
# torch is installed first, pinned (SPLITLEARN_TORCH, default torch==2.13.0), so that the
# looser range in pyproject.toml never pulls a CUDA build onto a CPU-only machine. To take
# torch from another index, set SPLITLEARN_TORCH_INDEX (e.g. the PyTorch CPU wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${SPLITLEARN_TORCH:-torch==2.13.0}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "splitlearn needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pip_q() { "$VPY" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_q --upgrade pip setuptools wheel
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if [ -n "${SPLITLEARN_TORCH_INDEX:-}" ]; then
    pip_q "$TORCH_SPEC" --index-url "$SPLITLEARN_TORCH_INDEX"
  else
    pip_q "$TORCH_SPEC"
  fi
fi
pip_q -e ".$extras"
"$VPY" -c "import torch, ray, deepspeed, transformers, omegaconf; print('splitlearn environment ready: torch', torch.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__)" 2>&1 | grep -v "^\[" | tail -1
