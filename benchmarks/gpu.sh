#!/usr/bin/env bash
# The CUDA benchmarks (attention with the Triton kernel, forward, pipeline), each under its own time limit
# (7.5 minutes in all): benchmarks/results/*-cuda.{json,png} and gpu.log (--results DIR: there instead).
# --dry-run: the same steps at tiny sizes on the CPU, Triton interpreted, in $TMPDIR/distilqa-gpu-dry-run.
# --data DIR: SQuAD and the vocabulary (default ../shared/data); without them, or on transformers >= 5.3 (no
# QA pipeline), the pipeline step is skipped. A failed step does not stop the others; the status is then 1.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0 RESULTS="" DATA="${DISTILQA_DATA:-../shared/data}" PYTHON="${PYTHON:-python3}" FAILED=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --results) RESULTS="$2"; shift ;;
    --data) DATA="$2"; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "gpu.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
  RESULTS="${RESULTS:-${TMPDIR:-/tmp}/distilqa-gpu-dry-run}" DEVICE=cpu SUFFIX=cpu-dry-run LIMITS=(300 300 300)
  export TRITON_INTERPRET=1  # before Triton is first imported: the kernel runs in the interpreter
  FORWARD=(--small --threads 1 --repeats 2 --warmup 1)
  ATTENTION=("${FORWARD[@]}" --masks none,padding,squad-padded,squad-packed --modes forward
    --implementations distilqa-eager,distilqa-sdpa,sdpa-math,transformers-sdpa,distilqa-triton)
  PIPELINE=(--small --threads 1 --chunks 2 --peers "")
elif "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  RESULTS="${RESULTS:-benchmarks/results}" DEVICE=cuda SUFFIX=cuda LIMITS=(240 90 120)
  ATTENTION=(--dtypes fp16,bf16 --repeats 20 --warmup 3)  # every shape, mask and implementation
  FORWARD=(--dtypes fp32,fp16,bf16 --repeats 10 --warmup 3
    --variants transformers-eager,transformers-sdpa,distilqa-eager,distilqa-sdpa,distilqa-triton)
  # the whole SQuAD v1.1 dev set, fp32 and bf16 with the Triton core; the reference at batch size 32
  PIPELINE=(--questions 0 --modes fp32,bf16 --attn-implementation triton --reference-batch-sizes 32 --batch-size 128)
else
  echo "gpu.sh: error: torch sees no CUDA device; run with --dry-run to check the script on the CPU" >&2
  exit 2
fi
LOG="$RESULTS/gpu.log"
mkdir -p "$RESULTS" && : >"$LOG"
log() { echo "$*" | tee -a "$LOG"; }

step() {  # step NAME LIMIT ARGS...: benchmarks/NAME.py under a time limit, output into $RESULTS
  local name="$1" limit="$2" start=$SECONDS
  shift 2
  log "== $name (at most ${limit}s): $PYTHON benchmarks/$name.py --device $DEVICE $*"
  timeout --kill-after=10 "$limit" "$PYTHON" "benchmarks/$name.py" --device "$DEVICE" "$@" \
    --output "$RESULTS/$name-$SUFFIX.json" --plot "$RESULTS/$name-$SUFFIX.png" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  log "== $name: exit status $status after $((SECONDS - start))s"
  [ "$status" = 0 ] || FAILED+=("$name")
}

log "distilqa GPU benchmarks, $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE, results in $RESULTS"
"$PYTHON" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda)" 2>&1 | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$LOG"
step attention "${LIMITS[0]}" "${ATTENTION[@]}"
step forward "${LIMITS[1]}" "${FORWARD[@]}"
SQUAD="$DATA/squad/dev-v1.1.json.zip" VOCAB="$DATA/vocab/bert-base-cased-vocab.txt"
if [ ! -f "$SQUAD" ] || [ ! -f "$VOCAB" ]; then
  log "== pipeline: skipped: no $SQUAD or $VOCAB (pass --data DIR)"
  FAILED+=("pipeline (no data)")
elif ! "$PYTHON" -c "import sys, transformers as t; sys.exit(tuple(map(int, t.__version__.split('.')[:2])) >= (5, 3))"; then
  log "== pipeline: skipped: transformers >= 5.3 has no question-answering pipeline; install transformers<5.3"
  FAILED+=("pipeline (transformers >= 5.3)")
else
  step pipeline "${LIMITS[2]}" "${PIPELINE[@]}" --data "$SQUAD" --vocab "$VOCAB"
fi
[ ${#FAILED[@]} = 0 ] || { log "gpu.sh: done, with failures: ${FAILED[*]} (see $LOG)"; exit 1; }
log "gpu.sh: done; results in $RESULTS"
