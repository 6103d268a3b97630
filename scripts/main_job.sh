#!/usr/bin/env bash
# The main job on the built-in offline default: sets up the venv, trains the tiny preset on the built-in shapes
# set (stage 1 then stage 2, the `demo` recipe), evaluates it against its baselines and writes the report.
# Extra arguments go to `python -m microvlm.train` (e.g. --max_steps 50 for a smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
source scripts/setup_venv.sh
OUT=${OUT:-outputs/demo}
"$PY" -m microvlm.train --stage both --recipe demo --output_dir "$OUT" "$@"
"$PY" -m microvlm.eval --model_dir "$OUT/stage2" --output_dir "$OUT/report"
echo "MicroVLM demo: model $OUT/stage2, report $OUT/report/report.md"
