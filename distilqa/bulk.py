"""Bulk question answering on a Ray cluster (the ``ray`` extra): a pool of Ray Data actors, one model each.

    pairs ──from_items──▶ blocks of rows {index, question, context}
          ──map_batches(PairAnswerer, ActorPoolStrategy(size=workers))──▶ {index, answer (JSON), error}
          ──iter_rows, input order──▶ answers

Each actor loads its own :class:`~distilqa.pipeline.QuestionAnswerer` once and answers batches of
``rows_per_batch`` pairs with it. Ray Data restarts an actor that dies and retries its batch
(``max_restarts`` / ``max_task_retries``), and the driver keeps only the first answer it sees for a
pair index and checks that every index arrives, so a retried batch never yields an answer twice or
drops one. The rows come back in input order (``preserve_order``). A pair the pipeline refuses
("context has no tokens") becomes an error for that pair only, reported once the run is done.

By default a local Ray instance is started (and shut down after); ``address`` joins an existing
cluster (``"HOST:6379"``, ``"ray://HOST:10001"`` or ``"auto"``), see the README's recipe. Ray's own
logging (start-up notices, worker errors, warnings) is silenced unless ``verbose``; a cluster that
cannot be reached is a :class:`RayClusterError` with one line saying so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from distilqa.files import open_output, read_pairs, write_jsonl_line
from distilqa.validate import positive_int

LOCAL = "local"  # the address meaning "start a local Ray instance"
# Environment for a quiet Ray: no duplicate-log summaries, no usage-statistics notice, and only fatal
# lines from the C++ core (not, e.g., core_worker.cc's note on actors with restartable arguments).
QUIET_RAY_ENVIRONMENT = {
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_BACKEND_LOG_LEVEL": "fatal",
    "RAY_LOG_TO_STDERR": "0",
}
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


class RayClusterError(ConnectionError):
    """Ray could not be started, or the cluster at the given address could not be reached."""


def _require_ray():
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ImportError(
            f"bulk answering on Ray needs ray[data] ({error.name} is missing): pip install 'distilqa[ray]'"
        ) from None
    return ray


class PairAnswerer:
    """A Ray Data actor: one QuestionAnswerer, loaded once, answering batches of rows.

    A batch is ``{"index": (n,) int64, "question": (n,) str, "context": (n,) str}``; the result is
    ``{"index": (n,), "answer": (n,) JSON text of the answer (or top_k list), "error": (n,) str}``
    with an empty error where the pair was answered."""

    def __init__(self, model: str, load_options: dict[str, Any], options: dict[str, Any], threads: int | None):
        import torch

        from distilqa.pipeline import QuestionAnswerer

        if threads:
            torch.set_num_threads(threads)  # one actor per CPU slot: do not oversubscribe the node's cores
        self.answerer = QuestionAnswerer.from_pretrained(model, **load_options)
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from distilqa.pipeline import PairError

        questions, contexts = [str(q) for q in batch["question"]], [str(c) for c in batch["context"]]
        answers: list[Any] = []
        errors: list[str] = []
        try:
            answers = self.answerer(questions, contexts, **self.options)
            errors = [""] * len(questions)
        except PairError:  # one pair is refused: answer the others one by one, keep its reason
            for question, context in zip(questions, contexts):
                try:
                    answers.append(self.answerer(question, context, **self.options))
                    errors.append("")
                except PairError as error:
                    answers.append(None)
                    errors.append(error.describe())  # "the context has no tokens ...": the caller names the line
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "answer": np.array([json.dumps(a, ensure_ascii=False) for a in answers], dtype=object),
            "error": np.array(errors, dtype=object),
        }


class UnansweredPairsError(ValueError):
    """Some pairs could not be answered; ``errors`` maps their input positions to the reasons."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        first = min(errors)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"pair {first}: {errors[first]}{more}")


def iter_answers_on_ray(
    questions: Sequence[str],
    contexts: Sequence[str],
    model: str | os.PathLike,
    address: str | None = LOCAL,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    rows_per_batch: int = 64,
    load_options: dict[str, Any] | None = None,
    verbose: bool = False,
    **options: Any,
) -> Iterator[tuple[int, Any | None, str]]:
    """Answer ``questions[i]`` about ``contexts[i]`` on Ray; yields ``(i, answer, error)`` for every
    i in input order, each exactly once (answer None and a message where the pair was refused).

    ``workers``: actors in the pool (default: the cluster's CPUs // ``cpus_per_worker``, or GPUs //
    ``gpus_per_worker`` when that is set); each loads ``model`` with
    ``QuestionAnswerer.from_pretrained(model, **load_options)`` and answers with ``options``
    (top_k, max_answer_len, ...). ``address``: ``"local"`` starts a local Ray instance for this
    call; None lets Ray choose (``$RAY_ADDRESS``, a cluster started on this machine, or a new local
    instance); anything else is passed to ``ray.init(address=...)``. If Ray is
    already initialised in this process, that connection is used. ``verbose`` lets Ray log as it
    likes; by default its notices and warnings are silenced."""
    ray = _require_ray()
    if len(questions) != len(contexts):
        raise ValueError(f"got {len(questions)} questions but {len(contexts)} contexts; they pair up one to one")
    if not questions:
        return
    positive_int("rows_per_batch", rows_per_batch)
    if workers is not None:
        positive_int("workers", workers)
    started_here = not ray.is_initialized()
    with contextlib.ExitStack() as stack:
        if not verbose:
            stack.enter_context(_quiet_ray())
        if started_here:
            _start_ray(ray, address, verbose)
        yield from _answers(
            ray,
            questions,
            contexts,
            model,
            workers,
            cpus_per_worker,
            gpus_per_worker,
            rows_per_batch,
            load_options,
            options,
            started_here,
        )


def _start_ray(ray: Any, address: str | None, verbose: bool) -> None:
    """``ray.init`` at ``address``; any failure (an unreachable address, a cluster of another Ray
    version, a local start that fails) is one :class:`RayClusterError` line."""
    where = "a local Ray instance" if address == LOCAL else f"the Ray cluster at {address!r}"
    _check_reachable(address)
    try:
        with contextlib.nullcontext() if verbose else _silenced_stderr():
            ray.init(
                address=address,  # "local": always a new instance, even where `ray start` left a cluster behind
                include_dashboard=False,
                log_to_driver=verbose,  # the workers' own output (Ray's notices, warnings) only when asked for
                logging_level=logging.INFO if verbose else logging.ERROR,
                configure_logging=True,
            )
    except Exception as error:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
        with contextlib.suppress(Exception):
            ray.shutdown()
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise RayClusterError(f"could not start or reach {where}: {reason}") from error


def _check_reachable(address: str | None, timeout_s: float = 10.0) -> None:
    """For an address of the form ``[ray://]HOST:PORT``, a :class:`RayClusterError` at once when
    nothing accepts connections there (Ray itself retries for minutes before giving up)."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "local", "auto", None: Ray finds or starts the instance itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise RayClusterError(
            f"no Ray cluster answers at {address!r} ({error.strerror or error}); check the address and that "
            "the cluster is running (`ray status` on its head node)"
        ) from None


@contextlib.contextmanager
def _silenced_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null inside the block: Ray's C++ core writes its start-up lines
    there directly (one even says that the log level was set), past Python's logging."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    """Ray's environment switches (read by the processes it starts) and Python loggers at ERROR, and
    its warnings ignored, inside the block; all as they were after it."""
    saved_environment = {name: os.environ.get(name) for name in QUIET_RAY_ENVIRONMENT}
    saved_levels = {name: logging.getLogger(name).level for name in RAY_LOGGERS}
    os.environ.update(QUIET_RAY_ENVIRONMENT)
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")
            yield
    finally:
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def _answers(
    ray: Any,
    questions: Sequence[str],
    contexts: Sequence[str],
    model: str | os.PathLike,
    workers: int | None,
    cpus_per_worker: float,
    gpus_per_worker: float,
    rows_per_batch: int,
    load_options: dict[str, Any] | None,
    options: dict[str, Any],
    started_here: bool,
) -> Iterator[tuple[int, Any | None, str]]:
    """The body of :func:`iter_answers_on_ray` once Ray is up; shuts Ray down after if it started it."""
    context = ray.data.DataContext.get_current()
    keep_order = context.execution_options.preserve_order
    keep_progress = context.enable_progress_bars
    try:
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # the caller's tqdm bar counts answers instead
        if workers is None:  # as many as the cluster's CPUs (or GPUs, for GPU workers) hold
            resource, each = ("GPU", gpus_per_worker) if gpus_per_worker else ("CPU", cpus_per_worker)
            workers = max(1, int(ray.cluster_resources().get(resource, 1) // each))
        rows = [{"index": i, "question": q, "context": c} for i, (q, c) in enumerate(zip(questions, contexts))]
        blocks = max(1, min(len(rows), -(-len(rows) // rows_per_batch)))
        dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            PairAnswerer,  # looked up at each call: tests replace it with a subclass
            batch_size=rows_per_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None,
            fn_constructor_kwargs=dict(
                model=str(model),
                load_options=dict(load_options or {}),
                options=options,
                threads=max(1, int(cpus_per_worker)),
            ),
        )
        expected = 0
        for row in dataset.iter_rows():
            index = int(row["index"])
            if index < expected:  # a batch that was retried after its first output arrived: already yielded
                continue
            if index != expected:
                raise RuntimeError(f"Ray returned pair {index} while pair {expected} was still missing")
            answer = json.loads(row["answer"])
            yield index, answer, str(row["error"])
            expected += 1
        if expected != len(rows):
            raise RuntimeError(f"Ray returned {expected} of {len(rows)} answers")
    finally:
        context.execution_options.preserve_order = keep_order
        context.enable_progress_bars = keep_progress
        if started_here:
            ray.shutdown()


def answer_on_ray(
    questions: Sequence[str], contexts: Sequence[str], model: str | os.PathLike, **kwargs: Any
) -> list[Any]:
    """The answers of :func:`iter_answers_on_ray` as a list in input order; raises :class:`UnansweredPairsError`
    naming the refused pairs, if any."""
    answers, errors = [], {}
    for index, answer, error in iter_answers_on_ray(questions, contexts, model, **kwargs):
        answers.append(answer)
        if error:
            errors[index] = error
    if errors:
        raise UnansweredPairsError(errors)
    return answers


def answer_file_on_ray(
    input_path: Path, output_path: Path, model: str | os.PathLike, progress: bool = True, **kwargs: Any
) -> int:
    """Answer a JSON Lines file of ``{"question", "context"[, "id"]}`` objects into ``output_path``
    (``{"id"?, "question", "answer"}`` per line, in input order), as ``distilqa ask --input`` does.
    The output is written under a temporary name and renamed once complete; a refused pair raises
    ``ValueError`` naming its line, and leaves any existing output as it was. The caller checks the
    output path first (:func:`distilqa.files.check_output`). Returns the pair count."""
    lines, pairs = zip(*read_pairs(input_path))  # every line checked before Ray starts
    questions, contexts = [p["question"] for p in pairs], [p["context"] for p in pairs]
    errors: dict[int, str] = {}
    with open_output(output_path) as out, tqdm(total=len(pairs), unit="question", disable=not progress) as bar:
        for index, answer, error in iter_answers_on_ray(questions, contexts, model, **kwargs):
            bar.update(1)
            if error:
                errors[index] = error
                continue
            record = {"id": pairs[index]["id"]} if "id" in pairs[index] else {}
            record.update(question=pairs[index]["question"], answer=answer)
            write_jsonl_line(out, record)
        if errors:  # raised inside open_output: the partial file is removed, an old output kept
            first = min(errors)
            more = f" (and {len(errors) - 1} more lines)" if len(errors) > 1 else ""
            raise ValueError(f"{input_path}:{lines[first]}: {errors[first]}{more}")
    return len(pairs)
