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

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from distilqa.attention import AttentionFunction
from distilqa.testing import import_transformers, quiet_transformers, sample_inputs

# Eager against eager runs the same operations in the same order, so fp32 is expected to agree
# exactly; the tolerance only leaves room for other cores (sdpa picks its own kernels).
DEFAULT_TOLERANCES: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


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
    # Why the checkpoint's tokenizer does not fit the model (empty: it fits); None: the folder has none.
    tokenizer_problems: list[str] | None = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows) and not self.tokenizer_problems

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
        if self.tokenizer_problems is None:
            lines.append("tokenizer: none in the checkpoint folder, not checked")
        else:
            lines.append(f"tokenizer: {'FAIL' if self.tokenizer_problems else 'PASS, it fits the model'}")
            lines.extend(f"  {problem}" for problem in self.tokenizer_problems)
        if self.passed:
            lines.append(f"PASS: all {len(self.rows)} results within tolerance of transformers")
        elif self.first_divergence is not None:
            lines.append(f"FAIL: first difference at {self.first_divergence}")
        else:
            lines.append("FAIL: the tokenizer does not fit the model")
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


def verify_checkpoint(
    name_or_path: str | os.PathLike,
    attn_implementation: str | AttentionFunction = "eager",
    dtype: torch.dtype | str = torch.float32,
    tolerance: float | None = None,
    device: str | torch.device | None = None,
) -> ParityReport:
    """Load a checkpoint (folder or hub repo id) into our model and into transformers', on ``device``
    (default cpu), and compare them on :func:`sample_inputs`; check that the checkpoint's tokenizer
    fits the model (a misfit fails the report). ``dtype`` is a torch dtype or a name that
    :func:`distilqa.hardware.resolve_dtype` knows ("float32", "bf16", "auto", ...). The default
    tolerance is 1e-5 for float32 and 1e-2 for float16 and bfloat16. ``attn_implementation`` is used
    on both sides (a callable only on ours; the reference then uses eager attention)."""
    transformers = import_transformers("distilqa verify")
    from distilqa.hardware import resolve_device, resolve_dtype
    from distilqa.model import DistilBertForQuestionAnswering
    from distilqa.weights import load_checkpoint

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCES[dtype]
    loaded = load_checkpoint(
        DistilBertForQuestionAnswering,
        name_or_path,
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
        fit_tokenizer=False,  # a misfit is reported in the table, beside the logits
    )
    directory, ours = loaded.directory, loaded.model
    reference_attention = attn_implementation if isinstance(attn_implementation, str) else "eager"
    with quiet_transformers(transformers):
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
        tokenizer_problems=None
        if loaded.tokenizer is None
        else loaded.tokenizer.fit_problems(ours.config.vocab_size, ours.config.pad_token_id),
    )
