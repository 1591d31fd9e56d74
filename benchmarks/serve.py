"""Serving speed on the first N SQuAD v1.1 dev questions: in process, QuestionAnswerer in batches of
``--max-batch`` (the rate to match); the HTTP server in a thread, one request per pair from an async
httpx client at each ``--concurrency``, the two interleaved chunk by chunk; ``answer_on_ray`` with each
of ``--ray-workers`` local Ray actors (actor start included) against an in-process pass just before."""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: `benchmarks` importable

import torch

from benchmarks import common
from benchmarks.pipeline import add_data_arguments, interleaved, load_data, model_name
from distilqa import QuestionAnswerer
from distilqa.serve import create_app
from distilqa.testing import post_concurrently, serve_in_thread


def in_process(answerer: QuestionAnswerer, questions: list[str], contexts: list[str], batch: int) -> float:
    began = time.perf_counter()
    for first in range(0, len(questions), batch):
        answerer(questions[first : first + batch], contexts[first : first + batch])
    return time.perf_counter() - began


def measure_server(answerer, questions, contexts, args) -> tuple[float, list[dict[str, Any]]]:
    """In-process pairs/s and, per concurrency level, the server's pairs/s and latencies."""
    app = create_app(answerer, "benchmark", max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    with serve_in_thread(app) as url:

        def post(questions: list[str], contexts: list[str], level: int) -> list:  # one request per pair
            bodies = [{"inputs": {"question": q, "context": c}} for q, c in zip(questions, contexts)]
            return asyncio.run(post_concurrently(url, bodies, level))

        levels = [int(level) for level in args.concurrency.split(",")]
        runners = {"in process": lambda q, c: in_process(answerer, q, c, args.max_batch)}
        runners |= {level: partial(post, level=level) for level in levels}
        results, seconds, _ = interleaved(runners, questions, contexts, chunks=4)
    rate, rows = len(questions) / seconds["in process"], []
    for level in levels:
        ms = sorted(1000.0 * took for _, _, took in results[level])
        cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
        rows.append({"concurrency": level, "pairs_per_second": len(questions) / seconds[level],
                     "errors": sum(status != 200 for status, _, _ in results[level]),
                     "fraction_of_in_process": len(questions) / seconds[level] / rate, "p50_ms": statistics.median(ms),
                     "p90_ms": cuts[89], "p99_ms": cuts[98], "max_ms": ms[-1]})  # fmt: skip
    return rate, rows


def measure_ray(answerer, checkpoint: Path, questions, contexts, args) -> list[dict[str, Any]]:
    """Per actor count: pairs/s (actor start included), one actor's start, the in-process rate just before."""
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
            rows.append({"workers": workers, "threads_per_worker": max(1, int(cpus)), "pairs_per_second": rate,
                         "in_process_pairs_per_second_just_before": local_rate,
                         "fraction_of_in_process": rate / local_rate, "one_actor_start_seconds": actor_start,
                         "answers": len(answers)})  # fmt: skip
    finally:
        ray.shutdown()
    return rows


def run(args: argparse.Namespace, device: torch.device, _: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="distilqa-bench-") as tmp:
        checkpoint, questions, contexts = load_data(args, Path(tmp), 32 if args.small else args.questions)
        answerer = QuestionAnswerer.from_pretrained(checkpoint, device=device, batch_size=args.max_batch)
        rate, server_rows = measure_server(answerer, questions, contexts, args)
        ray_rows = measure_ray(answerer, checkpoint, questions, contexts, args) if args.ray_workers else []
    server = "uvicorn in a thread of the benchmark process; client: httpx.AsyncClient, one pair per request"
    settings = {"data": str(args.data), "questions": len(questions), "model": model_name(args),
                "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "server": server}  # fmt: skip
    return {"settings": settings, "in_process_pairs_per_second": rate, "server": server_rows, "ray": ray_rows}


def table(payload: dict[str, Any]) -> str:
    rate = payload["in_process_pairs_per_second"]
    rows = [[f"in process, batches of {payload['settings']['max_batch']}", rate, 1.0, "", "", "", ""]]
    for row in payload["server"]:
        name, pairs = f"server, concurrency {row['concurrency']}", row["pairs_per_second"]
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


if __name__ == "__main__":  # one pass: --repeats, --warmup, --dtypes and --plot are unused
    common.main("serve", __doc__, options, run, table, None, repeats=1, warmup=1)
