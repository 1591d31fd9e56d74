"""The HTTP service: answers equal to direct QuestionAnswerer calls, refusals with clear 4xx errors in
one JSON shape, dynamic batching under load, 503 on a full queue, the page and /explain, Prometheus
metrics, and a service that stops as a service (driven as a user would: `distilqa serve` in a
subprocess, then SIGINT). Loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import re
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

from distilqa import QuestionAnswerer, __version__  # noqa: E402
from distilqa.serve import ServerLimits, create_app  # noqa: E402
from distilqa.testing import post_concurrently as post_all  # noqa: E402
from distilqa.testing import serve_in_thread  # noqa: E402

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
    (
        json.dumps({"inputs": {"question": "q", "context": "\x01\x02"}}).encode(),
        422,
        "'inputs': the context has no tokens",
    ),
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
    assert list(response.json()) == ["error"] and words in response.json()["error"]
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
    assert "'inputs[1]': the context has no tokens" in results[3][1]["error"]
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


@pytest.mark.parametrize(
    ("method", "path", "status", "words"),
    [
        ("GET", "/nowhere", 404, "no route /nowhere"),
        ("POST", "/nowhere", 404, "no route /nowhere"),
        ("GET", "/v1/question-answering", 405, "GET is not allowed on /v1/question-answering; use POST"),
        ("PUT", "/explain", 405, "PUT is not allowed on /explain"),
        ("DELETE", "/health", 405, "use GET"),
    ],
)
def test_every_error_has_one_json_shape(client, method, path, status, words):
    """Unknown routes and wrong methods answer as every refusal does: {"error": "..."} and nothing else."""
    response = client.request(method, path)
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    assert list(response.json()) == ["error"] and words in response.json()["error"], response.text


def test_explain_endpoint_returns_explains_numbers(client, answerer):
    """POST /explain returns what distilqa.explain.explain computes for the same pair: one implementation."""
    from distilqa.explain import explain

    served = client.post("/explain", json={**PAIR, "head": [0, 1]})
    assert served.status_code == 200, served.text
    direct = json.loads(json.dumps(explain(answerer, PAIR["question"], PAIR["context"], head=(0, 1))))
    assert served.json() == direct
    assert served.json()["logit_lens"]["answer_rank"][-1] == 1


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"question": "q"}, "missing field 'context'"),
        ({**PAIR, "head": [5, 0]}, "head 5.0 does not exist"),
        ({**PAIR, "head": "0.1"}, "'head' must be [layer, head]"),
        ({**PAIR, "max_answer_len": 0}, "'max_answer_len' must be an integer >= 1"),
        ({**PAIR, "context": "\x01\x02"}, "the context has no tokens"),
        ({**PAIR, "extra": 1}, "unknown field(s) extra"),
    ],
)
def test_explain_endpoint_refuses_clearly(client, body, words):
    response = client.post("/explain", json=body)
    assert response.status_code == 422 and list(response.json()) == ["error"]
    assert words in response.json()["error"], response.text


def test_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        assert f"/web/{name}" in page.text
        response = client.get(f"/web/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    # Self-contained: nothing but this service's own paths.
    assert not re.search(r"(src|href)=\"(?!/)", page.text) and "http" not in client.get("/web/style.css").text


def test_examples_come_from_squad_or_are_absent(answerer, tmp_path):
    if not SQUAD_FILE.exists():
        pytest.skip(f"SQuAD dev set not found at {SQUAD_FILE}")
    with serve_in_thread(create_app(answerer, "tiny", examples=SQUAD_FILE)) as url:
        examples = httpx.get(f"{url}/examples").json()
    assert len(examples) == 8 and len({e["title"] for e in examples}) == 8
    from distilqa.squad import read_squad

    first = read_squad(SQUAD_FILE)[0]
    assert (examples[0]["question"], examples[0]["context"]) == (first.question, first.context)
    with serve_in_thread(create_app(answerer, "tiny", examples=None)) as url:
        assert httpx.get(f"{url}/examples").json() == []
        assert httpx.get(f"{url}/info").json()["examples"] is False


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition (labels in any order)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, value = line.rsplit(" ", 1)
        found = dict(re.findall(r'(\w+)="([^"]*)"', sample))
        if sample.split("{")[0] == name and found == labels:
            return float(value)
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def test_metrics_count_requests_batches_and_pairs(answerer):
    """A fresh app (its own registry: a second app in this process must not collide with it)."""
    app = create_app(answerer, "tiny", max_batch=16, max_wait_ms=200)
    other = create_app(answerer, "other")  # noqa: F841 (registered alongside: no duplicate-metric error)
    with serve_in_thread(app) as url:
        bodies = [{"inputs": PAIR}] * 3 + [{"inputs": [PAIR, PAIR]}, b"not json"]
        results = asyncio.run(post_all(url, bodies, concurrency=5))
        assert [status for status, _, _ in results] == [200, 200, 200, 200, 400]
        httpx.get(f"{url}/nowhere")
        text = httpx.get(f"{url}/metrics").text
    assert metric(text, "distilqa_requests_total", route="/", method="POST", status="200") == 4
    assert metric(text, "distilqa_requests_total", route="/", method="POST", status="400") == 1
    assert metric(text, "distilqa_requests_total", route="other", method="GET", status="404") == 1
    assert metric(text, "distilqa_request_seconds_count", route="/") == 5
    assert metric(text, "distilqa_pairs_answered_total") == 5
    batches = metric(text, "distilqa_batch_pairs_count")
    assert metric(text, "distilqa_batch_pairs_sum") == 5 and 1 <= batches < 4  # batched, not one by one
    assert metric(text, "distilqa_queue_pairs") == 0
    info = dict(model="tiny", dtype="float32", device="cpu", version=__version__)
    assert metric(text, "distilqa_model_info", **info) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_cli_server(checkpoint: Path, port: int, *options: str) -> subprocess.Popen:
    """`distilqa serve` in a subprocess, as a user starts it; returns once /health answers 200."""
    command = [sys.executable, "-m", "distilqa.cli", "serve", "--model", str(checkpoint), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--linear-backend", "aten", *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


def test_sigint_finishes_requests_in_flight_then_exits_0(tiny_checkpoint, answerer):
    """`distilqa serve` gets SIGINT while 8 requests wait in its batch: a new request gets a JSON 503,
    all 8 are answered, and the process exits 0 with no traceback."""
    port = free_port()
    process = start_cli_server(tiny_checkpoint, port, "--max-batch", "64", "--max-wait-ms", "3000")
    url = f"http://{HOST}:{port}"
    try:
        bodies = [
            {"inputs": {"question": f"Where was company {i} founded?", "context": PAIR["context"]}} for i in range(8)
        ]
        results: list = []
        client = threading.Thread(target=lambda: results.extend(asyncio.run(post_all(url, bodies, concurrency=8))))
        client.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health", timeout=5).json()["pending_pairs"] < len(bodies):  # all 8 received
            assert client.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)  # the batcher still waits for more (3 s): the 8 are in flight
        late = httpx.post(url, json={"inputs": PAIR}, timeout=10)
        client.join(60)
        status = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read()
    assert late.status_code == 503 and "shutting down" in late.json()["error"], late.text
    assert [status for status, _, _ in results] == [200] * len(bodies), results
    for body, (_, served, _) in zip(bodies, results):
        assert_same_answer(served, answerer(body["inputs"]["question"], body["inputs"]["context"]))
    assert status == 0, stderr
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
    assert "finishing 8 request(s) in flight" in stderr


def test_drain_timeout_answers_the_rest_503(tiny_checkpoint):
    """A request that would wait past --drain-timeout is answered 503 (not cut off), and the exit is still 0."""
    port = free_port()
    process = start_cli_server(tiny_checkpoint, port, "--max-wait-ms", "20000", "--drain-timeout", "0.5")
    url = f"http://{HOST}:{port}"
    try:
        results: list = []
        client = threading.Thread(target=lambda: results.extend(asyncio.run(post_all(url, [{"inputs": PAIR}], 1))))
        client.start()
        while httpx.get(f"{url}/health", timeout=5).json()["pending_pairs"] < 1:
            time.sleep(0.02)
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        client.join(60)
        status = process.wait(60)
        seconds = time.monotonic() - began
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read()
    assert results[0][0] == 503 and "stopped before answering" in results[0][1]["error"], results
    assert status == 0 and "Traceback" not in stderr, stderr
    assert seconds < 15, f"stopping took {seconds:.1f} s with a drain timeout of 0.5 s"


def test_a_taken_port_is_one_line_before_the_model_loads(tiny_checkpoint, tmp_path):
    """A second server on a taken port: status 2 and one `distilqa: error:` line, before any model
    loads (its --model does not even exist)."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "distilqa.cli", "serve", "--model", str(tmp_path / "absent"), "--port"]
        result = subprocess.run([*command, str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distilqa: error: "), result.stderr
    assert f"port {port}" in lines[0] and "already in use" in lines[0]


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
