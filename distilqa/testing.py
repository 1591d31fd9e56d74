"""Helpers for testing and benchmarking distilqa, as ``torch.testing`` is for torch: reference
checkpoints built by transformers, deterministic random model inputs, a quiet transformers.

Working modules never hold such helpers; they live here, where tests, benchmarks and ``distilqa
verify`` (which needs the same deterministic inputs) find them. transformers is imported inside the
functions that need it, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distilqa.config import DistilBertConfig

CLS_ID = 101  # BERT's [CLS] id, the first token of every window
# The spread of the noise save_reference_checkpoint adds to what transformers initialises at zero
# (biases) or one (LayerNorm weights): large enough that a dropped or misplaced bias or LayerNorm
# parameter moves the results far beyond any parity tolerance (by 1e-1, measured), small enough that
# a sharpened span head still scores like a trained model (at 0.05 / 0.1 the median best span fell
# from 0.29 to 0.04 on the pipeline parity sample; at 0.02 / 0.02 it is 0.25).
BIAS_STD = 0.02
LAYER_NORM_STD = 0.02


# --------------------------------------------------------------------------- #
# Model inputs
# --------------------------------------------------------------------------- #


def random_inputs(
    vocab_size: int,
    lengths: Sequence[int],
    max_length: int | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A deterministic right-padded batch with one row per entry of ``lengths`` (real tokens per row).

    Ids come from [1000, vocab_size) when the vocabulary is that large (clear of BERT's special ids),
    else from [1, vocab_size); the first token is 101 ([CLS]) when the vocabulary has it; padding is id
    0. ``generator`` (when given) draws the ids, else a generator seeded with ``seed``. Returns
    input_ids (rows, max_length) int64 and attention_mask (rows, max_length) int64, max_length
    defaulting to the longest row."""
    max_length = max(lengths) if max_length is None else max_length
    if vocab_size < 2 or max_length < 1 or not lengths or not all(1 <= n <= max_length for n in lengths):
        raise ValueError(
            f"random_inputs needs vocab_size >= 2 and row lengths in 1..max_length, got {vocab_size}, "
            f"{list(lengths)}, {max_length}"
        )
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    low = 1000 if vocab_size > 1000 else 1
    input_ids = torch.randint(low, vocab_size, (len(lengths), max_length), generator=generator)  # (rows, max_length)
    if vocab_size > CLS_ID + 1:
        input_ids[:, 0] = CLS_ID
    attention_mask = (torch.arange(max_length)[None, :] < torch.tensor(list(lengths))[:, None]).long()
    return input_ids * attention_mask, attention_mask  # padding ids are 0, the pad id


def sample_inputs(vocab_size: int, seed: int = 0, max_length: int = 200) -> tuple[Tensor, Tensor]:
    """The batch parity reports use: rows of 7, 64 and ``max_length`` tokens (each capped at
    ``max_length``), from :func:`random_inputs`. Returns input_ids and attention_mask (3, max_length)."""
    if max_length < 1:
        raise ValueError(f"sample_inputs needs max_length >= 1, got {max_length}")
    lengths = [min(length, max_length) for length in (7, 64, max_length)]
    return random_inputs(vocab_size, lengths, max_length, seed=seed)


# --------------------------------------------------------------------------- #
# Reference checkpoints (transformers)
# --------------------------------------------------------------------------- #


def import_transformers(purpose: str = "building a reference checkpoint") -> Any:
    """The transformers module, or an ImportError that says what ``purpose`` needs installed."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{purpose} needs transformers (<5.3): pip install 'distilqa[test]'") from None
    return transformers


@contextlib.contextmanager
def quiet_transformers(transformers: Any) -> Iterator[None]:
    """transformers' progress bars off inside the block, and back as they were after it."""
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def save_reference_checkpoint(
    directory: str | os.PathLike,
    config: DistilBertConfig | None = None,
    seed: int = 0,
    span_head_sharpness: float = 0.0,
) -> os.PathLike:
    """Build transformers' DistilBertForQuestionAnswering with random weights (seeded) at ``config``
    (default: the published configuration) and save it with safetensors into ``directory``: the
    stand-in for the real checkpoint in tests and benchmarks. The global random state is left as it was.

    transformers initialises every bias to 0 and every LayerNorm to weight 1, bias 0, which would let
    a dropped bias or LayerNorm parameter pass every parity test; :func:`perturb_biases_and_norms`
    makes them all non-trivial (deterministically from ``seed``).

    Random weights give nearly flat, uncorrelated start and end logits, so every span scores ~1e-4,
    unlike a trained model. ``span_head_sharpness`` > 0 rewrites the span head (``qa_outputs``) so
    that scores look trained (see :func:`sharpen_span_head`)."""
    transformers = import_transformers()
    values = dataclasses.asdict(config or DistilBertConfig())
    with quiet_transformers(transformers), torch.random.fork_rng(devices=[]):  # transformers uses the global RNG
        torch.manual_seed(seed)
        reference = transformers.DistilBertForQuestionAnswering(transformers.DistilBertConfig(**values)).eval()
    perturb_biases_and_norms(reference, seed)
    if span_head_sharpness > 0:
        sharpen_span_head(reference, span_head_sharpness)
    with quiet_transformers(transformers):
        reference.save_pretrained(directory, safe_serialization=True)
    return directory


@torch.no_grad()
def perturb_biases_and_norms(model: nn.Module, seed: int) -> None:
    """Every Linear bias += N(0, BIAS_STD²); every LayerNorm weight = 1 + N(0, LAYER_NORM_STD²) noise
    and bias += N(0, BIAS_STD²), in place, drawn from a generator seeded with ``seed`` in module order."""
    generator = torch.Generator().manual_seed(seed * 7919 + 17)  # not the stream that drew the weights

    def noise(parameter: Tensor, std: float) -> Tensor:
        return std * torch.randn(parameter.shape, generator=generator).to(parameter.dtype)

    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias += noise(module.bias, BIAS_STD)
        elif isinstance(module, nn.LayerNorm):
            module.weight += noise(module.weight, LAYER_NORM_STD)
            module.bias += noise(module.bias, BIAS_STD)


@torch.no_grad()
def sharpen_span_head(reference: nn.Module, sharpness: float, alignment: float = 0.95) -> None:
    """Make a random transformers model's span scores look trained: start row = sharpness * a, end row
    = sharpness * (alignment * a + sqrt(1 - alignment²) * b), where a and b are the random rows of
    ``qa_outputs`` with the mean [CLS] hidden state (measured on :func:`sample_inputs`) projected out.
    The same tokens then score high as start and as end, and "no answer" does not absorb the probability."""
    input_ids, attention_mask = sample_inputs(reference.config.vocab_size, max_length=64)
    hidden = reference.distilbert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (3, 64, dim)
    cls = hidden[:, 0].mean(0)
    cls = cls / cls.norm()  # (dim,)
    start, end = (row - (row @ cls) * cls for row in reference.qa_outputs.weight)  # (dim,) each
    reference.qa_outputs.weight[0] = sharpness * start
    reference.qa_outputs.weight[1] = sharpness * (alignment * start + (1 - alignment**2) ** 0.5 * end)


# --------------------------------------------------------------------------- #
# The HTTP service (distilqa.serve): a server in a thread, and a load generator
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> Iterator[str]:
    """Run the ASGI ``app`` (e.g. :func:`distilqa.serve.create_app`) with uvicorn on a background thread
    (port 0: any free one) and yield its base URL; on exit, shut it down as SIGTERM would."""
    import threading
    import time

    import uvicorn

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
    import asyncio
    import time

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
