"""Attention cores beside the model's written-out one: softmax(Q Kᵀ / √d) V over the keys a query may see.

The model's own core is :func:`distilqa.model.eager_attention` (``"eager"``), written out step by
step. The cores here compute the same thing faster, and a model swaps to them by name (``"sdpa"``,
``"onednn"``, ``"auto"`` (the faster of those two here, measured), ``"triton"``) or takes any
function with the :data:`AttentionFunction` signature:

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

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from distilqa.hardware import median_seconds


@dataclass(frozen=True, eq=False)
class PackedWindows:
    """Windows of different lengths laid end to end in one row, with no padding between them:
    tokens ``offsets[i]:offsets[i + 1]`` are window i. Attention stays inside each window."""

    lengths: tuple[int, ...]
    _cu_seqlens: dict = field(default_factory=dict, init=False, repr=False)  # device -> see cu_seqlens()

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

    def cu_seqlens(self, device: torch.device | str) -> Tensor:
        """``offsets`` as an int32 tensor on ``device`` (the ``cu_seqlens`` of flash-attn's varlen API),
        made once per device: every layer receives the same windows object."""
        device = torch.device(device)
        if device not in self._cu_seqlens:
            self._cu_seqlens[device] = torch.tensor(self.offsets, dtype=torch.int32, device=device)
        return self._cu_seqlens[device]

    def split(self, tensor: Tensor, dim: int) -> tuple[Tensor, ...]:
        """The per-window pieces of ``tensor`` along its token dimension ``dim`` (views, no copies)."""
        return tensor.split(list(self.lengths), dim=dim)


AttentionMask = Tensor | PackedWindows | None


def attention_mask_and_positions(
    attention_mask: Tensor | None, window_lengths: Sequence[int] | None, device: torch.device
) -> tuple[AttentionMask, Tensor | None]:
    """The model's inputs -> the mask every core takes, and position ids (None: 0, 1, ... per row).
    Padded rows: attention_mask (batch, seq) of 1 and 0 -> a (batch, 1, 1, seq) bool key mask, which
    broadcasts over heads and queries (None when nothing is padding). Packed windows: a
    :class:`PackedWindows`, with positions that restart at each window (1, seq)."""
    if window_lengths is not None:
        windows = PackedWindows(tuple(window_lengths))
        return windows, windows.position_ids(device)
    if attention_mask is None or bool(attention_mask.all()):  # all ones masks nothing: skip the mask
        return None, None
    return attention_mask.bool()[:, None, None, :], None


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


def onednn_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: AttentionMask,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Short-window attention for CPU inference: per sequence and head, Q Kᵀ and P V as two oneDNN
    GEMMs (``torch.ops.mkldnn._linear_pointwise``, the library :mod:`distilqa.linear` uses) over that
    sequence's real keys only, so padding keys cost nothing. Where it does not apply (gradients,
    dropout, attention maps, other devices or dtypes, a key mask that is not right padding) it runs
    :func:`sdpa_attention`, which computes the same thing."""
    if need_weights or dropout_p > 0.0 or not _onednn_applies(query, key, value):
        return sdpa_attention(query, key, value, mask, dropout_p, need_weights)
    batch, heads, seq, head_dim = query.shape
    lengths = [seq] * batch
    if mask is not None:
        keys = mask[:, 0, 0, :].expand(batch, seq)  # (batch, seq)
        counts = keys.sum(dim=-1)  # (batch,)
        if not torch.equal(keys, torch.arange(seq, device=keys.device)[None, :] < counts[:, None]):
            return sdpa_attention(query, key, value, mask, dropout_p, need_weights)  # not right padding
        lengths = counts.tolist()
    gemm = torch.ops.mkldnn._linear_pointwise
    context = query.new_empty(batch, seq, heads, head_dim)  # token-major: merging the heads after is a view
    q = query.new_empty(heads, seq, head_dim)  # one sequence's queries, contiguous, reused
    for b, n in enumerate(lengths):
        if n == 0:  # every key is padding: uniform weights over all keys, as the eager core gives
            context[b] = value[b].mean(dim=1)[None, :, :].expand(seq, heads, head_dim)
            continue
        # oneDNN wants its operands contiguous: one copy per sequence, not per head, the scaling of the
        # queries (1/8 for head_dim 64: exact) in the same pass.
        torch.mul(query[b], head_dim**-0.5, out=q)
        k, v_t = key[b, :, :n].contiguous(), value[b, :, :n].transpose(1, 2).contiguous()
        for h in range(heads):
            scores = gemm(q[h], k[h], None, "none", [], "")  # (seq, n) = q kᵀ
            context[b, :, h] = gemm(torch.softmax(scores, dim=-1), v_t[h], None, "none", [], "")  # (seq, head_dim)
    return context.transpose(1, 2), None  # (batch, heads, seq, head_dim)


def _onednn_applies(*tensors: Tensor) -> bool:
    return (
        hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not torch.compiler.is_compiling()
    )


def triton_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: AttentionMask,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The hand-written FlashAttention forward kernel of :mod:`distilqa.kernels` (CUDA, or Triton's
    interpreter), given plain tensors: a (batch, seq) key mask, or packed windows as ``cu_seqlens``.

    Inference only: the kernel has no backward pass, so it refuses when gradients are required rather
    than return a result that no gradient flows through. Training runs the "sdpa" core (FlashAttention-2
    forward and backward on CUDA) or "eager"."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise RuntimeError(
            "the triton attention core is inference-only (no backward kernel), but gradients are required here; "
            "train or compute head importance with attn_implementation='sdpa' or 'eager', "
            "or run inference under torch.no_grad()"
        )
    if need_weights:
        raise ValueError("the triton core does not return attention weights; use attn_implementation='eager'")
    if dropout_p > 0.0:
        raise ValueError("the triton core has no attention dropout; train with attn_implementation='sdpa'")
    from distilqa.kernels import flash_attention  # Triton is optional: imported only when this core runs

    if isinstance(mask, PackedWindows):
        cu_seqlens = mask.cu_seqlens(query.device)  # (windows + 1,) int32
        return flash_attention(query, key, value, cu_seqlens=cu_seqlens, max_seqlen=max(mask.lengths)), None
    key_mask = None if mask is None else mask[:, 0, 0, :]  # (batch or 1, seq) bool
    return flash_attention(query, key, value, key_mask=key_mask), None


triton_attention.handles_packed_windows = True  # reads PackedWindows as cu_seqlens


def auto_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: AttentionMask,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """On the CPU, whichever core of :data:`AUTO_CANDIDATES` is measured fastest on this machine for the
    query's dtype and shape (:func:`fastest_cpu_attention`, once per process for each dtype and shape
    rounded up: the batch to a power of two, at most 8, the sequence to a multiple of 64); elsewhere, and
    inside ``torch.compile`` (whose own kernel replaces it), :func:`sdpa_attention`."""
    if query.device.type != "cpu" or torch.compiler.is_compiling():
        return sdpa_attention(query, key, value, mask, dropout_p, need_weights)
    batch, heads, seq, head_dim = query.shape
    name = fastest_cpu_attention(
        query.dtype, min(8, 1 << (batch - 1).bit_length()), heads, -(-seq // 64) * 64, head_dim
    )
    return ATTENTION_IMPLEMENTATIONS[name](query, key, value, mask, dropout_p, need_weights)


# What "auto" chooses from on the CPU ("eager" once the model has registered its written-out core).
AUTO_CANDIDATES = ("sdpa", "onednn", "eager")


@functools.cache
def fastest_cpu_attention(
    dtype: torch.dtype = torch.float32,
    batch: int = 1,
    heads: int = 12,
    seq: int = 384,
    head_dim: int = 64,
    repeat: int = 5,
) -> str:
    """The fastest core of :data:`AUTO_CANDIDATES` for attention over ``batch`` sequences of ``seq`` tokens
    in ``dtype``: the median of ``repeat`` calls each, the cores taking turns (a few ms to a few hundred,
    once per process and arguments). Which one wins depends on the shape: on an AMD EPYC in float32, sdpa
    for a 160-token window, oneDNN for 8 x 384; in bfloat16 the written-out core for a window, oneDNN for
    8 x 384. Another core only when its median is more than 5% below sdpa's (a tie keeps sdpa), and sdpa
    for dtypes other than fp32 and bf16."""
    if dtype not in (torch.float32, torch.bfloat16):
        return "sdpa"
    names = [n for n in AUTO_CANDIDATES if n in ATTENTION_IMPLEMENTATIONS]
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        names.remove("onednn")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, seq, heads, head_dim, generator=generator).to(dtype).transpose(1, 2) for _ in range(3)
    )
    with torch.inference_mode():
        seconds = median_seconds(
            {name: functools.partial(ATTENTION_IMPLEMENTATIONS[name], q, k, v, None) for name in names}, repeat
        )
    fastest = min(names, key=seconds.get)
    return fastest if seconds[fastest] < 0.95 * seconds["sdpa"] else "sdpa"


# The cores by name. "eager", the written-out core, lives with the model (distilqa.model.eager_attention),
# which registers it here under that name.
ATTENTION_IMPLEMENTATIONS: dict[str, AttentionFunction] = {
    "sdpa": sdpa_attention,
    "onednn": onednn_attention,
    "auto": auto_attention,
    "triton": triton_attention,
}


def resolve_attention(implementation: str | AttentionFunction) -> AttentionFunction:
    """Return the attention function for a name in :data:`ATTENTION_IMPLEMENTATIONS`, or a callable as is."""
    if callable(implementation):
        return implementation
    try:
        return ATTENTION_IMPLEMENTATIONS[implementation]
    except KeyError:
        names = ", ".join(repr(name) for name in dict.fromkeys(("eager", *ATTENTION_IMPLEMENTATIONS)))
        raise ValueError(
            f"unknown attention implementation {implementation!r}; expected one of {names} or a callable"
        ) from None
