"""Serving speed: the HTTP service (dynamic batching) against in-process batching, and bulk answering
on Ray Data actors on the local Ray instance.

The first N SQuAD v1.1 dev questions (256 by default), with a random-weight model at the published
configuration (or ``--model DIR``):

* in process: ``QuestionAnswerer`` over all pairs in batches of ``--max-batch`` (the rate to match);
* server: ``distilqa.serve`` on 127.0.0.1 (a background thread of this process), one request per
  pair from an async httpx client at each ``--concurrency``: pairs/s and p50/p90/p99 latency;
* Ray: ``distilqa.bulk.answer_on_ray`` with each of ``--ray-workers`` actors on a local Ray
  instance, the cores split evenly between them; wall time includes starting the actors (each
  imports torch and loads the model), which is reported on its own as well.

In-process and server rounds are interleaved chunk by chunk, and each Ray run is compared with an
in-process pass over the same pairs just before it, so load from other processes, which drifts on a
shared machine, falls on both sides of each ratio alike.

    python benchmarks/serve.py                    # writes benchmarks/results/serve-cpu.json
    python benchmarks/serve.py --small            # a tiny model and 32 questions, to check the script
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/serve.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    add_common_arguments,
    default_output,
    format_table,
    load_average,
    machine_info,
    setup,
    write_json,
)
from benchmarks.pipeline import SHARED_DATA, make_checkpoint
from distilqa import QuestionAnswerer
from distilqa.serve import create_app, post_concurrently, serve_in_thread
from distilqa.squad import read_squad


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, default_repeats=1, default_warmup=1)  # --repeats unused: one pass
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "squad" / "dev-v1.1.json.zip", help="SQuAD v1.1")
    parser.add_argument("--vocab", type=Path, default=SHARED_DATA / "vocab" / "bert-base-cased-vocab.txt")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint folder with tokenizer files")
    parser.add_argument("--questions", type=int, default=256, help="the first N questions")
    parser.add_argument("--concurrency", default="1,8,32", help="client concurrency levels (comma list)")
    parser.add_argument("--max-batch", type=int, default=32, help="server batch, and the in-process batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="server batching wait")
    parser.add_argument("--ray-workers", default="1,2", help="actor counts for Ray (comma list; empty: skip Ray)")
    return parser.parse_args(argv)


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000.0 * s for s in seconds)
    cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return {"p50_ms": statistics.median(ms), "p90_ms": cuts[89], "p99_ms": cuts[98], "max_ms": ms[-1]}


def measure_server(
    answerer: QuestionAnswerer, questions: list[str], contexts: list[str], args: argparse.Namespace, chunks: int = 4
) -> tuple[float, list[dict[str, Any]]]:
    """In-process pairs/s and, per concurrency level, the server's pairs/s and latencies."""
    bodies = [{"inputs": {"question": q, "context": c}} for q, c in zip(questions, contexts)]
    levels = [int(level) for level in args.concurrency.split(",")]
    in_process_seconds = 0.0
    server = {level: {"seconds": 0.0, "latencies": [], "errors": 0} for level in levels}
    app = create_app(answerer, "benchmark", max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    with serve_in_thread(app) as url:
        asyncio.run(post_concurrently(url, bodies[:8], 8))  # warm-up, server and model
        size = -(-len(bodies) // chunks)
        for start in range(0, len(bodies), size):
            began = time.perf_counter()
            for first in range(start, min(start + size, len(bodies)), args.max_batch):
                last = min(first + args.max_batch, start + size)
                answerer(questions[first:last], contexts[first:last])
            in_process_seconds += time.perf_counter() - began
            for level in levels:
                began = time.perf_counter()
                results = asyncio.run(post_concurrently(url, bodies[start : start + size], level))
                server[level]["seconds"] += time.perf_counter() - began
                server[level]["latencies"] += [seconds for _, _, seconds in results]
                server[level]["errors"] += sum(status != 200 for status, _, _ in results)
        batches = asyncio.run(_info(url))["batches"]
    in_process_rate = len(bodies) / in_process_seconds
    rows = []
    for level, measured in server.items():
        rate = len(bodies) / measured["seconds"]
        rows.append(
            {
                "concurrency": level,
                "pairs_per_second": rate,
                "fraction_of_in_process": rate / in_process_rate,
                "errors": measured["errors"],
                **latency_summary(measured["latencies"]),
            }
        )
    rows.append({"batches_run_by_server": batches})
    return in_process_rate, rows


async def _info(url: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=url) as client:
        return (await client.get("/info")).json()


def measure_ray(
    answerer: QuestionAnswerer, checkpoint: Path, questions: list[str], contexts: list[str], args: argparse.Namespace
) -> list[dict]:
    """Per actor count: Ray's pairs/s (actor start included), one actor's start alone, and the
    in-process rate measured just before, since load from other processes drifts between runs."""
    import ray

    from distilqa.bulk import PairAnswerer, answer_on_ray

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for workers in [int(w) for w in args.ray_workers.split(",") if w]:
            cpus = cores / workers
            began = time.perf_counter()  # an actor's start alone: process, imports, model load
            ray.get(
                ray.remote(num_cpus=cpus)(PairAnswerer)
                .remote(str(checkpoint), {}, {}, int(cpus))
                .__ray_ready__.remote()
            )
            actor_start = time.perf_counter() - began
            began = time.perf_counter()
            for first in range(0, len(questions), args.max_batch):
                answerer(questions[first : first + args.max_batch], contexts[first : first + args.max_batch])
            in_process_rate = len(questions) / (time.perf_counter() - began)
            began = time.perf_counter()
            answers = answer_on_ray(
                questions, contexts, checkpoint, workers=workers, cpus_per_worker=cpus, rows_per_batch=args.max_batch
            )
            seconds = time.perf_counter() - began
            rows.append(
                {
                    "workers": workers,
                    "threads_per_worker": max(1, int(cpus)),
                    "seconds_with_actor_start": seconds,
                    "pairs_per_second": len(questions) / seconds,
                    "in_process_pairs_per_second_just_before": in_process_rate,
                    "fraction_of_in_process": len(questions) / seconds / in_process_rate,
                    "one_actor_start_seconds": actor_start,
                    "answers": len(answers),
                }
            )
    finally:
        ray.shutdown()
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, _ = setup(args)
    machine = machine_info(device)  # before the work: its load average is the one at the start
    if not args.data.exists():
        raise SystemExit(f"SQuAD v1.1 not found at {args.data}; pass --data")
    squad = read_squad(args.data)[: 32 if args.small else args.questions]
    questions, contexts = [q.question for q in squad], [q.context for q in squad]
    with tempfile.TemporaryDirectory(prefix="distilqa-bench-") as tmp:
        checkpoint = make_checkpoint(Path(tmp), args)
        answerer = QuestionAnswerer.from_pretrained(checkpoint, device=device, batch_size=args.max_batch)
        in_process_rate, server_rows = measure_server(answerer, questions, contexts, args)
        ray_rows = measure_ray(answerer, checkpoint, questions, contexts, args) if args.ray_workers else []
    return {
        "benchmark": "serve",
        "machine": {**machine, "load_average_at_end": load_average()},
        "settings": {
            "data": str(args.data),
            "questions": len(questions),
            "model": str(args.model) if args.model else ("small random" if args.small else "random, published config"),
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "linear_backend": answerer.model.linear_backend,
            "server": "uvicorn in a thread of the benchmark process; client: httpx.AsyncClient, one pair per request",
        },
        "in_process_pairs_per_second": in_process_rate,
        "server": server_rows,
        "ray": ray_rows,
    }


def print_table(payload: dict[str, Any]) -> None:
    rows = [["in process", payload["in_process_pairs_per_second"], 1.0, "-", "-", "-"]]
    for row in payload["server"]:
        if "concurrency" in row:
            rows.append(
                [
                    f"server, concurrency {row['concurrency']}",
                    row["pairs_per_second"],
                    row["fraction_of_in_process"],
                    row["p50_ms"],
                    row["p99_ms"],
                    row["errors"],
                ]
            )
    for row in payload["ray"]:
        name = f"ray, {row['workers']} worker(s), vs in process just before"
        rows.append([name, row["pairs_per_second"], row["fraction_of_in_process"], "-", "-", "-"])
    print(format_table(["", "pairs/s", "x in process", "p50 ms", "p99 ms", "errors"], rows))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    payload = run(args)
    print_table(payload)
    output = args.output or default_output("serve-small" if args.small else "serve", torch.device(args.device))
    print(f"wrote {write_json(output, payload)}")
    return payload


if __name__ == "__main__":
    main()
