"""End-to-end question answering speed: distilqa's QuestionAnswerer against the transformers
question-answering pipeline, tokenization and decoding included, and the rate of identical answers.

Both answer the first N questions (512 by default) of SQuAD v1.1 dev with the same checkpoint and
tokenizer files: transformers' DistilBertForQuestionAnswering with random weights at the published
configuration (or ``--model DIR``), and a tokenizer built from the real cased vocabulary. The
reference runs at each of its batch sizes (1, 8, 32 by default); the ratio is against the best of
them. An answer is identical when (answer, start, end) are equal.

    python benchmarks/pipeline.py                     # CPU, fp32, writes benchmarks/results/pipeline-cpu.json
    python benchmarks/pipeline.py --device cuda       # also fp16 and bf16 (all 10570 questions: --questions 0)
    python benchmarks/pipeline.py --small             # a tiny model and 16 questions, to check the script
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/pipeline.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    DTYPES,
    add_common_arguments,
    default_output,
    format_table,
    machine_info,
    plot_panels,
    setup,
    write_json,
)
from distilqa import DistilBertConfig, QuestionAnswerer
from distilqa.parity import save_reference_checkpoint
from distilqa.squad import read_squad
from distilqa.tokenization import write_tokenizer_files

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL_CONFIG = DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, default_repeats=1, default_warmup=1)  # --repeats: unused, one pass over the data
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "squad" / "dev-v1.1.json.zip", help="SQuAD v1.1")
    parser.add_argument("--vocab", type=Path, default=SHARED_DATA / "vocab" / "bert-base-cased-vocab.txt")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint folder with tokenizer files")
    parser.add_argument("--questions", type=int, default=512, help="the first N questions (0: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="distilqa's windows per forward pass")
    parser.add_argument("--chunks", type=int, default=8, help="interleave the pipelines over this many chunks")
    parser.add_argument("--reference-batch-sizes", default="1,8,32", help="transformers pipeline batch sizes")
    return parser.parse_args(argv)


def make_checkpoint(directory: Path, args: argparse.Namespace) -> Path:
    """The random-weight reference checkpoint plus tokenizer files, unless --model names one."""
    if args.model is not None:
        return args.model
    if not args.vocab.exists():
        raise SystemExit(f"vocabulary not found at {args.vocab}; pass --vocab or --model")
    save_reference_checkpoint(directory, SMALL_CONFIG if args.small else DistilBertConfig())
    write_tokenizer_files(directory, args.vocab, lowercase=False)
    return directory


def keys(results: list[Any]) -> list[tuple[str, int, int]]:
    return [(r["answer"], r["start"], r["end"]) for r in results]


def interleaved(runners, questions, contexts, chunks: int, warmup: bool):
    """Answer all questions with every runner, chunk by chunk in turn (A, B, C on chunk 1, then on
    chunk 2, ...), so that load from other processes falls on all of them alike. Returns each
    runner's answers and total seconds."""
    if warmup:
        for run_chunk in runners.values():
            run_chunk(questions[:8], contexts[:8])
    answers = {name: [] for name in runners}
    seconds = dict.fromkeys(runners, 0.0)
    size = -(-len(questions) // chunks)
    for start in range(0, len(questions), size):
        for name, run_chunk in runners.items():
            began = time.perf_counter()
            result = run_chunk(questions[start : start + size], contexts[start : start + size])
            seconds[name] += time.perf_counter() - began
            answers[name].extend(result if isinstance(result, list) else [result])
    return answers, seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    device, dtype_names = setup(args)
    if not args.data.exists():
        raise SystemExit(f"SQuAD v1.1 not found at {args.data}; pass --data")
    count = 16 if args.small else args.questions
    squad = read_squad(args.data)
    squad = squad[:count] if count > 0 else squad
    questions, contexts = [q.question for q in squad], [q.context for q in squad]
    reference_batch_sizes = [int(b) for b in args.reference_batch_sizes.split(",")]
    warmup = args.warmup > 0  # one warm-up pass over 8 questions: the full set is long
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="distilqa-bench-") as tmp:
        checkpoint = make_checkpoint(Path(tmp), args)
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            ours = QuestionAnswerer.from_pretrained(checkpoint, device=device, dtype=dtype, batch_size=args.batch_size)
            reference = transformers.pipeline(
                "question-answering", model=str(checkpoint), tokenizer=str(checkpoint), device=device, dtype=dtype
            )
            runners = {"distilqa": ours}
            for batch_size in reference_batch_sizes:
                runners[str(batch_size)] = lambda q, c, b=batch_size, pipe=reference: pipe(
                    question=q, context=c, batch_size=b
                )
            results, seconds = interleaved(runners, questions, contexts, args.chunks, warmup)
            ours_keys = keys(results.pop("distilqa"))
            row = {"dtype": dtype_name, "questions": len(questions), "distilqa_seconds": seconds.pop("distilqa")}
            row["distilqa_questions_per_second"] = len(questions) / row["distilqa_seconds"]
            row["reference"] = {}
            for batch_size, answers in results.items():
                identical = sum(a == b for a, b in zip(ours_keys, keys(answers)))
                row["reference"][batch_size] = {
                    "seconds": seconds[batch_size],
                    "questions_per_second": len(questions) / seconds[batch_size],
                    "identical_answers": identical,
                    "identical_rate": identical / len(questions),
                }
            best = max(row["reference"].items(), key=lambda item: item[1]["questions_per_second"])
            row["best_reference_batch_size"] = int(best[0])
            row["speedup_vs_best_reference"] = row["distilqa_questions_per_second"] / best[1]["questions_per_second"]
            row["identical_rate_vs_best_reference"] = best[1]["identical_rate"]
            rows.append(row)
    return {
        "benchmark": "pipeline",
        "machine": machine_info(device),
        "settings": {
            "data": str(args.data),
            "questions": len(questions),
            "model": str(args.model) if args.model else ("small random" if args.small else "random, published config"),
            "distilqa_batch_size": args.batch_size,
            "reference_batch_sizes": reference_batch_sizes,
            "chunks_interleaved": args.chunks,
            "attn_implementation": "sdpa (both)",
        },
        "results": rows,
    }


def print_table(payload: dict[str, Any]) -> None:
    table = []
    for row in payload["results"]:
        table.append(
            [f"distilqa {row['dtype']}", row["distilqa_questions_per_second"], row["distilqa_seconds"], "-", "-"]
        )
        for batch_size, ref in row["reference"].items():
            speedup = row["distilqa_questions_per_second"] / ref["questions_per_second"]
            name = f"transformers {row['dtype']} batch {batch_size}"
            table.append([name, ref["questions_per_second"], ref["seconds"], speedup, ref["identical_rate"]])
    print(format_table(["pipeline", "questions/s", "seconds", "distilqa speed-up", "identical"], table))


def plot(payload: dict[str, Any], path: Path) -> Path:
    panels = []
    for row in payload["results"]:
        names = ["distilqa", *(f"transformers b{b}" for b in row["reference"])]
        values = [row["distilqa_questions_per_second"], *(r["questions_per_second"] for r in row["reference"].values())]
        panels.append(
            {
                "title": f"{row['dtype']}, {row['questions']} SQuAD questions",
                "categories": names,
                "series": {"questions/s": (values, None, None)},
            }
        )
    return plot_panels(
        path, panels, "questions per second", f"End-to-end question answering ({payload['machine']['device_name']})"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    payload = run(args)
    print_table(payload)
    output = args.output or default_output("pipeline-small" if args.small else "pipeline", torch.device(args.device))
    print(f"wrote {write_json(output, payload)}")
    if args.plot is not None:
        print(f"wrote {plot(payload, args.plot)}")
    return payload


if __name__ == "__main__":
    main()
