"""The ``distilqa`` command: download, ask, evaluate, verify, serve, export, explain, train, heads.

Errors a user can fix (no weights, bad input, bad files, options that do nothing together) print one
``distilqa: error: ...`` line and exit with status 2; ``--debug`` shows their traceback. Any other
exception is a bug in distilqa and keeps its traceback (status 1).

Every command that writes takes ``--output`` (see :func:`add_output_options`): an existing output is
refused unless ``--overwrite``, an input is never an output, the destination is checked before any
work starts, and files appear whole or not at all. Every command that runs the model takes
``--device``, checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

# Only torch-free modules at import time: `distilqa --help` must not wait for torch (see distilqa/hub.py).
from distilqa.files import check_output, open_output, read_pairs, read_text, write_jsonl_line
from distilqa.hub import DEFAULT_REPO_ID, HOME_VARIABLE, CheckpointError, WeightsNotFoundError, check_model_name
from distilqa.options import DEFAULT_OPTIONS
from distilqa.validate import positive_int

# Errors a user can fix: missing weights or files (OSError: not found, no permission, disk full, a
# directory given for a file), bad values (ValueError, raised by the checks on input and options) and a
# missing optional package (ImportError). Anything else (TypeError, KeyError, ...) is a bug in distilqa
# and keeps its traceback; --debug shows the traceback of user errors too.
USER_ERRORS = (WeightsNotFoundError, CheckpointError, OSError, ValueError, ImportError)
LINES_PER_CHUNK = 256  # jsonl pairs answered together: bounds memory on long files


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"distilqa: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distilqa: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distilqa", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    download = commands.add_parser("download", help="download a checkpoint into the Hugging Face cache")
    download.add_argument(
        "repo_id", nargs="?", default=DEFAULT_REPO_ID, help=f"hub repo id (default {DEFAULT_REPO_ID})"
    )
    download.add_argument("--revision", help="branch, tag or commit")
    download.add_argument(
        "--cache-dir",
        type=Path,
        help=f"Hugging Face cache folder to download into (default ${HOME_VARIABLE}, else huggingface_hub's cache)",
    )
    download.set_defaults(handler=run_download)

    ask = commands.add_parser("ask", help="answer questions about a context")
    add_model_options(ask)
    ask.add_argument("--question", help="the question")
    source = ask.add_mutually_exclusive_group()
    source.add_argument("--context", help="the context text")
    source.add_argument("--context-file", type=Path, help="read the context from this UTF-8 file")
    source.add_argument("--input", type=Path, help='a JSON Lines file of {"question", "context"} objects')
    add_output_options(ask, "with --input: write the answers here as JSON Lines (default stdout)")
    ask.add_argument(
        "--top-k", type=int, default=DEFAULT_OPTIONS.top_k, help="how many answers per question (default %(default)s)"
    )
    ask.add_argument(
        "--max-answer-len",
        type=int,
        default=DEFAULT_OPTIONS.max_answer_len,
        help="longest answer in tokens (default %(default)s)",
    )
    ask.add_argument("--handle-impossible-answer", action="store_true", help="allow the empty answer")
    ask.add_argument("--json", action="store_true", help="print the answer(s) as JSON")
    ask.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="with --input and --output: answer on Ray Data actors, on a local Ray instance or the cluster at ADDRESS",
    )
    ask.add_argument("--ray-workers", type=int, help="with --ray: actors, one model each (default: one per CPU)")
    ask.set_defaults(handler=run_ask)

    evaluate = commands.add_parser("evaluate", help="SQuAD v1.1 exact match and F1")
    add_model_options(evaluate)
    evaluate.add_argument("--data", type=Path, required=True, help="SQuAD v1.1 .json or .zip")
    evaluate.add_argument("--limit", type=int, help="only the first N questions")
    add_output_options(evaluate, "write the predictions ({id: answer}) here as JSON", aliases=("--predictions-out",))
    evaluate.add_argument("--predictions", type=Path, help="score this predictions file instead of running a model")
    evaluate.set_defaults(handler=run_evaluate)

    verify = commands.add_parser("verify", help="compare a checkpoint layer by layer with transformers")
    verify.add_argument("--model", required=True, help="checkpoint folder or hub repo id")
    verify.add_argument(
        "--attn-implementation",
        choices=("eager", "sdpa"),
        default="eager",
        help="attention core of both models (default eager: attention maps are compared too)",
    )
    add_dtype_option(verify, "both models' dtype: float32 (default), bfloat16, float16, or auto")
    add_device_option(verify)
    verify.set_defaults(handler=run_verify)

    serve = commands.add_parser("serve", help="an HTTP question-answering service with dynamic batching")
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--max-batch", type=int, default=32, help="pairs answered together at most (default 32)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="wait for more requests this long (default 5)")
    serve.add_argument("--max-queue", type=int, default=1024, help="pairs waiting before 503 (default 1024)")
    serve.add_argument("--max-pairs", type=int, default=64, help="pairs per request at most (default 64)")
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body size limit")
    serve.add_argument("--max-context-chars", type=int, default=100_000, help="context length limit, characters")
    serve.add_argument(
        "--drain-timeout", type=float, default=30.0, help="on SIGINT/SIGTERM, finish requests this long (default 30)"
    )
    serve.set_defaults(handler=run_serve)

    export = commands.add_parser("export", help="export the model to ONNX, checked against its own logits")
    add_output_options(
        export,
        "a new folder for model.onnx, config.json and the tokenizer",
        metavar="DIR",
        required=True,
        aliases=("--onnx",),
    )
    export.add_argument(
        "--model", default=DEFAULT_REPO_ID, help=f"checkpoint folder or hub repo id (default {DEFAULT_REPO_ID})"
    )
    add_device_option(export)
    export.set_defaults(handler=run_export)

    explain = commands.add_parser("explain", help="pictures of one answer: probabilities, attention, logit lens")
    add_model_options(explain)
    explain.add_argument("--question", required=True, help="the question")
    explain.add_argument("--context", required=True, help="the context text")
    add_output_options(
        explain,
        "a new folder for the pictures and the page (default explain/)",
        metavar="DIR",
        default=Path("explain"),
        aliases=("--out",),
    )
    explain.add_argument("--head", help="LAYER.HEAD (0-based) to draw in full (default: the head most on the answer)")
    explain.add_argument(
        "--max-answer-len",
        type=int,
        default=DEFAULT_OPTIONS.max_answer_len,
        help="longest answer in tokens (default %(default)s)",
    )
    explain.set_defaults(handler=run_explain)
    add_train_parser(commands)
    add_heads_parser(commands)
    return parser


def add_train_parser(commands) -> None:
    # No defaults here: options not given are absent, and distilqa.train.TrainingOptions supplies them
    # (transformers' SQuAD recipe for DistilBERT), so the parser needs no torch import.
    train = commands.add_parser(
        "train",
        help="fine-tune (or distil) a checkpoint on SQuAD v1.1 data",
        argument_default=argparse.SUPPRESS,
        description="Defaults: 2 epochs, batch 12, learning rate 3e-05 (10% warm-up, then linear decay), weight "
        "decay 0.01, gradient norm 1.0, 384-token windows with stride 128, alpha 0.5, temperature 2.0, seed 42. "
        "Ctrl-C (SIGINT) or SIGTERM stops after the current step with a checkpoint, and prints the command that "
        "continues the run.",
    )
    train.add_argument("--model", help="checkpoint folder or hub repo id to start from (required unless --resume)")
    train.add_argument("--data", type=Path, help="SQuAD v1.1 training .json or .zip (required unless --resume)")
    add_output_options(train, "a new folder for checkpoints, log and final model", metavar="DIR", required=True)
    train.add_argument("--epochs", type=int, help="passes over the data")
    train.add_argument("--batch-size", type=int, help="windows per forward pass")
    train.add_argument("--gradient-accumulation-steps", type=int, help="forward passes per optimizer step")
    train.add_argument("--learning-rate", type=float, help="peak AdamW learning rate")
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay (never on biases and LayerNorm)")
    train.add_argument("--warmup-ratio", type=float, help="share of the steps spent warming up")
    train.add_argument("--max-grad-norm", type=float, help="gradient clipping norm")
    train.add_argument("--max-seq-len", type=int, help="tokens per window")
    train.add_argument("--doc-stride", type=int, help="tokens shared by consecutive windows")
    train.add_argument("--eval-data", type=Path, help="SQuAD v1.1 file to score EM/F1 on during training")
    train.add_argument("--eval-every", type=int, help="steps between evaluations (default 0: at the end)")
    train.add_argument("--save-every", type=int, help="steps between checkpoints (default 0: every epoch)")
    train.add_argument(
        "--save-total-limit",
        type=int,
        metavar="N",
        help="keep only the newest N checkpoints, and the best one with --eval-data",
    )
    train.add_argument("--teacher", help="distil from this checkpoint folder or repo id (same tokenizer)")
    train.add_argument("--alpha", type=float, help="weight of the distillation loss")
    train.add_argument("--temperature", type=float, help="distillation temperature")
    train.add_argument("--student-layers", type=int, help="start from this many of --model's layers, every other")
    train.add_argument("--seed", type=int, help="shuffling and dropout seed")
    train.add_argument(
        "--resume",
        type=Path,
        metavar="CHECKPOINT",
        help="continue the run of a checkpoint-<step> folder with its options, into its own folder or a new "
        "--output; options that decide what is learnt cannot change, the others can be given again",
    )
    train.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "auto"),
        help="float32 (default), bfloat16 (autocast), or auto: bfloat16 where the hardware has it natively",
    )
    train.add_argument("--device", help="torch device (default cpu)")
    train.set_defaults(handler=run_train)


def add_heads_parser(commands) -> None:
    heads = commands.add_parser("heads", help="head importance (Michel et al. 2019) and EM/F1 as heads are pruned")
    heads.add_argument("--model", required=True, help="checkpoint folder or hub repo id")
    heads.add_argument("--data", type=Path, required=True, help="SQuAD v1.1 .json or .zip to measure on")
    add_output_options(
        heads, "a new folder for the JSON and PNG files", metavar="DIR", required=True, aliases=("--out",)
    )
    heads.add_argument("--limit", type=int, help="only the first N questions")
    heads.add_argument("--points", type=int, default=13, help="points on the pruning curve (default 13)")
    heads.add_argument("--batch-size", type=int, default=32, help="windows per batch (1: per-window gradients)")
    heads.add_argument("--max-seq-len", type=int, default=384, help="tokens per window (default 384)")
    heads.add_argument("--doc-stride", type=int, default=128, help="tokens shared by windows (default 128)")
    add_device_option(heads)
    heads.set_defaults(handler=run_heads)


def add_output_options(
    parser: argparse.ArgumentParser,
    help: str,
    *,
    metavar: str = "FILE",
    required: bool = False,
    default: Path | None = None,
    aliases: Sequence[str] = (),
) -> None:
    """The output options of a command that writes, the same in every command: ``--output`` (older
    spellings in ``aliases`` still work, hidden from the usage line) and ``--overwrite``. The command
    then calls :func:`distilqa.files.check_output` before any work starts."""
    group = parser.add_mutually_exclusive_group(required=required)
    note = f" ({', '.join(aliases)}: older spelling, deprecated)" if aliases else ""
    group.add_argument("--output", type=Path, default=default, metavar=metavar, help=help + note)
    for alias in aliases:
        group.add_argument(alias, dest="output", type=Path, default=default, metavar=metavar, help=argparse.SUPPRESS)
    parser.add_argument(
        "--overwrite", action="store_true", default=False, help="replace an existing --output (refused without it)"
    )


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda or cuda:1 (default cpu)")


def add_dtype_option(parser: argparse.ArgumentParser, help: str) -> None:
    # Checked by distilqa.hardware.resolve_dtype, the one table of dtype names (it also takes bf16, fp16, ...).
    parser.add_argument("--dtype", default="float32", metavar="DTYPE", help=help)


def check_device_and_dtype(args: argparse.Namespace) -> None:
    """Refuse a device this torch cannot use, or an unknown dtype, before anything loads."""
    from distilqa.hardware import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    if getattr(args, "dtype", None) is not None:
        resolve_dtype(args.dtype, device)


def checked_output(args: argparse.Namespace, *inputs: object, directory: bool = False) -> Path | None:
    """``args.output`` checked by :func:`distilqa.files.check_output` (None when not given); ``inputs``
    are the paths the command reads, which the output may not be."""
    if args.output is None:
        if args.overwrite:
            raise ValueError("--overwrite goes with --output")
        return None
    return check_output(args.output, overwrite=args.overwrite, inputs=[i for i in inputs if i], directory=directory)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_REPO_ID, help=f"checkpoint folder or hub repo id (default {DEFAULT_REPO_ID})"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default 32)")
    add_device_option(parser)
    add_dtype_option(
        parser,
        "float32 (default, answers match the reference), bfloat16, float16, or auto: bfloat16 where "
        "the hardware multiplies it natively",
    )
    parser.add_argument(
        "--attn-implementation",
        choices=("auto", "eager", "sdpa", "onednn", "triton"),
        default="auto",
        help="attention core (default auto: on the CPU the fastest core measured per dtype and shape; else sdpa)",
    )
    parser.add_argument(
        "--linear-backend",
        choices=("auto", "aten", "onednn"),
        default="auto",
        help="GEMM library of the linear layers on the CPU (default auto: the faster one, measured)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model first (slow start, faster bulk work)"
    )
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="int8 linear layers, inputs quantised per call (CPU; on oneDNN's int8 GEMM where oneDNN is the backend)",
    )


def load_answerer(args: argparse.Namespace):
    check_device_and_dtype(args)
    from distilqa.pipeline import QuestionAnswerer

    return QuestionAnswerer.from_pretrained(args.model, **answerer_options(args))


def answerer_options(args: argparse.Namespace) -> dict:
    """The QuestionAnswerer.from_pretrained keyword arguments of the model options (Ray actors load with them)."""
    return dict(
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        attn_implementation=args.attn_implementation,
        linear_backend=args.linear_backend,
        compile=args.compile,
        quantize=args.quantize,
    )


def run_download(args: argparse.Namespace) -> int:
    from distilqa.hub import download

    folder = download(args.repo_id, args.revision, args.cache_dir)
    print(f"{args.repo_id}: files in {folder}")
    if args.cache_dir is not None:
        print(f"other commands find them with {HOME_VARIABLE}={args.cache_dir} or --model {folder}")
    return 0


def run_ask(args: argparse.Namespace) -> int:
    # The parser's defaults are distilqa.options.DEFAULT_OPTIONS, the pipeline's own.
    options = dict(
        top_k=positive_int("--top-k", args.top_k),
        max_answer_len=positive_int("--max-answer-len", args.max_answer_len),
        handle_impossible_answer=args.handle_impossible_answer,
    )
    if args.ray is not None or args.ray_workers is not None:
        return run_ask_on_ray(args, options)
    if args.input is None and args.output is not None:
        raise ValueError("--output goes with --input FILE.jsonl; a single answer is printed")
    if args.input is not None and args.json:
        raise ValueError("--json goes with --question; answers to --input are always JSON Lines")
    if args.input is not None:
        if args.question is not None:
            raise ValueError("--question goes with --context or --context-file, not with --input")
        output = checked_output(args, args.input)
        from distilqa.pipeline import PairError

        lines, pairs = zip(*read_pairs(args.input))  # every line is checked before any work starts
        with open_output(output) as out:
            answerer = load_answerer(args)
            with tqdm(total=len(pairs), unit="question", file=sys.stderr) as bar:
                for first in range(0, len(pairs), LINES_PER_CHUNK):
                    chunk = pairs[first : first + LINES_PER_CHUNK]
                    try:
                        answers = answerer([p["question"] for p in chunk], [p["context"] for p in chunk], **options)
                    except PairError as error:  # name the line, not the position in this chunk
                        raise ValueError(error.describe(f"{args.input}:{lines[first + error.index]}")) from None
                    for pair, answer in zip(chunk, answers):
                        record = {"id": pair["id"]} if "id" in pair else {}
                        record.update(question=pair["question"], answer=answer)
                        write_jsonl_line(out, record)
                    bar.update(len(chunk))
        return 0
    if args.question is None or (args.context is None and args.context_file is None):
        raise ValueError("ask needs --question with --context or --context-file, or --input FILE.jsonl")
    if args.overwrite:
        raise ValueError("--overwrite goes with --input FILE.jsonl and --output FILE.jsonl")
    context = args.context if args.context is not None else read_text(args.context_file)
    answer = load_answerer(args)(args.question, context, **options)
    if args.json:
        print(json.dumps(answer, ensure_ascii=False, indent=2))
    else:
        for item in answer if isinstance(answer, list) else [answer]:
            print(f"{item['answer']}\t(score {item['score']:.4f}, characters {item['start']}-{item['end']})")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Prints one JSON object of the same keys whether it runs a model or scores --predictions:
    exact_match, f1 (unrounded), questions, answered, missing, seconds and questions_per_second
    (null when no model ran)."""
    from distilqa.squad import evaluate, predict, read_predictions, read_squad, write_predictions

    if args.predictions is not None:
        if given := changed_model_options(args):
            raise ValueError(f"--predictions scores a file without a model: {', '.join(given)} would do nothing")
        if args.output is not None:
            raise ValueError("--output writes a model's predictions; --predictions already names them")
    if args.limit is not None:
        positive_int("--limit", args.limit)
    output = checked_output(args, args.data)  # before the data is read and the model loads
    if args.predictions is None:
        check_device_and_dtype(args)
    questions = read_squad(args.data)[: args.limit]
    seconds = None
    if args.predictions is not None:
        predictions = read_predictions(args.predictions)
    else:
        answerer = load_answerer(args)
        began = time.perf_counter()
        predictions = predict(answerer, questions, progress=True)
        seconds = time.perf_counter() - began
        if output is not None:
            write_predictions(predictions, output)
    scores = evaluate(questions, predictions)
    summary = {
        **scores.to_dict(),
        "seconds": None if seconds is None else round(seconds, 2),
        "questions_per_second": None if seconds is None else round(scores.total / seconds, 2),
    }
    summary["questions"] = summary.pop("total")
    print(json.dumps(summary))
    return 0


def changed_model_options(args: argparse.Namespace) -> list[str]:
    """The model options (add_model_options) given a value other than their default, as "--name"."""
    options = argparse.ArgumentParser(add_help=False)
    add_model_options(options)
    defaults = vars(options.parse_args([]))
    return ["--" + name.replace("_", "-") for name, default in defaults.items() if getattr(args, name) != default]


def run_ask_on_ray(args: argparse.Namespace, options: dict) -> int:
    if args.ray is None:
        raise ValueError("--ray-workers goes with --ray")
    if args.input is None or args.output is None:
        raise ValueError("--ray answers a file: it needs --input FILE.jsonl and --output FILE.jsonl")
    if args.question is not None:
        raise ValueError("--question goes with --context or --context-file, not with --input")
    if args.ray_workers is not None:
        positive_int("--ray-workers", args.ray_workers)
    output = checked_output(args, args.input)  # before Ray starts
    check_device_and_dtype(args)
    check_model_name(args.model)  # the workers load it: a missing folder is said here, at once
    from distilqa.bulk import answer_file_on_ray

    count = answer_file_on_ray(
        args.input,
        output,
        args.model,
        address=args.ray,
        workers=args.ray_workers,
        gpus_per_worker=1.0 if str(args.device or "cpu").startswith("cuda") else 0.0,  # one GPU per model
        load_options=answerer_options(args),
        verbose=args.debug,
        **options,
    )
    print(f"answered {count} questions into {args.output}", file=sys.stderr)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from distilqa.serve import ServerLimits, bind_socket, check_batching, serve
    from distilqa.validate import positive_number

    check_batching(args.max_batch, args.max_wait_ms)  # before the model loads
    limits = ServerLimits(
        max_body_bytes=args.max_body_bytes,
        max_pairs=args.max_pairs,
        max_context_chars=args.max_context_chars,
        max_queue_pairs=args.max_queue,
    )
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    positive_number("--drain-timeout", args.drain_timeout)
    sock = bind_socket(args.host, args.port)  # before the model loads: a taken port is said at once
    options = dict(limits=limits, drain_timeout_s=args.drain_timeout, sock=sock)
    serve(load_answerer(args), str(args.model), args.host, args.port, args.max_batch, args.max_wait_ms, **options)
    return 0


def run_export(args: argparse.Namespace) -> int:
    output = checked_output(args, args.model, directory=True)
    check_device_and_dtype(args)
    from distilqa.export import export_onnx

    print(export_onnx(args.model, output, device=args.device, overwrite=args.overwrite).format())
    return 0


def run_verify(args: argparse.Namespace) -> int:
    check_device_and_dtype(args)
    from distilqa.parity import verify_checkpoint

    report = verify_checkpoint(
        args.model, attn_implementation=args.attn_implementation, dtype=args.dtype, device=args.device
    )
    print(report.format())
    return 0 if report.passed else 1


def run_explain(args: argparse.Namespace) -> int:
    from distilqa.plotting import require_matplotlib

    output = checked_output(args, directory=True)
    require_matplotlib("distilqa explain")  # before the model loads: say what to install at once
    positive_int("--max-answer-len", args.max_answer_len)
    check_device_and_dtype(args)
    from distilqa.explain import parse_head, write_explanation

    result = write_explanation(
        load_answerer(args),
        args.question,
        args.context,
        output,
        label=str(args.model),
        overwrite=args.overwrite,
        head=parse_head(args.head),
        max_answer_len=args.max_answer_len,
    )
    answer = result.explanation["answer"]["answer"]
    print(f"answer {answer!r}; wrote {len(result.files)} files, open {result.files['html']}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    """Prints a JSON summary. Stopped by SIGINT / SIGTERM (after saving a checkpoint) it also prints
    the command that continues the run, on a line of its own, and exits with 128 + the signal number."""
    import shlex
    import signal

    from distilqa.train import TrainingOptions, resumed_options, train

    # The parser has no defaults (argparse.SUPPRESS): what is in args was given on the command line.
    given = {name: value for name, value in vars(args).items() if name in TrainingOptions.__dataclass_fields__}
    if "resume" in given:
        options = resumed_options(given.pop("resume"), **given)
    elif missing := [f"--{name}" for name in ("model", "data") if name not in given]:
        raise ValueError(f"train needs {' and '.join(missing)}, or --resume CHECKPOINT to continue a run")
    else:
        options = TrainingOptions(**given)
    result = train(options)
    summary = {"output": str(result.output), "steps": result.steps, "evaluations": result.evaluations}
    if result.stopped_by is None:
        print(json.dumps(summary))
        return 0
    name = signal.Signals(result.stopped_by).name
    command = shlex.join(["distilqa", "train", "--resume", str(result.checkpoint), "--output", str(options.output)])
    print(json.dumps({**summary, "stopped_by": name, "checkpoint": str(result.checkpoint), "resume": command}))
    print(
        f"distilqa: stopped by {name} after step {result.steps}, saved {result.checkpoint}; to continue:",
        file=sys.stderr,
    )
    print(command, file=sys.stderr)
    return 128 + result.stopped_by


def run_heads(args: argparse.Namespace) -> int:
    from distilqa.validate import at_least

    if args.limit is not None:
        positive_int("--limit", args.limit)
    at_least("--points", args.points, 2)
    output = checked_output(args, args.data, args.model, directory=True)
    check_device_and_dtype(args)
    from distilqa.heads import WindowingOptions, head_report

    options = WindowingOptions(args.max_seq_len, args.doc_stride, args.batch_size)
    report = head_report(
        args.model, args.data, output, args.limit, args.points, options, device=args.device, overwrite=args.overwrite
    )
    for order in ("least_important_first", "most_important_first"):
        points = ", ".join(f"{p['heads_pruned']}: {p['exact_match']}" for p in report["pruning_curve"][order])
        print(f"EM with heads pruned, {order.replace('_', ' ')}: {points}")
    print(f"wrote importance.json, importance.png, pruning_curve.json and pruning_curve.png into {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
