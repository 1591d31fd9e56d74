"""A layer-by-layer parity report: our model against transformers' ``DistilBertForQuestionAnswering``.

Both models run the same padded batch; the report has one row per intermediate result, in forward
order (embeddings, each layer's attention map and output, the start and end logits), with the
largest absolute difference found there. The first failing row is where the two implementations
part ways, which is where a modified model should be looked at first.

    report = verify_checkpoint("distilbert/distilbert-base-cased-distilled-squad")
    print(report.format())

transformers is only needed here, and only when a comparison runs: it is imported inside the
functions, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distilqa.attention import AttentionFunction
from distilqa.config import DistilBertConfig

# Eager against eager runs the same operations in the same order, so fp32 is expected to agree
# exactly; the tolerance only leaves room for other cores (sdpa picks its own kernels).
DEFAULT_TOLERANCES: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}

TRANSFORMERS_MISSING = "distilqa verify needs transformers (<5.3): pip install 'distilqa[test]'"


@dataclass
class ParityRow:
    """One compared result: the largest absolute difference over the compared positions."""

    name: str
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        # Written so that NaN (a diverged result) fails: NaN <= x is False.
        return self.max_abs_diff <= self.tolerance


@dataclass
class ParityReport:
    """The rows of :func:`compare_models` with what was compared."""

    rows: list[ParityRow]
    checkpoint: str
    attn_implementation: str
    dtype: str

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    @property
    def first_divergence(self) -> str | None:
        """The name of the first row (in forward order) outside its tolerance, or None."""
        return next((row.name for row in self.rows if not row.passed), None)

    def format(self) -> str:
        """A fixed-width table ``name | max abs diff | tolerance | PASS/FAIL`` and a verdict line."""
        width = max([len("name"), *(len(row.name) for row in self.rows)])
        lines = [
            f"checkpoint {self.checkpoint}, attention {self.attn_implementation}, dtype {self.dtype}",
            f"{'name':<{width}} | {'max abs diff':>12} | {'tolerance':>9} | result",
            f"{'-' * width}-+-{'-' * 12}-+-{'-' * 9}-+-------",
        ]
        for row in self.rows:
            lines.append(
                f"{row.name:<{width}} | {row.max_abs_diff:>12.3e} | {row.tolerance:>9.1e} | "
                f"{'PASS' if row.passed else 'FAIL'}"
            )
        if self.passed:
            lines.append(f"PASS: all {len(self.rows)} results within tolerance of transformers")
        else:
            lines.append(f"FAIL: first difference at {self.first_divergence}")
        return "\n".join(lines)


def _max_abs_diff(ours: Tensor, reference: Tensor, rows: Tensor | None = None) -> float:
    """max |ours - reference| in float32, over the leading (batch, seq) positions selected by
    ``rows`` (a bool (batch, seq) mask) or everywhere. A shape mismatch is an infinite difference."""
    if ours.shape != reference.shape:
        return math.inf
    ours, reference = ours.detach().float().cpu(), reference.detach().float().cpu()
    if rows is not None:
        ours, reference = ours[rows], reference[rows]  # (n_selected, ...)
    if ours.numel() == 0:
        return 0.0
    return (ours - reference).abs().max().item()


def _reference_attn_implementation(reference: nn.Module) -> str | None:
    config = getattr(reference, "config", None)
    return getattr(config, "_attn_implementation", None)


def compare_models(
    ours: nn.Module,
    reference: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    tolerance: float,
) -> list[ParityRow]:
    """Run both models on ``input_ids`` (batch, seq) and compare every intermediate result.

    ``ours`` is a :class:`distilqa.DistilBertForQuestionAnswering`, ``reference`` a transformers
    ``DistilBertForQuestionAnswering``; both must be in eval mode (dropout would make any comparison
    random). Rows, in forward order: ``embeddings``, then for each layer i (1-based) ``layer i
    attention`` (only when both models use eager attention: transformers returns attention maps
    only then) and ``layer i`` (its output hidden state), then ``start_logits`` and ``end_logits``.

    Only positions where ``attention_mask == 1`` count: a padding position's hidden state and logits
    are computed from a padding token and never read, so two correct implementations may legitimately
    disagree there (fused kernels treat them differently). For attention maps the padding *queries*
    are skipped but every key is compared, so weight leaking onto padding keys is caught.
    """
    if ours.training or reference.training:
        raise ValueError("compare_models needs both models in eval mode: call .eval() on them first")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool().cpu()  # (batch, seq): True at real tokens
    with_attentions = (
        getattr(ours, "attn_implementation", None) == "eager" and _reference_attn_implementation(reference) == "eager"
    )
    our_device = next(ours.parameters()).device
    reference_device = next(reference.parameters()).device
    with torch.no_grad():
        our_out = ours(
            input_ids.to(our_device),
            attention_mask.to(our_device),
            output_hidden_states=True,
            output_attentions=with_attentions,
        )
        reference_out = reference(
            input_ids=input_ids.to(reference_device),
            attention_mask=attention_mask.to(reference_device),
            output_hidden_states=True,
            output_attentions=with_attentions,
            return_dict=True,
        )
    our_hidden, reference_hidden = our_out.hidden_states, reference_out.hidden_states
    if len(our_hidden) != len(reference_hidden):
        raise ValueError(
            f"the models have different depths: {len(our_hidden) - 1} layers here, "
            f"{len(reference_hidden) - 1} in the reference"
        )
    our_attentions = our_out.attentions if with_attentions else None
    reference_attentions = reference_out.attentions if with_attentions else None
    if not our_attentions or not reference_attentions:
        our_attentions = reference_attentions = None

    rows = [ParityRow("embeddings", _max_abs_diff(our_hidden[0], reference_hidden[0], real), tolerance)]
    for layer in range(1, len(our_hidden)):
        if our_attentions is not None and reference_attentions is not None:
            # (batch, heads, query, key) -> (batch, query, heads, key) so the mask selects queries.
            ours_map = our_attentions[layer - 1].transpose(1, 2)
            reference_map = reference_attentions[layer - 1].transpose(1, 2)
            diff = _max_abs_diff(ours_map, reference_map, real)
            rows.append(ParityRow(f"layer {layer} attention", diff, tolerance))
        diff = _max_abs_diff(our_hidden[layer], reference_hidden[layer], real)
        rows.append(ParityRow(f"layer {layer}", diff, tolerance))
    for name in ("start_logits", "end_logits"):
        diff = _max_abs_diff(getattr(our_out, name), getattr(reference_out, name), real)
        rows.append(ParityRow(name, diff, tolerance))
    return rows


def sample_inputs(vocab_size: int, seed: int = 0, max_length: int = 200) -> tuple[Tensor, Tensor]:
    """A deterministic padded batch: rows of 7, 64 and ``max_length`` tokens (lengths capped at
    ``max_length``), right-padded with id 0 to ``max_length``.

    Ids come from [1000, vocab_size) when the vocabulary is that large (clear of BERT's special
    ids), else from [1, vocab_size); the first token is 101 (``[CLS]``) when the vocabulary has it.
    Returns input_ids (3, max_length) int64 and attention_mask (3, max_length) int64.
    """
    if vocab_size < 2 or max_length < 1:
        raise ValueError(f"sample_inputs needs vocab_size >= 2 and max_length >= 1, got {vocab_size}, {max_length}")
    lengths = [min(length, max_length) for length in (7, 64, max_length)]
    low = 1000 if vocab_size > 1000 else 1
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(low, vocab_size, (len(lengths), max_length), generator=generator)  # (3, max_length)
    if vocab_size > 102:
        input_ids[:, 0] = 101
    attention_mask = torch.zeros_like(input_ids)  # (3, max_length)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    return input_ids * attention_mask, attention_mask  # padding ids are 0, the pad id


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(TRANSFORMERS_MISSING) from None
    return transformers


def save_reference_checkpoint(
    directory: str | os.PathLike,
    config: DistilBertConfig | None = None,
    seed: int = 0,
    span_head_sharpness: float = 0.0,
) -> os.PathLike:
    """Build transformers' DistilBertForQuestionAnswering with random weights (seeded) at ``config``
    (default: the published configuration) and save it with safetensors into ``directory``: the
    stand-in for the real checkpoint in tests and benchmarks. The global random state is left as it was.

    Random weights give nearly flat, uncorrelated start and end logits, so every span scores ~1e-4,
    unlike a trained model. ``span_head_sharpness`` > 0 rewrites the span head (``qa_outputs``) so
    that scores look trained: the start and end rows are made nearly parallel (the same tokens score
    high as start and as end), orthogonal to the mean [CLS] hidden state (so "no answer" does not
    absorb the probability), and scaled by ``span_head_sharpness``."""
    transformers = _import_transformers()
    values = dataclasses.asdict(config or DistilBertConfig())
    with _quiet(transformers), torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG
        torch.manual_seed(seed)
        reference = transformers.DistilBertForQuestionAnswering(transformers.DistilBertConfig(**values)).eval()
    if span_head_sharpness > 0:
        _sharpen_span_head(reference, span_head_sharpness)
    with _quiet(transformers):
        reference.save_pretrained(directory, safe_serialization=True)
    return directory


@torch.no_grad()
def _sharpen_span_head(reference: nn.Module, sharpness: float, alignment: float = 0.95) -> None:
    """See :func:`save_reference_checkpoint`: start row = sharpness * a, end row = sharpness *
    (alignment * a + sqrt(1 - alignment²) * b), where a and b are the random rows with the mean [CLS]
    hidden state (measured on :func:`sample_inputs`) projected out."""
    input_ids, attention_mask = sample_inputs(reference.config.vocab_size, max_length=64)
    hidden = reference.distilbert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (3, 64, dim)
    cls = hidden[:, 0].mean(0)
    cls = cls / cls.norm()  # (dim,)
    start, end = (row - (row @ cls) * cls for row in reference.qa_outputs.weight)  # (dim,) each
    reference.qa_outputs.weight[0] = sharpness * start
    reference.qa_outputs.weight[1] = sharpness * (alignment * start + (1 - alignment**2) ** 0.5 * end)


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' progress bars off inside the block, and back as they were after it."""
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def verify_checkpoint(
    name_or_path: str | os.PathLike,
    attn_implementation: str | AttentionFunction = "eager",
    dtype: torch.dtype | str = torch.float32,
    tolerance: float | None = None,
    device: str | torch.device | None = None,
) -> ParityReport:
    """Load a checkpoint (folder or hub repo id) into our model and into transformers', on ``device``
    (default cpu), and compare them on :func:`sample_inputs`. ``dtype`` is a torch dtype or its name
    ("float32", "bfloat16", "float16"). The default tolerance is 1e-5 for float32 and 1e-2 for
    float16 and bfloat16. ``attn_implementation`` is used on both sides (a callable only on ours; the
    reference then uses eager attention)."""
    transformers = _import_transformers()
    from distilqa.model import DistilBertForQuestionAnswering
    from distilqa.weights import resolve_checkpoint

    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if dtype not in DEFAULT_TOLERANCES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, DEFAULT_TOLERANCES))}, got {dtype}")
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCES[dtype]
    device = torch.device(device or "cpu")
    directory = resolve_checkpoint(name_or_path)
    ours = DistilBertForQuestionAnswering.from_pretrained(
        directory, device=device, dtype=dtype, attn_implementation=attn_implementation
    )
    reference_attention = attn_implementation if isinstance(attn_implementation, str) else "eager"
    with _quiet(transformers):
        reference = transformers.DistilBertForQuestionAnswering.from_pretrained(
            directory, attn_implementation=reference_attention, dtype=dtype
        )
    reference = reference.to(device).eval()
    input_ids, attention_mask = sample_inputs(
        ours.config.vocab_size, max_length=min(200, ours.config.max_position_embeddings)
    )
    return ParityReport(
        rows=compare_models(ours, reference, input_ids, attention_mask, tolerance),
        checkpoint=str(name_or_path),
        attn_implementation=ours.attn_implementation,
        dtype=str(dtype).removeprefix("torch."),
    )
