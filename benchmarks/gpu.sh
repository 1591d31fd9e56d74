#!/usr/bin/env bash
# The CUDA benchmarks in one command: the attention cores (the Triton kernel among them), the forward
# pass and the question-answering pipeline, each under its own time limit (7.5 minutes at most in all).
#
#   benchmarks/gpu.sh                  # on a CUDA machine: benchmarks/results/*-cuda.{json,png} and gpu.log
#   benchmarks/gpu.sh --dry-run        # anywhere: the same steps on the CPU at tiny sizes, the Triton
#                                      # kernel in Triton's interpreter; results in $TMPDIR/distilqa-gpu-dry-run
#   benchmarks/gpu.sh --results DIR    # write the files (and gpu.log) to DIR instead
#   benchmarks/gpu.sh --data DIR       # SQuAD and the vocabulary for the pipeline step (default ../shared/data)
#
# The pipeline step compares with transformers' question-answering pipeline, removed in transformers
# 5.3: on a newer one it is skipped, with the reason in gpu.log. A failed or timed-out step does not
# stop the others; the exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0 RESULTS="" DATA="${DISTILQA_DATA:-../shared/data}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --results) RESULTS="$2"; shift ;;
    --data) DATA="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PYTHON="${PYTHON:-python3}"
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
  RESULTS="${RESULTS:-${TMPDIR:-/tmp}/distilqa-gpu-dry-run}" DEVICE=cpu SUFFIX=cpu-dry-run
  export TRITON_INTERPRET=1  # before Triton is first imported: the kernel runs in the interpreter
  QUICK=(--small --threads 1 --repeats 2 --warmup 1)
  ATTENTION=("${QUICK[@]}" --masks none,padding,squad-padded,squad-packed --modes forward --implementations distilqa-eager,distilqa-sdpa,sdpa-math,transformers-sdpa,distilqa-triton)
  FORWARD=("${QUICK[@]}")
  PIPELINE=(--small --threads 1 --chunks 2 --peers "")
  LIMITS=(300 300 300)
else
  RESULTS="${RESULTS:-benchmarks/results}" DEVICE=cuda SUFFIX=cuda
  if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: error: torch sees no CUDA device; run with --dry-run to check the script on the CPU" >&2
    exit 2
  fi
  ATTENTION=(--dtypes fp16,bf16 --repeats 20 --warmup 3)  # every shape, mask and implementation
  FORWARD=(--dtypes fp32,fp16,bf16 --repeats 10 --warmup 3
    --variants transformers-eager,transformers-sdpa,distilqa-eager,distilqa-sdpa,distilqa-triton)
  # the whole SQuAD v1.1 dev set, fp32 and bf16 with the Triton core; the reference at batch size 32
  PIPELINE=(--questions 0 --modes fp32,bf16 --attn-implementation triton --reference-batch-sizes 32 --batch-size 128)
  LIMITS=(240 90 120)
fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu.log"
: >"$LOG"
FAILED=()
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
if [ ${#FAILED[@]} -gt 0 ]; then
  log "gpu.sh: done, with failures: ${FAILED[*]} (see $LOG)"
  exit 1
fi
log "gpu.sh: done; results in $RESULTS"
