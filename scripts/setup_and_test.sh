#!/usr/bin/env bash
# Fresh-machine setup + tests: the project venv (scripts/setup_venv.sh), ruff (lint, then format check), the whole
# suite, then a second venv with the lowest supported transformers (5.0.0) runs the tests marked `min_version`
# (remote code, generation, processor) again: 5.0 and 5.23 differ exactly there.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
source scripts/setup_venv.sh
"$PY" -m ruff check . && "$PY" -m ruff format --check .
"$PY" -m pytest -q tests

if [ "${SKIP_MIN_VERSION:-0}" != 1 ]; then
  VENV_MIN=${VENV_MIN:-.venv-transformers-5.0}
  if [ ! -x "$VENV_MIN/bin/python" ]; then
    python3 -m venv "$VENV_MIN"
    "$VENV_MIN/bin/pip" install -q torch==2.13.0
    "$VENV_MIN/bin/pip" install -q -r requirements-min.txt
    "$VENV_MIN/bin/pip" install -q --no-deps -e .
  fi
  # Only the modules that carry the marker: the others import packages this lean venv does not have.
  "$VENV_MIN/bin/python" -m pytest -q -m min_version $(grep -l "mark.min_version" tests/test_*.py)
fi
