#!/usr/bin/env bash
# Fresh-machine setup + tests: a venv with torch 2.13.0 (CPU build) first, then MicroVLM with its pinned
# dependencies, then the whole test suite. A second venv with the lowest supported transformers (5.0.0) runs
# the tests marked `min_version` (remote code, generation, processor) again: 5.0 and 5.23 differ exactly there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV_MIN=${VENV_MIN:-.venv-transformers-5.0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -c requirements-pinned.txt -e ".[test]"
fi
"$VENV/bin/python" -m pytest -q tests

if [ "${SKIP_MIN_VERSION:-0}" != 1 ]; then
  if [ ! -x "$VENV_MIN/bin/python" ]; then
    python3 -m venv "$VENV_MIN"
    "$VENV_MIN/bin/pip" install -q torch==2.13.0
    "$VENV_MIN/bin/pip" install -q -r requirements-min.txt
    "$VENV_MIN/bin/pip" install -q --no-deps -e .
  fi
  "$VENV_MIN/bin/python" -m pytest -q -m min_version tests
fi
