"""An HTTP question-answering service with dynamic batching (FastAPI + uvicorn, the ``serve`` extra).

Requests and responses have the shape of the Hugging Face Hub's question-answering task::

    POST /  (or /v1/question-answering)
    {"inputs": {"question": "...", "context": "..."},          one pair, or a list of such objects
     "parameters": {"top_k": 1, "max_answer_len": 15, "max_seq_len": null, "doc_stride": null,
                    "handle_impossible_answer": false, "align_to_words": true}}        all optional
    -> {"answer": "...", "score": 0.97, "start": 27, "end": 32}
       (a list of top_k of them when top_k > 1; a list per pair when "inputs" is a list)

Dynamic batching: requests wait in a queue; the batcher takes the first, gathers more until it has
``max_batch`` pairs or ``max_wait_ms`` have passed, and answers them in one batched
:class:`~distilqa.pipeline.QuestionAnswerer` call (one per distinct set of parameters) on a worker
thread, so the event loop keeps accepting requests meanwhile. If a batched call fails, each
request of it is answered alone, so one request's bad input never fails another's.

Every refusal is a JSON ``{"error": "..."}`` naming the field or the limit: 400 unreadable JSON,
413 a body over ``max_body_bytes``, 422 a wrong shape, type or value (including more than
``max_pairs`` pairs or a context over ``max_context_chars`` characters), 503 when ``max_queue_pairs``
pairs are already waiting, or while shutting down. On SIGINT/SIGTERM uvicorn stops accepting
connections and the requests already received are answered before the process exits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError(
        f"distilqa serve needs FastAPI and uvicorn ({error.name} is missing): pip install 'distilqa[serve]'"
    ) from None

from distilqa.pipeline import PairError, QuestionAnswerer

ROUTES = ("/", "/v1/question-answering")
# The pipeline's parameters: name -> (default, smallest value); None means "the pipeline's default".
PARAMETERS: dict[str, tuple[Any, int | None]] = {
    "top_k": (1, 1),
    "max_answer_len": (15, 1),
    "max_seq_len": (None, 4),
    "doc_stride": (None, 0),
    "handle_impossible_answer": (False, None),
    "align_to_words": (True, None),
}
MAX_TOP_K = 100  # bounds the size of a response


@dataclass(frozen=True)
class ServerLimits:
    """What one request may hold and how much may wait; each refusal names its limit."""

    max_body_bytes: int = 1_000_000
    max_pairs: int = 64  # question-context pairs per request
    max_context_chars: int = 100_000
    max_question_chars: int = 2_000
    max_queue_pairs: int = 1024  # pairs received but not yet answered, over all requests

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


class RequestError(Exception):
    """A request the service refuses: HTTP status and a message that says what to change."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Job:
    """One request's pairs, waiting for the batcher. ``options`` are the pipeline keyword arguments
    as sorted (name, value) pairs, so equal options group into one call."""

    questions: list[str]
    contexts: list[str]
    options: tuple[tuple[str, Any], ...]
    future: asyncio.Future = field(repr=False)


# ---------------------------------------------------------------------------- request parsing


def parse_request(body: bytes, limits: ServerLimits) -> tuple[list[str], list[str], bool, tuple[tuple[str, Any], ...]]:
    """Check a request body; returns (questions, contexts, whether one pair was sent as an object,
    options). Raises :class:`RequestError` (400 or 422) naming the first wrong field."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the body is not valid JSON ({error})") from None
    if not isinstance(payload, dict):
        raise RequestError(422, f"the body must be a JSON object with 'inputs', got {_json_type(payload)}")
    unknown = sorted(set(payload) - {"inputs", "parameters", "options"})  # "options": Hub client flags, unused here
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(unknown)}; expected 'inputs' and optional 'parameters'")
    if "inputs" not in payload:
        raise RequestError(422, 'missing field \'inputs\': send {"inputs": {"question": "...", "context": "..."}}')
    inputs = payload["inputs"]
    single = isinstance(inputs, dict)
    if single:
        inputs = [inputs]
    elif not isinstance(inputs, list):
        raise RequestError(
            422,
            f"'inputs' must be an object with 'question' and 'context', or a list of them; got {_json_type(inputs)}",
        )
    if not inputs:
        raise RequestError(422, "'inputs' is an empty list; send at least one question-context pair")
    if len(inputs) > limits.max_pairs:
        raise RequestError(
            422, f"'inputs' holds {len(inputs)} pairs, more than the limit of {limits.max_pairs} per request"
        )
    questions, contexts = [], []
    for index, pair in enumerate(inputs):
        where = "inputs" if single else f"inputs[{index}]"
        if not isinstance(pair, dict):
            raise RequestError(422, f"{where} must be an object with 'question' and 'context', got {_json_type(pair)}")
        for name, limit in (("question", limits.max_question_chars), ("context", limits.max_context_chars)):
            if name not in pair:
                raise RequestError(422, f"missing field '{where}.{name}'")
            text = pair[name]
            if not isinstance(text, str):
                raise RequestError(422, f"'{where}.{name}' must be a string, got {_json_type(text)}")
            if not text.strip():
                raise RequestError(422, f"'{where}.{name}' is empty or only whitespace")
            if len(text) > limit:
                raise RequestError(422, f"'{where}.{name}' has {len(text)} characters, more than the limit of {limit}")
        if extra := sorted(set(pair) - {"question", "context"}):
            raise RequestError(422, f"unknown field(s) in {where}: {', '.join(extra)}")
        questions.append(pair["question"])
        contexts.append(pair["context"])
    return questions, contexts, single, parse_parameters(payload.get("parameters"))


def parse_parameters(parameters: Any) -> tuple[tuple[str, Any], ...]:
    """The pipeline options of a request's ``parameters`` object, defaults filled in, sorted by name."""
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise RequestError(422, f"'parameters' must be an object, got {_json_type(parameters)}")
    if unknown := sorted(set(parameters) - set(PARAMETERS)):
        raise RequestError(
            422, f"unknown parameter(s) {', '.join(unknown)}; supported: {', '.join(sorted(PARAMETERS))}"
        )
    options = {}
    for name, (default, lowest) in PARAMETERS.items():
        value = parameters.get(name, default)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise RequestError(422, f"'parameters.{name}' must be true or false, got {json.dumps(value)}")
        elif value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise RequestError(422, f"'parameters.{name}' must be an integer >= {lowest}, got {json.dumps(value)}")
            if name == "top_k" and value > MAX_TOP_K:
                raise RequestError(422, f"'parameters.top_k' is {value}, more than the limit of {MAX_TOP_K}")
        options[name] = value
    return tuple(sorted(options.items()))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body has {int(declared)} bytes, more than the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked upload without a length: stop reading at the limit
            raise RequestError(413, f"the body has more than {limit} bytes, the limit")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------- dynamic batching


class QueueFullError(Exception):
    """The batcher already holds ``max_queue_pairs`` pairs, or is shutting down."""


def check_batching(max_batch: int, max_wait_ms: float) -> None:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if not (isinstance(max_wait_ms, (int, float)) and math.isfinite(max_wait_ms) and max_wait_ms >= 0):
        raise ValueError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")


class DynamicBatcher:
    """Gathers concurrent jobs into batches of up to ``max_batch`` pairs (waiting at most
    ``max_wait_ms`` after the first) and answers each batch with ``answer`` on one worker thread.

    ``answer(questions, contexts, **options)`` returns one result per pair (QuestionAnswerer's
    list form). Only one batch runs at a time; while it runs, the next one gathers."""

    def __init__(
        self,
        answer: Callable[..., list[Any]],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue_pairs: int = 1024,
    ):
        check_batching(max_batch, max_wait_ms)
        self.answer = answer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_pairs = max_queue_pairs
        self.pending_pairs = 0  # received and not yet answered
        self.batches = 0  # batched calls made, for /info and tests
        self.stopping = False
        self._jobs: collections.deque[Job] = collections.deque()
        self._arrived = asyncio.Event()  # set when a job is queued, or to wake the worker to stop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distilqa-batch")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="distilqa-batcher")

    async def stop(self) -> None:
        """Answer every job already queued, then stop the worker."""
        self.stopping = True
        self._arrived.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def submit(self, questions: list[str], contexts: list[str], options: tuple[tuple[str, Any], ...]) -> asyncio.Future:
        """Queue one request's pairs; the future gets its list of results, or the exception that
        answering it alone raised. Raises :class:`QueueFullError` instead of queueing without bound."""
        if self.stopping:
            raise QueueFullError("the server is shutting down")
        if self.pending_pairs + len(questions) > self.max_queue_pairs:
            raise QueueFullError(
                f"the server is busy: {self.pending_pairs} pairs are waiting and the queue holds at most "
                f"{self.max_queue_pairs}; retry later"
            )
        future = asyncio.get_running_loop().create_future()
        self.pending_pairs += len(questions)
        future.add_done_callback(lambda _: self._release(len(questions)))
        self._jobs.append(Job(questions, contexts, options, future))
        self._arrived.set()
        return future

    def _release(self, pairs: int) -> None:
        self.pending_pairs -= pairs

    async def _wait_for_job(self, timeout: float | None) -> bool:
        """Wait until a job is queued (True) or ``timeout`` seconds pass (False). An Event, not a
        Queue.get under wait_for: a timeout then can never swallow a job."""
        while not self._jobs:
            if self.stopping or (timeout is not None and timeout <= 0):
                return False
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                return bool(self._jobs)
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while await self._wait_for_job(None):  # False only once stopping with nothing queued
            first = self._jobs.popleft()
            batch, pairs = [first], len(first.questions)
            deadline = loop.time() + self.max_wait
            while pairs < self.max_batch and await self._wait_for_job(deadline - loop.time()):
                job = self._jobs.popleft()
                batch.append(job)
                pairs += len(job.questions)
            batch = [job for job in batch if not job.future.done()]  # a client that gave up was cancelled
            if not batch:
                continue
            try:
                outcomes = await loop.run_in_executor(self._executor, self._answer_batch, batch)
            except Exception as error:  # never let the batcher die: every later request would hang
                outcomes = [error] * len(batch)
            self.batches += 1
            for job, outcome in zip(batch, outcomes):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _answer_batch(self, batch: list[Job]) -> list[list[Any] | BaseException]:
        """One call per distinct options; a failing call is retried job by job, so only the jobs
        that fail alone get an exception. Runs on the worker thread."""
        outcomes: list[list[Any] | BaseException] = [[] for _ in batch]
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(batch):
            groups.setdefault(job.options, []).append(index)
        for options, members in groups.items():
            try:
                results = self.answer(
                    [q for i in members for q in batch[i].questions],
                    [c for i in members for c in batch[i].contexts],
                    **dict(options),
                )
            except Exception as error:
                if len(members) == 1:
                    outcomes[members[0]] = error
                    continue
                for i in members:  # find which request it was: answer each alone
                    try:
                        outcomes[i] = self.answer(batch[i].questions, batch[i].contexts, **dict(options))
                    except Exception as single_error:
                        outcomes[i] = single_error
                continue
            start = 0
            for i in members:
                outcomes[i] = results[start : start + len(batch[i].questions)]
                start += len(batch[i].questions)
        return outcomes


# ---------------------------------------------------------------------------- the app


def create_app(
    answerer: QuestionAnswerer,
    model_name: str = "",
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """The FastAPI application serving ``answerer``; its batcher starts and stops with the app's lifespan."""
    from distilqa import __version__

    limits = limits or ServerLimits()
    check_batching(max_batch, max_wait_ms)  # now, not when the server starts

    def answer(questions: list[str], contexts: list[str], **options: Any) -> list[Any]:
        return answerer(questions, contexts, **options)  # lists in: always a list out, one result per pair

    state: dict[str, DynamicBatcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = DynamicBatcher(answer, max_batch, max_wait_ms, limits.max_queue_pairs)
        batcher.start()
        state["batcher"] = app.state.batcher = batcher
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="distilqa", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def refuse(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    async def question_answering(request: Request) -> JSONResponse:
        body = await read_body(request, limits.max_body_bytes)
        questions, contexts, single, options = parse_request(body, limits)
        try:
            future = state["batcher"].submit(questions, contexts, options)
        except QueueFullError as error:
            return JSONResponse({"error": str(error)}, status_code=503, headers={"Retry-After": "1"})
        try:
            answers = await future
        except PairError as error:  # the pipeline's word on one pair of this request, answered alone
            where = f"'inputs.{error.field}'" if single else f"'inputs[{error.index}].{error.field}'"
            raise RequestError(422, f"{where} {error.reason}") from None
        except (ValueError, TypeError) as error:  # the request's options
            raise RequestError(422, str(error)) from None
        except Exception as error:
            return JSONResponse({"error": f"answering failed: {type(error).__name__}: {error}"}, status_code=500)
        return JSONResponse(answers[0] if single else answers)

    for route in ROUTES:
        app.add_api_route(route, question_answering, methods=["POST"], include_in_schema=route != "/")

    @app.get("/health")
    async def health() -> JSONResponse:
        batcher = state.get("batcher")
        if batcher is None or batcher.stopping:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "pending_pairs": batcher.pending_pairs})

    @app.get("/info")
    async def info() -> JSONResponse:
        model = answerer.model
        return JSONResponse(
            {
                "model": model_name,
                "dtype": str(model.dtype).removeprefix("torch."),
                "device": str(model.device),
                "version": __version__,
                "attn_implementation": model.attn_implementation,
                "linear_backend": model.linear_backend,
                "max_batch": max_batch,
                "max_wait_ms": max_wait_ms,
                "batches": state["batcher"].batches if "batcher" in state else 0,
                "limits": asdict(limits),
            }
        )

    return app


def serve(
    answerer: QuestionAnswerer,
    model_name: str = "",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    limits: ServerLimits | None = None,
    graceful_timeout_s: float = 60.0,
    log_level: str = "info",
) -> None:
    """Serve until SIGINT or SIGTERM; then finish the requests already received (for at most
    ``graceful_timeout_s``) and return."""
    app = create_app(answerer, model_name, max_batch, max_wait_ms, limits)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s, access_log=False
    )
    uvicorn.Server(config).run()


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn on a background thread (port 0: any free one) and yield its base
    URL; on exit, shut it down gracefully as SIGTERM would. For tests, notebooks and benchmarks."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="distilqa-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)


async def post_concurrently(
    url: str, bodies: Sequence[Any], concurrency: int, path: str = "/", timeout_s: float = 300.0
) -> list[tuple[int, Any, float]]:
    """POST every body (JSON-encoded, or bytes as they are) to ``url + path`` with at most
    ``concurrency`` requests in flight, from one httpx async client; returns (status, decoded JSON
    body, seconds) per body, in order. The load generator of the tests and the benchmark."""
    import httpx

    results: list[Any] = [None] * len(bodies)
    queue = list(enumerate(bodies))[::-1]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while queue:
                index, body = queue.pop()
                began = time.perf_counter()
                if isinstance(body, bytes):
                    response = await client.post(path, content=body)
                else:
                    response = await client.post(path, json=body)
                results[index] = (response.status_code, response.json(), time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results
