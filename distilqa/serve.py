"""An HTTP question-answering service with dynamic batching, a page to try it, and metrics (FastAPI +
uvicorn + prometheus-client, the ``serve`` extra).

Routes:

- ``POST /`` (or ``/v1/question-answering``): the Hugging Face Hub's question-answering task::

    {"inputs": {"question": "...", "context": "..."},          one pair, or a list of such objects
     "parameters": {"top_k": 1, "max_answer_len": 15, "max_seq_len": null, "doc_stride": null,
                    "handle_impossible_answer": false, "align_to_words": true}}        all optional
    -> {"answer": "...", "score": 0.97, "start": 27, "end": 32}
       (a list of top_k of them when top_k > 1; a list per pair when "inputs" is a list)

- ``GET /``: a page to ask questions and look inside the answer (``distilqa/web/``); ``GET /examples``
  the SQuAD contexts it offers (see :mod:`distilqa.web`).
- ``POST /explain`` ``{"question", "context", "head": [layer, head] (optional), "max_answer_len"
  (optional)}``: the numbers of :func:`distilqa.explain.explain` for one pair, as JSON.
- ``GET /health``, ``GET /info``, ``GET /metrics`` (Prometheus text format, :mod:`distilqa.metrics`).

Dynamic batching: requests wait in a queue; the batcher takes the first, gathers more until it has
``max_batch`` pairs or ``max_wait_ms`` have passed, and answers them in one batched
:class:`~distilqa.pipeline.QuestionAnswerer` call (one per distinct set of parameters) on a worker
thread, so the event loop keeps accepting requests meanwhile. If a batched call fails, each
request of it is answered alone, so one request's bad input never fails another's.

Every error, whatever the route, is a JSON ``{"error": "..."}`` that names the field or the limit: 400
unreadable JSON, 404 an unknown path, 405 a wrong method, 413 a body over ``max_body_bytes``, 422 a
wrong shape, type or value (including more than ``max_pairs`` pairs or a context over
``max_context_chars`` characters), 503 when ``max_queue_pairs`` pairs are already waiting, or while
stopping.

Stopping (:func:`serve`): on SIGINT or SIGTERM the service keeps its port but answers every new request
with 503, finishes the requests in flight (for at most ``drain_timeout_s`` seconds; those still
unanswered then get a 503), and returns. A second SIGINT stops at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import math
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError(
        f"distilqa serve needs FastAPI and uvicorn ({error.name} is missing): pip install 'distilqa[serve]'"
    ) from None

from distilqa import web
from distilqa.explain import explain
from distilqa.metrics import ServiceMetrics
from distilqa.options import DEFAULT_OPTIONS
from distilqa.pipeline import PairError, QuestionAnswerer
from distilqa.validate import positive_int, positive_number

ROUTES = ("/", "/v1/question-answering")
# The pipeline's parameters: name -> (default, smallest value); None means "the pipeline's default".
PARAMETERS: dict[str, tuple[Any, int | None]] = {
    "top_k": (DEFAULT_OPTIONS.top_k, 1),
    "max_answer_len": (DEFAULT_OPTIONS.max_answer_len, 1),
    "max_seq_len": (DEFAULT_OPTIONS.max_seq_len, 4),
    "doc_stride": (DEFAULT_OPTIONS.doc_stride, 0),
    "handle_impossible_answer": (DEFAULT_OPTIONS.handle_impossible_answer, None),
    "align_to_words": (DEFAULT_OPTIONS.align_to_words, None),
}
MAX_TOP_K = 100  # bounds the size of a response
AUTO = "auto"  # create_app(examples=AUTO): look for the SQuAD dev set where distilqa.web says


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
            positive_int(name, value)


class RequestError(Exception):
    """A request the service refuses: HTTP status and a message that says what to change."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


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
        check_texts(pair, limits, f"{where}.")
        if extra := sorted(set(pair) - {"question", "context"}):
            raise RequestError(422, f"unknown field(s) in {where}: {', '.join(extra)}")
        questions.append(pair["question"])
        contexts.append(pair["context"])
    return questions, contexts, single, parse_parameters(payload.get("parameters"))


def check_texts(pair: dict, limits: ServerLimits, prefix: str = "") -> None:
    """``pair["question"]`` and ``pair["context"]`` are non-blank strings within the limits, or a 422
    naming ``prefix + field``."""
    for name, limit in (("question", limits.max_question_chars), ("context", limits.max_context_chars)):
        if name not in pair:
            raise RequestError(422, f"missing field '{prefix}{name}'")
        text = pair[name]
        if not isinstance(text, str):
            raise RequestError(422, f"'{prefix}{name}' must be a string, got {_json_type(text)}")
        if not text.strip():
            raise RequestError(422, f"'{prefix}{name}' is empty or only whitespace")
        if len(text) > limit:
            raise RequestError(422, f"'{prefix}{name}' has {len(text)} characters, more than the limit of {limit}")


def parse_explain_request(body: bytes, limits: ServerLimits) -> tuple[str, str, dict[str, Any]]:
    """A ``POST /explain`` body ``{"question", "context", "head": [layer, head], "max_answer_len"}``
    (the last two optional) -> (question, context, keyword arguments of explain)."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the body is not valid JSON ({error})") from None
    if not isinstance(payload, dict):
        raise RequestError(
            422, f"the body must be a JSON object with 'question' and 'context', got {_json_type(payload)}"
        )
    if unknown := sorted(set(payload) - {"question", "context", "head", "max_answer_len"}):
        raise RequestError(
            422, f"unknown field(s) {', '.join(unknown)}; expected question, context, head, max_answer_len"
        )
    check_texts(payload, limits)
    options: dict[str, Any] = {}
    head = payload.get("head")
    if head is not None:
        if not (isinstance(head, list) and len(head) == 2 and all(type(v) is int and v >= 0 for v in head)):
            raise RequestError(422, f"'head' must be [layer, head], two integers >= 0, got {json.dumps(head)}")
        options["head"] = tuple(head)
    max_answer_len = payload.get("max_answer_len", DEFAULT_OPTIONS.max_answer_len)
    if type(max_answer_len) is not int or max_answer_len < 1:
        raise RequestError(422, f"'max_answer_len' must be an integer >= 1, got {json.dumps(max_answer_len)}")
    options["max_answer_len"] = max_answer_len
    return payload["question"], payload["context"], options


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
    positive_int("max_batch", max_batch)
    if not (isinstance(max_wait_ms, (int, float)) and math.isfinite(max_wait_ms) and max_wait_ms >= 0):
        raise ValueError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")


class DynamicBatcher:
    """Gathers concurrent jobs into batches of up to ``max_batch`` pairs (waiting at most
    ``max_wait_ms`` after the first) and answers each batch with ``answer`` on one worker thread.

    ``answer(questions, contexts, **options)`` returns one result per pair (QuestionAnswerer's
    list form). Only one batch runs at a time; while it runs, the next one gathers. ``on_batch(pairs)``
    is called after each batched call (the metrics)."""

    def __init__(
        self,
        answer: Callable[..., list[Any]],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue_pairs: int = 1024,
        on_batch: Callable[[int], None] | None = None,
    ):
        check_batching(max_batch, max_wait_ms)
        self.answer = answer
        self.on_batch = on_batch
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

    async def stop(self, wait: bool = True) -> None:
        """Answer every job already queued, then stop the worker; with ``wait=False``, stop at once
        (a batch already running on the worker thread still ends before the process exits)."""
        self.stopping = True
        self._arrived.set()
        if self._task is not None:
            if not wait:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=wait, cancel_futures=True)

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
            if self.on_batch is not None:
                self.on_batch(sum(len(job.questions) for job in batch))
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


@dataclass
class ServiceState:
    """What the app and the server that stops it share. ``stopped`` is set when the drain time is up:
    requests still waiting then are answered 503 instead of being cut off."""

    draining: bool = False
    in_flight: int = 0
    stopped: asyncio.Event | None = None


class Gate:
    """ASGI middleware around the app: counts requests in flight, answers 503 to new ones while the
    service drains, and records each request's route, status and latency."""

    def __init__(self, app: Any, state: ServiceState, metrics: ServiceMetrics, paths: set[str]):
        self.app, self.state, self.metrics, self.paths = app, state, metrics, paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.paths else "other"  # bounded label values
        began, status = time.perf_counter(), 500

        async def record_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.state.draining:
                await error_response(503, "the server is shutting down; retry on another server")(
                    scope, receive, record_status
                )
                return
            self.state.in_flight += 1
            try:
                await self.app(scope, receive, record_status)
            finally:
                self.state.in_flight -= 1
        finally:
            self.metrics.observe_request(route, scope["method"], status, time.perf_counter() - began)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one shape of every error the service answers."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def unless_stopped(state: ServiceState, work: Awaitable) -> Any:
    """``await work``, or a 503 :class:`RequestError` if the service's drain time ends first."""
    work = asyncio.ensure_future(work)
    if state.stopped is None:
        return await work
    stopped = asyncio.ensure_future(state.stopped.wait())
    try:
        await asyncio.wait((work, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not work.done():
        work.cancel()  # the batcher skips a cancelled request
        raise RequestError(503, "the server stopped before answering this request; retry on another server")
    return work.result()


def create_app(
    answerer: QuestionAnswerer,
    model_name: str = "",
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    limits: ServerLimits | None = None,
    examples: str | Any | None = AUTO,
    state: ServiceState | None = None,
) -> FastAPI:
    """The FastAPI application serving ``answerer``; its batcher starts and stops with the app's lifespan.

    ``examples``: the SQuAD v1.1 file whose contexts the page offers, None for none, or ``"auto"`` to
    look where :func:`distilqa.web.default_examples_file` says. ``state`` is shared with the server
    that stops the app (:func:`serve`); by default the app's own."""
    from distilqa import __version__

    limits = limits or ServerLimits()
    check_batching(max_batch, max_wait_ms)  # now, not when the server starts
    state = state or ServiceState()
    examples_file = web.default_examples_file() if examples == AUTO else examples
    batchers: dict[str, DynamicBatcher] = {}
    model = answerer.model
    dtype = str(model.dtype).removeprefix("torch.")

    def pending_pairs() -> int:
        return batchers["batcher"].pending_pairs if "batcher" in batchers else 0

    metrics = ServiceMetrics(model_name, dtype, str(model.device), __version__, pending_pairs)

    def answer(questions: list[str], contexts: list[str], **options: Any) -> list[Any]:
        return answerer(questions, contexts, **options)  # lists in: always a list out, one result per pair

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = DynamicBatcher(answer, max_batch, max_wait_ms, limits.max_queue_pairs, metrics.observe_batch)
        batcher.start()
        batchers["batcher"] = app.state.batcher = batcher
        state.stopped = asyncio.Event()
        explainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distilqa-explain")
        app.state.explainer = explainer
        try:
            yield
        finally:
            await batcher.stop(wait=not state.stopped.is_set())
            explainer.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="distilqa", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = state
    app.state.metrics = metrics

    @app.exception_handler(RequestError)
    async def refuse(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error.status, error.message, error.headers)

    @app.exception_handler(HTTPException)  # 404 unknown path, 405 wrong method: the same shape
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = error.detail
        if error.status_code == 404:
            message = f"no route {request.url.path}; the routes are {', '.join(sorted(paths))}"
        elif error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
        return error_response(error.status_code, str(message), dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")

    async def question_answering(request: Request) -> JSONResponse:
        body = await read_body(request, limits.max_body_bytes)
        questions, contexts, single, options = parse_request(body, limits)
        try:
            future = batchers["batcher"].submit(questions, contexts, options)
        except QueueFullError as error:
            raise RequestError(503, str(error), {"Retry-After": "1"}) from None
        try:
            answers = await unless_stopped(state, future)
        except PairError as error:  # the pipeline's word on one pair of this request, answered alone
            raise RequestError(422, error.describe("'inputs'" if single else f"'inputs[{error.index}]'")) from None
        except (ValueError, TypeError) as error:  # the request's options
            raise RequestError(422, str(error)) from None
        except RequestError:
            raise
        except Exception as error:
            raise RequestError(500, f"answering failed: {type(error).__name__}: {error}") from None
        return JSONResponse(answers[0] if single else answers)

    for route in ROUTES:
        app.add_api_route(route, question_answering, methods=["POST"], include_in_schema=route != "/")

    @app.post("/explain")
    async def explain_pair(request: Request) -> JSONResponse:
        question, context, options = parse_explain_request(await read_body(request, limits.max_body_bytes), limits)
        work = asyncio.get_running_loop().run_in_executor(
            app.state.explainer, lambda: explain(answerer, question, context, **options)
        )
        try:
            return JSONResponse(await unless_stopped(state, work))
        except PairError as error:
            raise RequestError(422, error.describe()) from None
        except ValueError as error:  # a head that does not exist, options that do not fit
            raise RequestError(422, str(error)) from None

    pages = {"/": "index.html", "/web/app.js": "app.js", "/web/style.css": "style.css"}
    for path, name in pages.items():
        content, media_type = web.asset(name), web.ASSETS[name]  # read once: the files are small

        async def page(content: bytes = content, media_type: str = media_type) -> Response:
            return Response(content, media_type=f"{media_type}; charset=utf-8")

        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)

    loaded: dict[str, list[dict]] = {}

    @app.get("/examples")
    async def examples_list() -> JSONResponse:
        if "examples" not in loaded:  # read on first use: a fast start, and no cost when unused
            loaded["examples"] = await asyncio.to_thread(web.load_examples, examples_file)
        return JSONResponse(loaded["examples"])

    @app.get("/health")
    async def health() -> JSONResponse:
        batcher = batchers.get("batcher")
        if batcher is None or batcher.stopping or state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "pending_pairs": batcher.pending_pairs})

    @app.get("/info")
    async def info() -> JSONResponse:
        return JSONResponse(
            {
                "model": model_name,
                "dtype": dtype,
                "device": str(model.device),
                "version": __version__,
                "attn_implementation": model.attn_implementation,
                "linear_backend": model.linear_backend,
                "max_batch": max_batch,
                "max_wait_ms": max_wait_ms,
                "batches": batchers["batcher"].batches if "batcher" in batchers else 0,
                "limits": asdict(limits),
                "examples": examples_file is not None,
            }
        )

    @app.get("/metrics")
    async def metrics_text() -> Response:
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    paths = {route.path for route in app.routes}
    app.add_middleware(Gate, state=state, metrics=metrics, paths=paths)
    return app


# ---------------------------------------------------------------------------- serving


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, made before the model loads so that a taken port is said at
    once (ValueError) instead of after a minute of loading; :func:`serve` hands it to uvicorn."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ValueError(f"--host {host}: not an address of this machine ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
    try:
        sock.bind(address)
        sock.listen(2048)  # listening now keeps the port ours while the model loads
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is already in use; stop the program using it or choose another --port"
            ) from None
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    sock.set_inheritable(True)
    return sock


class Service(uvicorn.Server):
    """uvicorn's server, stopping as a service should: the first SIGINT or SIGTERM starts a drain (new
    requests get 503; the requests in flight finish, for at most ``drain_timeout_s``), then the server
    shuts down and :meth:`run` returns, without re-raising the signal. A second SIGINT stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServiceState, drain_timeout_s: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.deadline: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:  # a signal handler: only set flags here
        if self.state.draining:
            if sig == signal.SIGINT:
                self.force_exit = self.should_exit = True
            return
        self.state.draining = True

    async def on_tick(self, counter: int) -> bool:
        state = self.state
        if state.draining and not self.should_exit:
            now = time.monotonic()
            if self.deadline is None:
                self.deadline = now + self.drain_timeout_s
                print(
                    f"distilqa: stopping: finishing {state.in_flight} request(s) in flight "
                    f"(at most {self.drain_timeout_s:g} s; Ctrl+C again to quit now)",
                    file=sys.stderr,
                    flush=True,
                )
            if state.in_flight == 0:
                self.should_exit = True
            elif now > self.deadline and state.stopped is not None and not state.stopped.is_set():
                print(f"distilqa: {state.in_flight} request(s) unanswered after the drain time: 503", file=sys.stderr)
                state.stopped.set()  # they answer 503 at once; the next ticks see them gone
            elif now > self.deadline + 5.0:  # a request that does not end even so: stop anyway
                self.should_exit = True
        return await super().on_tick(counter)


def serve(
    answerer: QuestionAnswerer,
    model_name: str = "",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    limits: ServerLimits | None = None,
    drain_timeout_s: float = 30.0,
    log_level: str = "info",
    sock: socket.socket | None = None,
    examples: str | Any | None = AUTO,
) -> None:
    """Serve until SIGINT or SIGTERM, then drain (see :class:`Service`) and return. ``sock``: a socket
    from :func:`bind_socket` (by default one is bound here)."""
    positive_number("drain_timeout_s", drain_timeout_s)
    sock = sock or bind_socket(host, port)
    state = ServiceState()
    app = create_app(answerer, model_name, max_batch, max_wait_ms, limits, examples, state)
    # The drain already waited for the requests; uvicorn's own grace period only closes connections.
    config = uvicorn.Config(
        app, host=host, port=sock.getsockname()[1], log_level=log_level, timeout_graceful_shutdown=5, access_log=False
    )
    Service(config, state, drain_timeout_s).run(sockets=[sock])
