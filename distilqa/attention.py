"""The attention core: softmax(Q Kᵀ / √d) V over the keys a query may see.

Every implementation takes and returns the same shapes, so a model can swap its core by name
(``"eager"``, ``"sdpa"``, ``"triton"``) or by passing any function with the :data:`AttentionFunction`
signature:

    query, key, value:  (batch, heads, seq, head_dim)
    mask:               None (every key is a real token) or a (batch, 1, 1, seq) bool key mask,
                        True where the key is a real token
    returns context:    (batch, heads, seq, head_dim)
            weights:    (batch, heads, seq, seq) when ``need_weights`` else None

The model calls a core through :func:`attend`, which also handles packed windows (several windows
laid end to end in one row, :class:`PackedWindows`): it runs the core on each window, unless the
core marks itself ``handles_packed_windows = True`` and takes the ``PackedWindows`` as its mask
(the Triton kernel does, reading the window offsets as ``cu_seqlens``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True, eq=False)
class PackedWindows:
    """Windows of different lengths laid end to end in one row, with no padding between them:
    tokens ``offsets[i]:offsets[i + 1]`` are window i. Attention stays inside each window."""

    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.lengths):
            raise ValueError(f"window lengths must be positive integers, got {self.lengths!r}")

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Where each window starts, and the total at the end: (windows + 1,), as ``cu_seqlens``."""
        return (0, *itertools.accumulate(self.lengths))

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def position_ids(self, device: torch.device | str | None = None) -> Tensor:
        """Each token's position inside its own window, counting from 0: (1, total)."""
        return torch.cat([torch.arange(n, device=device) for n in self.lengths])[None, :]

    def split(self, tensor: Tensor, dim: int) -> tuple[Tensor, ...]:
        """The per-window pieces of ``tensor`` along its token dimension ``dim`` (views, no copies)."""
        return tensor.split(list(self.lengths), dim=dim)


AttentionMask = Tensor | PackedWindows | None
AttentionFunction = Callable[..., tuple[Tensor, Tensor | None]]


def attend(
    core: AttentionFunction,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: AttentionMask,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Run an attention core on any :data:`AttentionMask`, packed windows included."""
    if not isinstance(mask, PackedWindows) or getattr(core, "handles_packed_windows", False):
        return core(query, key, value, mask, dropout_p, need_weights)
    if need_weights:
        raise ValueError("attention maps of packed windows are not returned; run the windows padded")
    return attend_each_window(core, query, key, value, mask, dropout_p)


@torch.compiler.disable  # a Python loop over windows: kept out of compiled graphs, so new lengths never recompile
def attend_each_window(
    core: AttentionFunction, query: Tensor, key: Tensor, value: Tensor, windows: PackedWindows, dropout_p: float
) -> tuple[Tensor, None]:
    """Run a core on each window of a packed row and lay the results end to end again: the simplest
    way to keep attention inside windows. (1, heads, total, head_dim) -> the same shape."""
    pieces = zip(*(windows.split(t, dim=2) for t in (query, key, value)))  # per window: (1, heads, n, head_dim)
    # Laid end to end token-major, (1, total, heads, head_dim): a contiguous concatenation, and the
    # model's next step (heads side by side per token) is then a free view.
    context = torch.cat([core(q, k, v, None, dropout_p)[0].transpose(1, 2) for q, k, v in pieces], dim=1)
    return context.transpose(1, 2), None  # (1, heads, total, head_dim)


def eager_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: AttentionMask,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention written out step by step, in the reference's order of operations."""
    scale = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (batch, heads, seq, seq)
    if mask is not None:
        # The dtype's most negative finite value, not -inf: a row whose keys are all padding
        # then gets uniform weights instead of NaN, in fp32, fp16 and bf16 alike.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # (batch, heads, seq, seq)
    weights = F.softmax(scores, dim=-1)  # (batch, heads, seq, seq)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0.0)  # (batch, heads, seq, seq)
    context = torch.matmul(weights, value)  # (batch, heads, seq, head_dim)
    return context, (weights if need_weights else None)


def sdpa_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: AttentionMask,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention by ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels)."""
    if need_weights:
        raise ValueError("the sdpa core does not return attention weights; use attn_implementation='eager'")
    if mask is not None:
        # A sequence whose keys are all padding would make SDPA's softmax 0/0 = NaN; let it attend
        # to every key instead, as if unmasked (finite; its outputs are padding, never read).
        mask = mask | ~mask.any(dim=-1, keepdim=True)  # (batch, 1, 1, seq)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)
    return context, None  # (batch, heads, seq, head_dim)


def triton_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: AttentionMask,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The hand-written FlashAttention kernel of :mod:`distilqa.kernels` (CUDA, or Triton's interpreter)."""
    from distilqa.kernels import flash_attention  # Triton is optional: imported only when this core runs

    if need_weights:
        raise ValueError("the triton core does not return attention weights; use attn_implementation='eager'")
    if dropout_p > 0.0:
        raise ValueError("the triton core has no attention dropout; train with attn_implementation='sdpa'")
    return flash_attention(query, key, value, mask), None


triton_attention.handles_packed_windows = True  # reads PackedWindows.offsets as cu_seqlens


ATTENTION_IMPLEMENTATIONS: dict[str, AttentionFunction] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "triton": triton_attention,
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
