#!/usr/bin/env bash
# One prepared command for the CUDA benchmarks: the attention cores (the Triton kernel among them), the
# forward pass and the question-answering pipeline, each under its own time limit, about 7 minutes in
# all, writing JSON and PNG files.
#
#   benchmarks/gpu.sh                  # on a CUDA machine: results in benchmarks/results/*-cuda.{json,png}
#   benchmarks/gpu.sh --dry-run        # anywhere: the same steps on the CPU at tiny sizes, the Triton kernel
#                                      # in Triton's interpreter; results in $TMPDIR/distilqa-gpu-dry-run
#   benchmarks/gpu.sh --results DIR    # write the files (and gpu.log) to DIR instead
#   benchmarks/gpu.sh --data DIR       # SQuAD + vocabulary for the pipeline step (default ../shared/data,
#                                      # or $DISTILQA_DATA): DIR/squad/dev-v1.1.json.zip, DIR/vocab/bert-base-cased-vocab.txt
#
# Needs: torch with CUDA, triton, matplotlib, transformers (forward and attention: any version with
# DistilBERT; the pipeline step compares against transformers' question-answering pipeline, which
# transformers removed in 5.3, so that step is skipped, with the reason in gpu.log, on a newer one).
# A failed or timed-out step does not stop the others; the exit status is 1 if any step failed.
set -uo pipefail

cd "$(dirname "$0")/.."
DRY_RUN=0
RESULTS=""
DATA="${DISTILQA_DATA:-../shared/data}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --results) RESULTS="$2"; shift ;;
    --data) DATA="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PYTHON="${PYTHON:-python3}"
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
  RESULTS="${RESULTS:-${TMPDIR:-/tmp}/distilqa-gpu-dry-run}"
  DEVICE=cpu
  SUFFIX=cpu-dry-run
  # Each step: tiny sizes, fp32, one thread, two timed runs.
  ATTENTION_ARGS=(--small --threads 1 --repeats 2 --warmup 1 --retries 0 --masks all --modes forward
    --implementations distilqa-eager,distilqa-sdpa,sdpa-math,sdpa-flash,transformers-sdpa,distilqa-triton)
  FORWARD_ARGS=(--small --threads 1 --repeats 2 --warmup 1 --retries 0)
  PIPELINE_ARGS=(--small --threads 1 --chunks 2)
  LIMITS=(300 300 300)
else
  RESULTS="${RESULTS:-benchmarks/results}"
  DEVICE=cuda
  SUFFIX=cuda
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: error: torch sees no CUDA device; run with --dry-run to check the script on the CPU" >&2
    exit 2
  fi
  # batch 1, 16, 128 x seq 128, 384, 512 (the script's CUDA default); fp16 and bf16; forward; every mask
  # (none, padding, squad-padded, squad-packed); every implementation, the Triton kernel included.
  ATTENTION_ARGS=(--dtypes fp16,bf16 --modes forward --masks all --repeats 20 --warmup 3 --retries 0)
  FORWARD_ARGS=(--dtypes fp32,fp16,bf16 --repeats 10 --warmup 3 --retries 0
    --variants transformers-eager,transformers-sdpa,distilqa-eager,distilqa-sdpa,distilqa-triton)
  # The whole SQuAD v1.1 dev set (10570 questions), bf16 with the Triton core; the reference pipeline at
  # batch size 32 only.
  PIPELINE_ARGS=(--questions 0 --modes fp32,bf16 --attn-implementation triton --reference-batch-sizes 32
    --batch-size 128)
  LIMITS=(240 90 120)  # seconds: attention, forward, pipeline (7.5 minutes at most)
fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu.log"
: >"$LOG"
FAILED=()

log() { echo "$*" | tee -a "$LOG"; }

step() {  # step NAME LIMIT ARGS...: run benchmarks/NAME.py under a time limit, output into $RESULTS
  local name="$1" limit="$2"
  shift 2
  log "== $name (at most ${limit}s): $PYTHON benchmarks/$name.py --device $DEVICE $*"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$PYTHON" "benchmarks/$name.py" --device "$DEVICE" "$@" \
    --output "$RESULTS/$name-$SUFFIX.json" --plot "$RESULTS/$name-$SUFFIX.png" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  log "== $name: exit status $status after $((SECONDS - start))s"
  [ "$status" = 0 ] || FAILED+=("$name")
}

log "distilqa GPU benchmarks, $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE, results in $RESULTS"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("triton", "transformers", "matplotlib"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as error:
        print(name, "MISSING:", error)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
  --format=csv 2>&1 | tee -a "$LOG"

# The attention step runs the Triton kernel; on the CPU only Triton's interpreter can, and the variable
# must be set before Triton is first imported.
if [ "$DRY_RUN" = 1 ]; then
  TRITON_INTERPRET=1 step attention "${LIMITS[0]}" "${ATTENTION_ARGS[@]}"
else
  step attention "${LIMITS[0]}" "${ATTENTION_ARGS[@]}"
fi
step forward "${LIMITS[1]}" "${FORWARD_ARGS[@]}"

SQUAD="$DATA/squad/dev-v1.1.json.zip"
VOCAB="$DATA/vocab/bert-base-cased-vocab.txt"
if [ ! -f "$SQUAD" ] || [ ! -f "$VOCAB" ]; then
  log "== pipeline: skipped: no $SQUAD or $VOCAB (pass --data DIR, or copy ../shared/data along)"
  FAILED+=("pipeline (no data)")
elif ! "$PYTHON" -c "import sys, transformers; v = tuple(int(p) for p in transformers.__version__.split('.')[:2]); sys.exit(v >= (5, 3))"; then
  log "== pipeline: skipped: transformers $("$PYTHON" -c 'import transformers; print(transformers.__version__)') has no question-answering pipeline (removed in 5.3); install transformers<5.3 (e.g. carry its wheel) to run it"
  FAILED+=("pipeline (transformers >= 5.3)")
else
  step pipeline "${LIMITS[2]}" "${PIPELINE_ARGS[@]}" --data "$SQUAD" --vocab "$VOCAB"
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  log "gpu.sh: done, with failures: ${FAILED[*]} (see $LOG)"
  exit 1
fi
log "gpu.sh: done; results in $RESULTS"
