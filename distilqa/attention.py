"""The attention core: softmax(Q Kᵀ / √d) V over the keys that are not padding.

Every implementation takes and returns the same shapes, so a model can swap its core by name
(``"eager"``, ``"sdpa"``) or by passing any function with the :data:`AttentionFunction` signature:

    query, key, value:  (batch, heads, seq, head_dim)
    key_mask:           (batch, 1, 1, seq) bool, True where the key is a real token; or None
    returns context:    (batch, heads, seq, head_dim)
            weights:    (batch, heads, seq, seq) when ``need_weights`` else None
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFunction = Callable[..., tuple[Tensor, Tensor | None]]


def eager_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_mask: Tensor | None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention written out step by step, in the reference's order of operations."""
    scale = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (batch, heads, seq, seq)
    if key_mask is not None:
        # The dtype's most negative finite value, not -inf: a row whose keys are all padding
        # then gets uniform weights instead of NaN, in fp32, fp16 and bf16 alike.
        scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)  # (batch, heads, seq, seq)
    weights = F.softmax(scores, dim=-1)  # (batch, heads, seq, seq)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0.0)  # (batch, heads, seq, seq)
    context = torch.matmul(weights, value)  # (batch, heads, seq, head_dim)
    return context, (weights if need_weights else None)


def sdpa_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_mask: Tensor | None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention by ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels)."""
    if need_weights:
        raise ValueError("the sdpa core does not return attention weights; use attn_implementation='eager'")
    if key_mask is not None:
        # A sequence whose keys are all padding would make SDPA's softmax 0/0 = NaN;
        # let it attend to every key instead (its output is meaningless either way).
        key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)  # (batch, 1, 1, seq)
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=key_mask, dropout_p=dropout_p
    )  # (batch, heads, seq, head_dim)
    return context, None


ATTENTION_IMPLEMENTATIONS: dict[str, AttentionFunction] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
}


def resolve_attention(implementation: str | AttentionFunction) -> AttentionFunction:
    """Return the attention function for a name in :data:`ATTENTION_IMPLEMENTATIONS`, or a callable as is."""
    if callable(implementation):
        return implementation
    try:
        return ATTENTION_IMPLEMENTATIONS[implementation]
    except KeyError:
        names = ", ".join(repr(name) for name in ATTENTION_IMPLEMENTATIONS)
        raise ValueError(
            f"unknown attention implementation {implementation!r}; expected one of {names} or a callable"
        ) from None
