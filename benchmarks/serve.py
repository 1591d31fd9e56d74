"""Serving speed: the HTTP service (dynamic batching) against in-process batching, and bulk answering
on Ray Data actors on a local Ray instance.

The first N SQuAD v1.1 dev questions (256 by default), random weights at the published configuration
(or ``--model DIR``): in process, ``QuestionAnswerer`` in batches of ``--max-batch`` (the rate to
match); the server on 127.0.0.1 in a thread of this process, one request per pair from an async
httpx client at each ``--concurrency`` (pairs/s, p50/p90/p99 latency); Ray, ``answer_on_ray`` with
each of ``--ray-workers`` actors, the cores split between them, actor start included (and reported
alone). In-process and server rounds are interleaved chunk by chunk; each Ray run is compared with an
in-process pass just before it, so drifting load falls on both sides of each ratio.

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

from benchmarks import common
from benchmarks.pipeline import add_data_arguments, make_checkpoint, read_questions
from distilqa import QuestionAnswerer
from distilqa.serve import create_app
from distilqa.testing import post_concurrently, serve_in_thread


def latencies(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000.0 * s for s in seconds)
    cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return {"p50_ms": statistics.median(ms), "p90_ms": cuts[89], "p99_ms": cuts[98], "max_ms": ms[-1]}


def in_process(answerer: QuestionAnswerer, questions: list[str], contexts: list[str], batch: int) -> float:
    """Seconds to answer the pairs in process, ``batch`` at a time."""
    began = time.perf_counter()
    for first in range(0, len(questions), batch):
        answerer(questions[first : first + batch], contexts[first : first + batch])
    return time.perf_counter() - began


def measure_server(answerer, questions, contexts, args, chunks: int = 4) -> tuple[float, list[dict[str, Any]]]:
    """In-process pairs/s and, per concurrency level, the server's pairs/s and latencies."""
    bodies = [{"inputs": {"question": q, "context": c}} for q, c in zip(questions, contexts)]
    levels = [int(level) for level in args.concurrency.split(",")]
    local_seconds = 0.0
    server = {level: {"seconds": 0.0, "latencies": [], "errors": 0} for level in levels}
    app = create_app(answerer, "benchmark", max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    with serve_in_thread(app) as url:
        asyncio.run(post_concurrently(url, bodies[:8], 8))  # warm-up, server and model
        size = -(-len(bodies) // chunks)
        for start in range(0, len(bodies), size):
            stop = start + size
            local_seconds += in_process(answerer, questions[start:stop], contexts[start:stop], args.max_batch)
            for level in levels:
                began = time.perf_counter()
                results = asyncio.run(post_concurrently(url, bodies[start:stop], level))
                server[level]["seconds"] += time.perf_counter() - began
                server[level]["latencies"] += [seconds for _, _, seconds in results]
                server[level]["errors"] += sum(status != 200 for status, _, _ in results)
    rate = len(bodies) / local_seconds
    rows = []
    for level, m in server.items():
        pairs_per_second = len(bodies) / m["seconds"]
        rows.append(
            {"concurrency": level, "pairs_per_second": pairs_per_second, "errors": m["errors"],
             "fraction_of_in_process": pairs_per_second / rate, **latencies(m["latencies"])}
        )  # fmt: skip
    return rate, rows


def measure_ray(answerer, checkpoint: Path, questions, contexts, args) -> list[dict[str, Any]]:
    """Per actor count: Ray's pairs/s (actor start included), one actor's start alone, and the
    in-process rate just before."""
    import ray

    from distilqa.bulk import PairAnswerer, answer_on_ray

    cores = len(os.sched_getaffinity(0))
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for workers in [int(w) for w in args.ray_workers.split(",") if w]:
            cpus = cores / workers
            began = time.perf_counter()  # one actor's start: process, imports, model load
            actor = ray.remote(num_cpus=cpus)(PairAnswerer).remote(str(checkpoint), {}, {}, int(cpus))
            ray.get(actor.__ray_ready__.remote())
            actor_start = time.perf_counter() - began
            ray.kill(actor)
            local_rate = len(questions) / in_process(answerer, questions, contexts, args.max_batch)
            began = time.perf_counter()
            answers = answer_on_ray(
                questions, contexts, checkpoint, workers=workers, cpus_per_worker=cpus, rows_per_batch=args.max_batch
            )
            rate = len(questions) / (time.perf_counter() - began)
            rows.append(
                {"workers": workers, "threads_per_worker": max(1, int(cpus)), "pairs_per_second": rate,
                 "in_process_pairs_per_second_just_before": local_rate, "fraction_of_in_process": rate / local_rate,
                 "one_actor_start_seconds": actor_start, "answers": len(answers)}
            )  # fmt: skip
    finally:
        ray.shutdown()
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, _ = common.setup(args)
    machine = common.machine_info(device)  # before the work: the load average at the start
    questions, contexts = read_questions(args, 32 if args.small else args.questions)
    with tempfile.TemporaryDirectory(prefix="distilqa-bench-") as tmp:
        checkpoint = make_checkpoint(Path(tmp), args)
        answerer = QuestionAnswerer.from_pretrained(checkpoint, device=device, batch_size=args.max_batch)
        rate, server_rows = measure_server(answerer, questions, contexts, args)
        ray_rows = measure_ray(answerer, checkpoint, questions, contexts, args) if args.ray_workers else []
    return {
        "benchmark": "serve",
        "machine": {**machine, "load_average_at_end": common.load_average()},
        "settings": {
            "data": str(args.data),
            "questions": len(questions),
            "model": str(args.model) if args.model else ("small random" if args.small else "random, published config"),
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "server": "uvicorn in a thread of the benchmark process; client: httpx.AsyncClient, one pair per request",
        },
        "in_process_pairs_per_second": rate,
        "server": server_rows,
        "ray": ray_rows,
    }


def table(payload: dict[str, Any]) -> str:
    rate = payload["in_process_pairs_per_second"]
    rows = [[f"in process, batches of {payload['settings']['max_batch']}", rate, 1.0, "", "", "", ""]]
    for row in payload["server"]:
        if "concurrency" in row:  # (older files end the list with a count of batches)
            pairs = row["pairs_per_second"]
            name = f"server, concurrency {row['concurrency']}"
            rows.append([name, pairs, pairs / rate, "", row["p50_ms"], row["p99_ms"], ""])
    for row in payload["ray"]:
        name = f"Ray, {row['workers']} actor(s) x {row['threads_per_worker']} thread(s), actor start included"
        pairs, before = row["pairs_per_second"], row["in_process_pairs_per_second_just_before"]
        rows.append([name, pairs, pairs / rate, pairs / before, "", "", row["one_actor_start_seconds"]])
    headers = ["", "pairs/s", "x in process", "x an in-process pass just before", "p50 ms", "p99 ms", "actor start s"]
    return common.markdown_table(headers, rows)


def options(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, 256)
    parser.add_argument("--concurrency", default="1,8,32", help="client concurrency levels (comma list)")
    parser.add_argument("--max-batch", type=int, default=32, help="server batch, and the in-process batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="server batching wait")
    parser.add_argument("--ray-workers", default="1,2", help="actor counts for Ray (comma list; '': no Ray)")


def main(argv: list[str] | None = None) -> dict[str, Any]:  # one pass; --repeats: unused
    return common.script("serve", __doc__, options, run, table, None, repeats=1, warmup=1, argv=argv)


if __name__ == "__main__":
    main()
