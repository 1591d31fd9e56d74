"""The HTTP service: answers equal to direct QuestionAnswerer calls, refusals with clear 4xx errors,
dynamic batching under load, 503 on a full queue, and a graceful shutdown. Loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import SQUAD_FILE, save_reference_checkpoint, write_tokenizer_files  # noqa: E402

from distilqa import QuestionAnswerer  # noqa: E402
from distilqa.serve import ServerLimits, create_app, serve_in_thread  # noqa: E402
from distilqa.serve import post_concurrently as post_all  # noqa: E402

HOST = "127.0.0.1"
PAIR = {"question": "Where was it founded?", "context": "The company was founded in Paris in 1999."}


@pytest.fixture(scope="module")
def squad_pairs() -> list[dict]:
    if not SQUAD_FILE.exists():
        pytest.skip(f"SQuAD dev set not found at {SQUAD_FILE}")
    from distilqa.squad import read_squad

    return [{"question": q.question, "context": q.context} for q in read_squad(SQUAD_FILE)[:256]]


@pytest.fixture(scope="module")
def answerer(tiny_checkpoint) -> QuestionAnswerer:
    return QuestionAnswerer.from_pretrained(tiny_checkpoint, linear_backend="aten")


@pytest.fixture(scope="module")
def server(answerer) -> str:
    """One server for the tests of mechanics; small limits so that each can be hit cheaply."""
    limits = ServerLimits(max_body_bytes=20_000, max_pairs=8, max_context_chars=5_000, max_question_chars=500)
    with serve_in_thread(create_app(answerer, "tiny", max_batch=16, max_wait_ms=20, limits=limits)) as url:
        yield url


def assert_same_answer(served: dict, direct: dict) -> None:
    """Same span and text; the score within float32 rounding (batch companions change GEMM blocking)."""
    assert (served["answer"], served["start"], served["end"]) == (direct["answer"], direct["start"], direct["end"])
    assert served["score"] == pytest.approx(direct["score"], rel=1e-4, abs=1e-7)


def test_answers_equal_direct_calls(server, answerer, squad_pairs):
    pairs = squad_pairs[:24]
    bodies = [{"inputs": pair} for pair in pairs]
    bodies.append({"inputs": pairs[:3], "parameters": {"top_k": 2, "max_answer_len": 5}})
    bodies.append({"inputs": pairs[3], "parameters": {"handle_impossible_answer": True, "max_seq_len": 64}})
    before = httpx.get(f"{server}/info").json()["batches"]
    results = asyncio.run(post_all(server, bodies, concurrency=len(bodies)))
    assert [status for status, _, _ in results] == [200] * len(bodies), results
    for pair, (_, served, _) in zip(pairs, results):
        assert_same_answer(served, answerer(pair["question"], pair["context"]))
    listed = results[24][1]
    assert len(listed) == 3 and all(len(top) == 2 for top in listed)
    for pair, top in zip(pairs[:3], listed):
        for served, direct in zip(top, answerer(pair["question"], pair["context"], top_k=2, max_answer_len=5)):
            assert_same_answer(served, direct)
    direct = answerer(pairs[3]["question"], pairs[3]["context"], handle_impossible_answer=True, max_seq_len=64)
    assert_same_answer(results[25][1], direct)
    batches = httpx.get(f"{server}/info").json()["batches"] - before
    assert batches < len(bodies) / 2, f"{len(bodies)} concurrent requests took {batches} batches: no batching"


BAD_REQUESTS = [  # (body, status, words the error must contain)
    (b'{"inputs": {"question": "q", ', 400, "not valid JSON"),
    (b"[1, 2]", 422, "JSON object"),
    (json.dumps({"question": "q", "context": "c"}).encode(), 422, "unknown field(s) context, question"),
    (json.dumps({"parameters": {}}).encode(), 422, "missing field 'inputs'"),
    (json.dumps({"inputs": {"question": "q"}}).encode(), 422, "missing field 'inputs.context'"),
    (json.dumps({"inputs": {"question": 3, "context": "c"}}).encode(), 422, "'inputs.question' must be a string"),
    (json.dumps({"inputs": [PAIR, {"question": "q", "context": None}]}).encode(), 422, "'inputs[1].context'"),
    (json.dumps({"inputs": "Where?"}).encode(), 422, "'inputs' must be an object"),
    (json.dumps({"inputs": []}).encode(), 422, "empty list"),
    (json.dumps({"inputs": {"question": " ", "context": "c"}}).encode(), 422, "'inputs.question' is empty"),
    (json.dumps({"inputs": PAIR, "parameters": {"top_k": "3"}}).encode(), 422, "'parameters.top_k' must be an integer"),
    (
        json.dumps({"inputs": PAIR, "parameters": {"top_k": True}}).encode(),
        422,
        "'parameters.top_k' must be an integer",
    ),
    (json.dumps({"inputs": PAIR, "parameters": {"align_to_words": 1}}).encode(), 422, "must be true or false"),
    (json.dumps({"inputs": PAIR, "parameters": {"topk": 3}}).encode(), 422, "unknown parameter(s) topk"),
    (json.dumps({"inputs": PAIR, "parameters": {"doc_stride": 400}}).encode(), 422, "doc_stride (400) must be smaller"),
    (json.dumps({"inputs": [PAIR] * 9}).encode(), 422, "9 pairs, more than the limit of 8"),
    (json.dumps({"inputs": {"question": "q", "context": "x " * 2600}}).encode(), 422, "more than the limit of 5000"),
    (json.dumps({"inputs": {"question": "q", "context": "\x01\x02"}}).encode(), 422, "'inputs.context' has no tokens"),
    (json.dumps({"inputs": [PAIR] * 8, "padding": "x" * 20_000}).encode(), 413, "more than the limit of 20000"),
]


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


@pytest.mark.parametrize(("body", "status", "words"), BAD_REQUESTS, ids=[words for _, _, words in BAD_REQUESTS])
def test_bad_requests_are_refused_clearly(client, body, status, words):
    response = client.post("/", content=body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/", json={"inputs": PAIR}).status_code == 200


def test_oversized_body_without_length_is_refused(server):
    """A chunked upload has no Content-Length: the limit is enforced while reading."""

    def chunks():
        for _ in range(30):
            yield b" " * 1000

    response = httpx.post(f"{server}/", content=chunks())
    assert response.status_code == 413 and "limit" in response.json()["error"]
    assert httpx.post(f"{server}/", json={"inputs": PAIR}).status_code == 200


def test_bad_input_fails_only_its_own_request(server, answerer):
    """Requests batched together, one of which the pipeline refuses: only that one fails."""
    good = [{"inputs": {"question": f"Where was company {i} founded?", "context": PAIR["context"]}} for i in range(6)]
    bad = {"inputs": [PAIR, {"question": "Where?", "context": "\x01 \x02"}]}
    results = asyncio.run(post_all(server, [*good[:3], bad, *good[3:]], concurrency=7))
    statuses = [status for status, _, _ in results]
    assert statuses == [200, 200, 200, 422, 200, 200, 200], results
    assert "'inputs[1].context' has no tokens" in results[3][1]["error"]
    for body, (_, served, _) in zip(good, [*results[:3], *results[4:]]):
        assert_same_answer(served, answerer(body["inputs"]["question"], body["inputs"]["context"]))


def test_health_and_info(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    info = httpx.get(f"{server}/info").json()
    assert info["model"] == "tiny" and info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["version"] and info["max_batch"] == 16 and info["limits"]["max_pairs"] == 8


def test_full_queue_answers_503(answerer):
    """Two pairs may wait; the batcher holds them for 1 s, so a third request finds the queue full."""
    app = create_app(answerer, "tiny", max_batch=64, max_wait_ms=1000, limits=ServerLimits(max_queue_pairs=2))
    with serve_in_thread(app) as url:
        results = asyncio.run(post_all(url, [{"inputs": PAIR}] * 3, concurrency=3))
        assert sorted(status for status, _, _ in results) == [200, 200, 503]
        refused = next(body for status, body, _ in results if status == 503)
        assert "busy" in refused["error"] and "at most 2" in refused["error"]
        assert httpx.post(f"{url}/", json={"inputs": PAIR}).status_code == 200  # served again once drained


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_requests_in_flight(tiny_checkpoint, answerer):
    """`distilqa serve` gets SIGTERM while 8 requests wait in its batch: all 8 are answered, then it exits 0."""
    port = free_port()
    command = [sys.executable, "-m", "distilqa.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port)]
    command += ["--max-batch", "64", "--max-wait-ms", "1500", "--linear-backend", "aten"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        bodies = [
            {"inputs": {"question": f"Where was company {i} founded?", "context": PAIR["context"]}} for i in range(8)
        ]
        results: list = []
        client = threading.Thread(target=lambda: results.extend(asyncio.run(post_all(url, bodies, concurrency=8))))
        client.start()
        while httpx.get(f"{url}/health", timeout=5).json()["pending_pairs"] < len(bodies):  # all 8 received
            assert client.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        client.join(60)
        # uvicorn re-raises the signal once it has shut down, so the exit status is that of SIGTERM
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert [status for status, _, _ in results] == [200] * len(bodies), results
    assert "Finished server process" in process.stdout.read()
    for body, (_, served, _) in zip(bodies, results):
        assert_same_answer(served, answerer(body["inputs"]["question"], body["inputs"]["context"]))


def test_cli_serve_refuses_bad_options(capsys):
    from distilqa.cli import main

    assert main(["serve", "--model", "unused", "--max-batch", "0"]) == 2
    assert "max_batch must be a positive integer" in capsys.readouterr().err


# ---------------------------------------------------------------------------- load


@pytest.fixture(scope="module")
def load_checkpoint(tmp_path_factory) -> Path:
    """A model large enough that its work, not HTTP, sets the pace: width 384, 4 layers (about 25
    ms a pair here; at width 256 and 2 layers the model took 7 ms a pair on a quiet moment, HTTP about
    2 ms a request, and the ratio fell to 0.5-0.9; at width 384 and 3 layers it was 0.87-0.89)."""
    directory = tmp_path_factory.mktemp("load")
    save_reference_checkpoint(directory, dim=384, n_layers=4, n_heads=6, hidden_dim=1536)
    return write_tokenizer_files(directory)


def measure_load(answerer: QuestionAnswerer, url: str, pairs: list[dict]) -> tuple[float, float, list[float]]:
    """(server pairs/s, in-process pairs/s, request latencies): 4 rounds of 64 pairs, each sent as
    single-pair requests at concurrency 32 and answered in process in batches of 32, which goes
    first alternating, so that load from other processes falls on both alike."""
    seconds = {"server": 0.0, "in process": 0.0}
    latencies: list[float] = []

    def in_process(chunk: list[dict]) -> None:
        for start in range(0, len(chunk), 32):  # what a caller with batches of 32 in hand does
            answerer(
                [p["question"] for p in chunk[start : start + 32]], [p["context"] for p in chunk[start : start + 32]]
            )

    def server(chunk: list[dict]) -> None:
        results = asyncio.run(post_all(url, [{"inputs": pair} for pair in chunk], concurrency=32))
        assert [status for status, _, _ in results] == [200] * len(chunk), results
        latencies.extend(seconds for _, _, seconds in results)

    for round_index, start in enumerate(range(0, len(pairs), 64)):
        order = [("in process", in_process), ("server", server)]
        for name, run in order if round_index % 2 == 0 else order[::-1]:
            began = time.perf_counter()
            run(pairs[start : start + 64])
            seconds[name] += time.perf_counter() - began
    return len(pairs) / seconds["server"], len(pairs) / seconds["in process"], latencies


def test_load_throughput_close_to_in_process_batching(load_checkpoint, squad_pairs):
    """256 single-pair requests at concurrency 32 from an async client: no error, and pairs/s at
    least 0.8x of answering the same pairs in process in batches of 32. On a busy machine one
    disturbed measurement is repeated once (a real slowdown fails both). When other processes
    contend for the cores the comparison favours the server (its several threads get a larger share
    of the CPU than in-process batching's), so there only large slowdowns fail it."""
    answerer = QuestionAnswerer.from_pretrained(load_checkpoint, batch_size=32, linear_backend="aten")
    answerer([p["question"] for p in squad_pairs[:8]], [p["context"] for p in squad_pairs[:8]])  # warm-up
    # 25 ms: time for the client, in this same process, to send the next 32 requests, so batches fill
    with serve_in_thread(create_app(answerer, "load", max_batch=32, max_wait_ms=25)) as url:
        for attempt in (1, 2):
            batches = httpx.get(f"{url}/info").json()["batches"]
            server_rate, in_process_rate, latencies = measure_load(answerer, url, squad_pairs[:256])
            batches = httpx.get(f"{url}/info").json()["batches"] - batches
            cuts = statistics.quantiles(latencies, n=100)
            print(
                f"\nload (width-384, 4-layer model, {os.cpu_count()} cores, attempt {attempt}): server "
                f"{server_rate:.1f} pairs/s, p50 {1000 * statistics.median(latencies):.0f} ms, p99 "
                f"{1000 * cuts[98]:.0f} ms, {256 / batches:.1f} pairs a batch; in process, batches of 32: "
                f"{in_process_rate:.1f} pairs/s; "
                f"ratio {server_rate / in_process_rate:.2f}; load average {os.getloadavg()[0]:.1f}"
            )
            if server_rate >= 0.8 * in_process_rate:
                break
    assert server_rate >= 0.8 * in_process_rate


@pytest.mark.slow  # a subprocess that imports torch and runs a tiny model over 32 questions: about 15 s
def test_benchmark_script_runs(tmp_path):
    if not SQUAD_FILE.exists():
        pytest.skip(f"SQuAD dev set not found at {SQUAD_FILE}")
    root = Path(__file__).resolve().parents[1]
    output = tmp_path / "serve-small.json"
    command = [sys.executable, str(root / "benchmarks" / "serve.py"), "--small", "--ray-workers", "", "--output"]
    result = subprocess.run([*command, str(output)], capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(output.read_text(encoding="utf-8"))
    assert payload["machine"]["cpu_model"] and payload["in_process_pairs_per_second"] > 0
    levels = [row for row in payload["server"] if "concurrency" in row]
    assert [row["concurrency"] for row in levels] == [1, 8, 32] and all(row["errors"] == 0 for row in levels)
