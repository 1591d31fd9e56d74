"""The ``distilqa`` command: download, ask, evaluate, verify.

Errors a user can fix (no weights, bad input, bad files) print one ``distilqa: error: ...`` line
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from distilqa.weights import DEFAULT_REPO_ID, CheckpointError, WeightsNotFoundError

USER_ERRORS = (WeightsNotFoundError, CheckpointError, OSError, ValueError, TypeError, ImportError)  # OSError: files
LINES_PER_CHUNK = 256  # jsonl pairs answered together: bounds memory on long files


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        print(f"distilqa: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distilqa: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distilqa", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    download = commands.add_parser("download", help="download a checkpoint into weights/")
    download.add_argument(
        "repo_id", nargs="?", default=DEFAULT_REPO_ID, help=f"hub repo id (default {DEFAULT_REPO_ID})"
    )
    download.add_argument("--revision", help="branch, tag or commit")
    download.set_defaults(handler=run_download)

    ask = commands.add_parser("ask", help="answer questions about a context")
    add_model_options(ask)
    ask.add_argument("--question", help="the question")
    source = ask.add_mutually_exclusive_group()
    source.add_argument("--context", help="the context text")
    source.add_argument("--context-file", type=Path, help="read the context from this UTF-8 file")
    source.add_argument("--input", type=Path, help='a JSON Lines file of {"question", "context"} objects')
    ask.add_argument("--output", type=Path, help="with --input: write answers here as JSON Lines (default stdout)")
    ask.add_argument("--top-k", type=int, default=1, help="how many answers per question (default 1)")
    ask.add_argument("--max-answer-len", type=int, default=15, help="longest answer in tokens (default 15)")
    ask.add_argument("--handle-impossible-answer", action="store_true", help="allow the empty answer")
    ask.add_argument("--json", action="store_true", help="print the answer(s) as JSON")
    ask.set_defaults(handler=run_ask)

    evaluate = commands.add_parser("evaluate", help="SQuAD v1.1 exact match and F1")
    add_model_options(evaluate)
    evaluate.add_argument("--data", type=Path, required=True, help="SQuAD v1.1 .json or .zip")
    evaluate.add_argument("--limit", type=int, help="only the first N questions")
    evaluate.add_argument("--predictions-out", type=Path, help="write the predictions ({id: answer}) here")
    evaluate.add_argument("--predictions", type=Path, help="score this predictions file instead of running a model")
    evaluate.set_defaults(handler=run_evaluate)

    verify = commands.add_parser("verify", help="compare a checkpoint layer by layer with transformers")
    verify.add_argument("--model", required=True, help="checkpoint folder or hub repo id")
    verify.add_argument("--attn", choices=("eager", "sdpa"), default="eager", help="attention core (default eager)")
    verify.set_defaults(handler=run_verify)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_REPO_ID, help=f"checkpoint folder or hub repo id (default {DEFAULT_REPO_ID})"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default 32)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")


def load_answerer(args: argparse.Namespace):
    from distilqa.pipeline import QuestionAnswerer

    return QuestionAnswerer.from_pretrained(args.model, device=args.device, batch_size=args.batch_size)


def run_download(args: argparse.Namespace) -> int:
    from distilqa.weights import download

    print(f"downloaded {args.repo_id} into {download(args.repo_id, args.revision)}")
    return 0


def run_ask(args: argparse.Namespace) -> int:
    options = dict(
        top_k=args.top_k, max_answer_len=args.max_answer_len, handle_impossible_answer=args.handle_impossible_answer
    )
    if args.input is not None:
        if args.question is not None:
            raise ValueError("--question goes with --context or --context-file, not with --input")
        lines, pairs = zip(*read_pairs(args.input))  # every line is checked before any work starts
        with open_output(args.output) as out:
            answerer = load_answerer(args)
            with tqdm(total=len(pairs), unit="question", file=sys.stderr) as bar:
                for first in range(0, len(pairs), LINES_PER_CHUNK):
                    chunk = pairs[first : first + LINES_PER_CHUNK]
                    try:
                        answers = answerer([p["question"] for p in chunk], [p["context"] for p in chunk], **options)
                    except ValueError as error:  # name the line, not the position in this chunk
                        message = re.sub(r"\b(question|context) \d+\b", r"\1", str(error))
                        raise ValueError(f"{args.input}:{lines[first + _pair_index(error)]}: {message}") from None
                    for pair, answer in zip(chunk, answers):
                        record = {"id": pair["id"]} if "id" in pair else {}
                        record.update(question=pair["question"], answer=answer)
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    bar.update(len(chunk))
        return 0
    if args.question is None or (args.context is None and args.context_file is None):
        raise ValueError("ask needs --question with --context or --context-file, or --input FILE.jsonl")
    context = args.context if args.context is not None else read_text(args.context_file)
    answer = load_answerer(args)(args.question, context, **options)
    if args.json:
        print(json.dumps(answer, ensure_ascii=False, indent=2))
    else:
        for item in answer if isinstance(answer, list) else [answer]:
            print(f"{item['answer']}\t(score {item['score']:.4f}, characters {item['start']}-{item['end']})")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from distilqa.squad import evaluate, predict, read_predictions, read_squad, write_predictions

    questions = read_squad(args.data)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be a positive number, got {args.limit}")
        questions = questions[: args.limit]
    if args.predictions is not None:
        scores = evaluate(questions, read_predictions(args.predictions))
        print(
            json.dumps(
                {
                    "exact_match": scores.exact_match,
                    "f1": scores.f1,
                    "questions": scores.total,
                    "missing": scores.missing,
                }
            )
        )
        return 0
    answerer = load_answerer(args)
    began = time.perf_counter()
    predictions = predict(answerer, questions, progress=True)
    seconds = time.perf_counter() - began
    if args.predictions_out is not None:
        write_predictions(predictions, args.predictions_out)
    scores = evaluate(questions, predictions)
    print(
        json.dumps(
            {
                "exact_match": round(scores.exact_match, 4),
                "f1": round(scores.f1, 4),
                "questions": scores.total,
                "questions_per_second": round(scores.total / seconds, 2),
                "seconds": round(seconds, 2),
            }
        )
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from distilqa.parity import verify_checkpoint

    report = verify_checkpoint(args.model, attn_implementation=args.attn)
    print(report.format())
    return 0 if report.passed else 1


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")  # as stored: "\r\n" kept, so offsets index the file's text
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error})") from None


def read_pairs(path: Path) -> list[tuple[int, dict]]:
    """(line number, {"question", "context"[, "id"]}) for each object of a JSON Lines file, checked line by line."""
    pairs = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):  # not splitlines: U+2028 is JSON text
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
        if not isinstance(pair, dict) or not all(isinstance(pair.get(key), str) for key in ("question", "context")):
            raise ValueError(f'{path}:{number}: expected an object with string "question" and "context"')
        if not (pair["question"].strip() and pair["context"].strip()):
            raise ValueError(f"{path}:{number}: the question or the context is empty")
        pairs.append((number, pair))
    if not pairs:
        raise ValueError(f"{path} holds no question")
    return pairs


def _pair_index(error: ValueError) -> int:
    """The pair position that a pipeline error message names ("context 3 has no tokens"), else 0."""
    found = re.search(r"\b(?:question|context) (\d+)\b", str(error))
    return int(found[1]) if found else 0


@contextlib.contextmanager
def open_output(path: Path | None) -> Iterator:
    """Stdout, or a file that replaces ``path`` only once everything is written: an error midway
    leaves an existing file as it was."""
    if path is None:
        yield sys.stdout
        return
    if path.is_dir():
        raise ValueError(f"--output {path} is a directory; name a file")
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as out:
            yield out
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
