#!/usr/bin/env bash
# The full CPU benchmark run, on a quiet machine: forward, pipeline, attention and serve at full size,
# each writing benchmarks/results/<name>-cpu.json (and .png), then the pictures and the tables of
# docs/speed.md regenerated from the JSON. About 20 to 25 minutes on 2 cores.
#
#   benchmarks/run_all.sh            # every step
#   benchmarks/run_all.sh forward    # only the steps named (forward, pipeline, attention, serve)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
STEPS=("${@:-forward pipeline attention serve}")
for step in ${STEPS[*]}; do
  case "$step" in
    forward) "$PYTHON" benchmarks/forward.py --variants all --profile ;;
    pipeline) "$PYTHON" benchmarks/pipeline.py ;;
    attention) "$PYTHON" benchmarks/attention.py ;;
    serve) "$PYTHON" benchmarks/serve.py ;;
    *) echo "run_all.sh: error: unknown step $step (forward, pipeline, attention, serve)" >&2; exit 2 ;;
  esac
done
"$PYTHON" benchmarks/report.py
