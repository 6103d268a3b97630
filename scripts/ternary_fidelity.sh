#!/usr/bin/env bash
# 1.58-bit fidelity of a trained stage-2 MicroVLM (tiny preset):
#   bash scripts/ternary_fidelity.sh MODEL_DIR OUT [extra microvlm.train flags, e.g. --max_steps 100]
# 1. QAT: the demo recipe's quantized stage fine-tunes MODEL_DIR with a ternary LM body, W_M and ScopeNet (OUT/qat);
# 2. exports MODEL_DIR ternarised after training (OUT/ptq, no QAT) and the QAT model (OUT/qat_export), default formats;
# 3. evaluates the full-precision model, both exports and the QAT model before export with microvlm.eval
#    (EVAL_ARGS are passed on), and logs the comparison table (OUT/fidelity.md).
set -euo pipefail
MODEL_DIR=$1
OUT=$2
shift 2
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
"$PYTHON" -m microvlm.train --stage quantized --recipe demo --init_from "$MODEL_DIR" --output_dir "$OUT/qat" "$@"
"$PYTHON" -m microvlm.export --model_dir "$MODEL_DIR" --output_dir "$OUT/ptq"
"$PYTHON" -m microvlm.export --model_dir "$OUT/qat" --output_dir "$OUT/qat_export"
trained=$(date +%s)
for pair in "full_precision=$MODEL_DIR" "ptq_export=$OUT/ptq" "qat=$OUT/qat" "qat_export=$OUT/qat_export"; do
    # shellcheck disable=SC2086
    "$PYTHON" -m microvlm.eval --model_dir "${pair#*=}" --output_dir "$OUT/eval/${pair%%=*}" ${EVAL_ARGS:-}
done
"$PYTHON" -m microvlm.export.fidelity "full precision=$OUT/eval/full_precision/eval_results.json" \
    "post-training ternary (export)=$OUT/eval/ptq_export/eval_results.json" \
    "QAT (training form)=$OUT/eval/qat/eval_results.json" \
    "QAT (export)=$OUT/eval/qat_export/eval_results.json" 2>&1 | tee "$OUT/fidelity.md"
du -sb "$MODEL_DIR"/model.safetensors "$OUT/ptq" "$OUT/qat_export" | tee -a "$OUT/fidelity.md"
echo "QAT + exports: $((trained - start)) s; evaluations: $(($(date +%s) - trained)) s" | tee -a "$OUT/fidelity.md"
