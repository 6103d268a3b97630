#!/usr/bin/env bash
# Creates (once) the project venv: torch 2.13.0 (CPU build) first, so nothing can pull CUDA wheels, then MicroVLM
# with the exact versions of requirements-pinned.txt. Usage: source scripts/setup_venv.sh  → sets $PY.
set -euo pipefail
VENV=${VENV:-.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -c requirements-pinned.txt -e ".[test,cc12m,photos,meteor]"
fi
# A venv made before ruff joined the test extras gets it at the pinned version.
"$VENV/bin/python" -m ruff --version >/dev/null 2>&1 || "$VENV/bin/pip" install -q -c requirements-pinned.txt ruff
PY="$VENV/bin/python"
