"""A FlashAttention-2-style forward kernel in Triton for DistilBERT's bidirectional attention.

Names follow the FlashAttention-2 paper (Dao, 2023, Algorithm 1): a tile Q_i of B_r query rows
(``BLOCK_M``) stays on chip while the loop walks the tiles K_j, V_j of B_c keys (``BLOCK_N``);
S_ij = Q_i K_jᵀ is the tile of scores, m_i the running row maximum, l_i the running row sum of
exponentials and O_i the un-normalised output, all in fp32.

The online softmax, for one query row with scores s_1..s_N over key tiles:

    softmax(s)_k = exp(s_k - m) / l,   m = max_k s_k,   l = Σ_k exp(s_k - m).

After the first j tiles, keep m⁽ʲ⁾ (max so far), l⁽ʲ⁾ = Σ exp(s_k - m⁽ʲ⁾) and
O⁽ʲ⁾ = Σ exp(s_k - m⁽ʲ⁾) v_k over the keys seen. A new tile with scores S and values V gives

    m⁽ʲ⁺¹⁾ = max(m⁽ʲ⁾, max S),   α = exp(m⁽ʲ⁾ - m⁽ʲ⁺¹⁾),   P = exp(S - m⁽ʲ⁺¹⁾),
    l⁽ʲ⁺¹⁾ = α l⁽ʲ⁾ + Σ P,       O⁽ʲ⁺¹⁾ = α O⁽ʲ⁾ + P V,

because every earlier term exp(s_k - m⁽ʲ⁾) becomes exp(s_k - m⁽ʲ⁺¹⁾) when multiplied by α. After
the last tile, O / l is exactly softmax(s) V, and the (seq, seq) score matrix never exists in
memory. The kernel works in base 2 (exp2, with log2(e) folded into the scale), which is the same
computation: exp(x) = 2^(x log2 e).

Which keys a query sees (plain tensors, as in flash-attn's API; :mod:`distilqa.attention` converts
the model's masks to them):

* neither ``key_mask`` nor ``cu_seqlens``: every key of the row.
* ``key_mask`` (batch or 1, seq) bool, True at real tokens: a padding key scores ``PADDING_SCORE``
  (a finite, very negative number, like the eager core's ``finfo.min``), so it gets weight exactly 0
  as soon as one real key has been seen (α then zeroes what padding contributed before). A query
  whose keys are *all* padding therefore gets uniform weights over all ``seq`` keys of its row, i.e.
  the mean of every value vector, padding included: the eager core's result, not NaN.
* ``cu_seqlens`` (windows + 1,) int32 with ``max_seqlen``: batch 1, windows laid end to end, as in
  flash-attn's variable-length API. Each program handles one query tile of one
  window and reads only that window's keys, so no score crosses windows and no padding is computed.

Tensors run on CUDA, or on CPU in Triton's interpreter (``TRITON_INTERPRET=1``, slow, for tests).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - exercised only where Triton is missing
    raise ImportError(
        "the 'triton' attention core needs the Triton package: `pip install triton` (on Linux with an NVIDIA GPU), "
        "or choose attn_implementation='sdpa'"
    ) from error

# What a padding key scores (log2 units). Finite on purpose: exp2(PADDING_SCORE - m) is 0 for any
# real score m, but a row of only padding keys has max = PADDING_SCORE and exp2(0) = 1 per key:
# uniform weights, as in the eager core. (-inf would make that row 0/0 = NaN.)
PADDING_SCORE = -1.0e30
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # powers of two: tl.arange needs one, tl.dot needs >= 16
# Tile sizes and launch settings on CUDA for head_dim 64; not yet timed on a GPU. Compiled ahead of
# time for sm_90 (Triton 3.9), 128 x 64 tiles with 4 warps need 255 registers and spill (64 bytes of
# stack); with 8 warps (two warpgroups, 64 query rows each for wgmma) they fit in 209 with no spill.
CUDA_BLOCK_M, CUDA_BLOCK_N, CUDA_NUM_STAGES = 128, 64, 3
# In the interpreter, small tiles so that small test shapes still span several tiles.
INTERPRETER_BLOCK = 16


@triton.jit
def _flash_attention_forward_kernel(
    Q,  # (batch, heads, seq, HEAD_DIM), last dimension contiguous
    K,
    V,
    Out,  # the output O, same shape as Q
    key_mask,  # (batch, seq) uint8, 1 at real keys; read only if HAS_KEY_MASK
    cu_seqlens,  # (sequences + 1,) int32 window offsets; read only if VARLEN
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    stride_mb,
    stride_mn,
    seq_len,  # keys per row when not VARLEN
    scale_log2,  # 1/sqrt(HEAD_DIM) * log2(e): scores in base-2 units
    PADDING: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # B_r: query rows per tile
    BLOCK_N: tl.constexpr,  # B_c: keys per tile
    HAS_KEY_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32 rounding), else the default
    DOT_IN_FP32: tl.constexpr,  # interpreter with bf16 inputs only: see _dot_in_fp32
):
    # Which tile: query tile i of sequence `sequence` (a batch row, or a packed window) and head `head`.
    i = tl.program_id(0)
    sequence = tl.program_id(1)
    head = tl.program_id(2)
    if VARLEN:  # window `sequence` of the single packed row: tokens start .. start + N - 1
        batch = 0
        start = tl.load(cu_seqlens + sequence)
        N = tl.load(cu_seqlens + sequence + 1) - start
    else:  # batch row `sequence`, all seq_len tokens
        batch = sequence
        start = 0
        N = seq_len
    if i * BLOCK_M >= N:  # a short window has fewer query tiles than the grid's longest one
        return

    # Load Q_i once: (B_r, HEAD_DIM); rows past the sequence's end read zeros and are never stored.
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + batch * stride_qb + head * stride_qh + (start + offs_m)[:, None] * stride_qn + offs_d[None, :]
    Q_i = tl.load(q_ptrs, mask=(offs_m < N)[:, None], other=0.0)
    if DOT_IN_FP32:
        Q_i = Q_i.to(tl.float32)
    k_base = K + batch * stride_kb + head * stride_kh + start * stride_kn
    v_base = V + batch * stride_vb + head * stride_vh + start * stride_vn

    # Running statistics of each query row, fp32: max m_i, sum l_i, un-normalised output O_i.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    O_i = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for j_start in range(0, N, BLOCK_N):
        # Load K_j: (B_c, HEAD_DIM); keys past the sequence's end read zeros.
        offs_n = j_start + tl.arange(0, BLOCK_N)
        in_sequence = offs_n < N
        K_j = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_sequence[:, None], other=0.0)
        if DOT_IN_FP32:
            K_j = K_j.to(tl.float32)

        # Scores S_ij = Q_i K_jᵀ / sqrt(d), fp32 accumulation, in base-2 units: (B_r, B_c).
        S_ij = tl.dot(Q_i, tl.trans(K_j), input_precision=DOT_PRECISION) * scale_log2

        # Mask: padding keys score PADDING (weight 0 unless the whole row is padding); keys past the
        # sequence's end are not keys at all: -inf, weight 0 always.
        if HAS_KEY_MASK:
            is_real = tl.load(key_mask + batch * stride_mb + offs_n * stride_mn, mask=in_sequence, other=0)
            S_ij = tl.where(is_real[None, :] != 0, S_ij, PADDING)
        S_ij = tl.where(in_sequence[None, :], S_ij, float("-inf"))

        # Online softmax: new running max, rescale factor alpha for what was summed under the old max.
        m_ij = tl.maximum(m_i, tl.max(S_ij, axis=1))
        alpha = tl.exp2(m_i - m_ij)  # exp(m_old - m_new); 0 on the first tile (m_old = -inf)
        P_ij = tl.exp2(S_ij - m_ij[:, None])  # (B_r, B_c) un-normalised probabilities
        l_i = alpha * l_i + tl.sum(P_ij, axis=1)

        # O_i = alpha O_i + P_ij V_j: P in the inputs' dtype for the tensor cores, fp32 accumulation.
        V_j = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_sequence[:, None], other=0.0)
        P_ij = P_ij.to(V.dtype.element_ty)
        if DOT_IN_FP32:
            P_ij, V_j = P_ij.to(tl.float32), V_j.to(tl.float32)
        O_i = O_i * alpha[:, None] + tl.dot(P_ij, V_j, input_precision=DOT_PRECISION)
        m_i = m_ij

    # Normalise once at the end (FlashAttention-2 defers the division by l_i out of the loop) and store.
    O_i = O_i / l_i[:, None]
    o_ptrs = Out + batch * stride_ob + head * stride_oh + (start + offs_m)[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, O_i.to(Out.dtype.element_ty), mask=(offs_m < N)[:, None])


def _dot_in_fp32(dtype: torch.dtype, interpret: bool) -> bool:
    """Whether the kernel widens its bf16 dot operands to fp32 first: only in Triton's interpreter,
    whose ``tl.dot`` on bf16 tiles returns garbage (seen with Triton 3.9: it multiplies the raw
    uint16 storage). The product of two bf16 numbers is exact in fp32 and the GPU accumulates in
    fp32 too, so the widened dot computes what the tensor cores compute on the GPU."""
    return interpret and dtype == torch.bfloat16


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter in this process.

    Triton settles this when it is first imported, from TRITON_INTERPRET: its own library functions
    (``tl.max``, ``tl.sum``) are wrapped then for the interpreter or for the compiler, and a kernel of
    the other kind cannot call them. (Importing torch._dynamo, which ``import distilqa`` does, imports
    Triton: the variable must be in the environment before Python starts, or at least before torch.)"""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(tl.max, InterpretedFunction):
        return True
    if isinstance(tl.max, JITFunction):
        return False
    knobs = getattr(triton, "knobs", None)  # a Triton that wraps its library differently: ask its setting
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_KERNELS: dict[bool, Any] = {}


def _kernel(interpret: bool) -> Any:
    """The kernel compiled for the GPU, or wrapped for the interpreter.

    ``@triton.jit`` chooses between the two when this module is imported, from TRITON_INTERPRET at that
    moment, which need not be what it was when Triton itself was imported; the kind is chosen here to
    match Triton's library (:func:`interpreting`)."""
    if interpret not in _KERNELS:
        function = _flash_attention_forward_kernel.fn  # the plain Python function under the decorator
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNELS[interpret] = InterpretedFunction(function)
        else:
            from triton.runtime.jit import JITFunction

            _KERNELS[interpret] = JITFunction(function)
    return _KERNELS[interpret]


def _check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_mask: Tensor | None,
    cu_seqlens: Tensor | None,
    max_seqlen: int | None,
    interpret: bool,
) -> None:
    if not (query.shape == key.shape == value.shape) or query.dim() != 4:
        raise ValueError(
            "flash_attention expects query, key and value of one shape (batch, heads, seq, head_dim), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"flash_attention expects query, key and value of one dtype among float32, float16, bfloat16; got "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value are on different devices: {query.device}, {key.device}, {value.device}")
    if query.size(-1) not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"flash_attention supports head_dim in {SUPPORTED_HEAD_DIMS}, got {query.size(-1)}; "
            "use attn_implementation='sdpa' for this model"
        )
    if query.device.type != "cuda" and not interpret:  # a ValueError: the CLI reports it as a user error
        raise ValueError(
            f"the triton attention core runs on CUDA tensors, but these are on {query.device}: move the model to a "
            "GPU (device='cuda'), use attn_implementation='sdpa' on this machine, or, to check the kernel on CPU, "
            "run Python with TRITON_INTERPRET=1 in its environment (Triton's interpreter, slow; it must be set "
            "before Triton is first imported)"
        )
    batch, _, seq, _ = query.shape
    if cu_seqlens is not None:
        if key_mask is not None:
            raise ValueError("pass a key_mask or cu_seqlens, not both")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.device != query.device:
            raise ValueError(
                f"cu_seqlens must be an int32 vector on {query.device}, got {cu_seqlens.dtype} {cu_seqlens}"
            )
        if batch != 1 or int(cu_seqlens[-1]) != seq or max_seqlen is None:
            raise ValueError(
                f"packed windows need batch 1, seq = cu_seqlens[-1] ({int(cu_seqlens[-1])}) and max_seqlen; "
                f"got batch {batch}, seq {seq}, max_seqlen {max_seqlen}"
            )
    elif key_mask is not None:
        if (
            key_mask.dtype != torch.bool
            or key_mask.dim() != 2
            or key_mask.size(1) != seq
            or key_mask.size(0) not in (1, batch)
        ):
            raise ValueError(
                f"the key mask must be a bool tensor (batch, seq) = ({batch}, {seq}), got {key_mask.dtype} "
                f"{tuple(key_mask.shape)}"
            )
        if key_mask.device != query.device:
            raise ValueError(f"the key mask is on {key_mask.device} but the queries are on {query.device}")


def flash_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """softmax(Q Kᵀ / sqrt(head_dim)) V, bidirectional, by the Triton kernel above.

    query, key, value: (batch, heads, seq, head_dim), one dtype (fp32, fp16, bf16), head_dim 16-128 (a
    power of two), any strides (the model's transposed views are read in place). ``key_mask``: None or
    (batch or 1, seq) bool, True at real tokens; or ``cu_seqlens`` (windows + 1,) int32 window offsets
    with ``max_seqlen`` the longest window, for packed windows (batch 1). ``block_m`` /
    ``block_n``: the tile sizes B_r / B_c (powers of two >= 16; default 128 / 64 on CUDA, 16 in the
    interpreter); ``num_warps``: warps per program on CUDA (default 8 for 128-row tiles, else 4).

    Returns the context (batch, heads, seq, head_dim), in the inputs' dtype, as a transposed view of
    a contiguous (batch, seq, heads, head_dim) tensor: merging the heads after it needs no copy.
    """
    interpret = interpreting()
    _check_inputs(query, key, value, key_mask, cu_seqlens, max_seqlen, interpret)
    batch, heads, seq, head_dim = query.shape
    output = torch.empty(batch, seq, heads, head_dim, dtype=query.dtype, device=query.device).transpose(1, 2)
    if output.numel() == 0:
        return output
    default_block = INTERPRETER_BLOCK if interpret else None
    block_m = block_m or default_block or CUDA_BLOCK_M
    block_n = block_n or default_block or CUDA_BLOCK_N
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {block}")
    # The kernel steps along head_dim with stride 1; anything else is copied once.
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))

    if cu_seqlens is not None:
        sequences, longest = cu_seqlens.numel() - 1, max_seqlen
    else:
        sequences, longest = batch, seq
    if key_mask is not None:
        key_mask = key_mask.view(torch.uint8)  # (batch or 1, seq), no copy
        stride_mb = 0 if key_mask.size(0) == 1 else key_mask.stride(0)
        stride_mn = key_mask.stride(1)
    else:
        stride_mb = stride_mn = 0
    dot_in_fp32 = _dot_in_fp32(query.dtype, interpret)
    # Arguments the kernel does not read still need a pointer: pass the output.
    grid = (triton.cdiv(longest, block_m), sequences, heads)
    _kernel(interpret)[grid](
        query,
        key,
        value,
        output,
        key_mask if key_mask is not None else output,
        cu_seqlens if cu_seqlens is not None else output,
        *query.stride()[:3],
        *key.stride()[:3],
        *value.stride()[:3],
        *output.stride()[:3],
        stride_mb,
        stride_mn,
        seq,
        head_dim**-0.5 * math.log2(math.e),
        PADDING=PADDING_SCORE,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_KEY_MASK=key_mask is not None,
        VARLEN=cu_seqlens is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or dot_in_fp32 else "tf32",
        DOT_IN_FP32=dot_in_fp32,
        num_warps=num_warps or (8 if block_m >= 128 else 4),
        num_stages=CUDA_NUM_STAGES,
    )
    return output
