#!/usr/bin/env bash
# The full CPU run on a quiet machine (about 20 to 25 minutes on 2 cores): forward, pipeline, attention
# and serve at full size into benchmarks/results/<name>-cpu.{json,png}, then benchmarks/report.py.
#   benchmarks/run_all.sh                    # every step
#   benchmarks/run_all.sh forward pipeline   # only the steps named
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
FORWARD="transformers-eager,transformers-sdpa,onnxruntime,openvino,distilqa-sdpa,distilqa-onednn-unfused"
FORWARD+=",distilqa-onednn,distilqa-onednn-attn,distilqa-auto,distilqa-int8,distilqa-int8-onednn"
declare -A COMMANDS=([forward]="--variants $FORWARD --dtypes fp32,bf16 --profile" [pipeline]="" [attention]="" [serve]="")
[ $# -gt 0 ] || set -- forward pipeline attention serve
for step in "$@"; do  # every name checked before anything runs
  [ -n "${COMMANDS[$step]+x}" ] || { echo "run_all.sh: error: unknown step $step (${!COMMANDS[*]})" >&2; exit 2; }
done
for step in "$@"; do
  # shellcheck disable=SC2086  # the options are words
  "$PYTHON" "benchmarks/$step.py" ${COMMANDS[$step]}
done
"$PYTHON" benchmarks/report.py
