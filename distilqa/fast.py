"""Opt-in inference speed-ups that leave the readable model (and its checkpoint keys) alone.

    from distilqa.fast import optimize_for_inference

    fast = optimize_for_inference(model)                    # same fp32 math, fewer passes over memory
    fast = optimize_for_inference(model, quantize="int8")   # CPU only, approximate: int8 dynamic quantisation
    output = fast(input_ids, attention_mask)                # QuestionAnsweringOutput(start_logits, end_logits)
    start, end = fast.forward_packed(ids, lengths)          # sequences end to end, no padding: (tokens,) each

:func:`optimize_for_inference` returns a separate, inference-only module built from the model's
weights; the model is not modified, so its ``state_dict()``, ``save_pretrained`` and eager path
stay exactly as they are. The new module stores nothing in its own state dict (every tensor is a
non-persistent buffer), so it cannot be mistaken for a checkpoint; save the original model.

What it does differently from ``DistilBertForQuestionAnswering(attn_implementation="sdpa")``:

* q, k and v are one GEMM of N = 3 * dim (a concatenated weight) instead of three of N = dim, and
  the attention core reads query, key and value as strided views of that one output, without copies;
* an attention mask with no padding is dropped before the layers (transformers does the same), so
  the attention kernel runs its unmasked path;
* GELU and the residual additions are done in place, and the two largest intermediate tensors
  (the fused QKV output and the feed-forward hidden layer) are written into buffers reused from one
  call to the next, instead of freshly allocated memory that the OS must map and zero every call;
* in fp32 on CPU each linear layer is a plain matrix product followed by an in-place bias
  addition, which is faster there than ``F.linear``'s ``addmm`` (most at small token counts).

In fp32 this is the same arithmetic up to the order of rounding: the logits agree with the sdpa
model's to ~1e-6 (tests/test_fast.py checks 1e-5). ``quantize="int8"`` replaces every linear layer of
the encoder by ``quantized::linear_dynamic`` (weights int8 per output channel, activations
quantised per call) on CPU: faster, and approximate (measure the deviation for your inputs; the
forward benchmark reports it as ``max_abs_logit_diff``).

The module keeps per-shape scratch buffers, so one instance must not run forward in two threads at
once (a lock makes concurrent calls wait for each other instead of corrupting results).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distilqa.attention import sdpa_attention
from distilqa.model import DistilBertForQuestionAnswering, QuestionAnsweringOutput

QUANTIZATIONS = (None, "int8")


class _Linear(nn.Module):
    """y = x Wᵀ + b for x (tokens, in_features), optionally written into a reused buffer ``out``.

    fp32 on CPU: one ``mm`` and then the bias added in place, which is faster there than
    ``F.linear``'s ``addmm`` (that broadcasts the bias into the output first and then accumulates
    onto it): ~10% per GEMM at 128 tokens, ~1-2% at thousands. The sum is the same up to rounding
    order. Other dtypes and devices: ``addmm``, as F.linear (in bf16 on CPU that is the faster one)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous(), persistent=False)  # (out, in)
        self.register_buffer("bias", bias.detach().contiguous(), persistent=False)  # (out,)

    @property
    def out_features(self) -> int:
        return self.weight.size(0)

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32:
            return torch.mm(x, self.weight.t(), out=out).add_(self.bias)  # (tokens, out)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)  # (tokens, out)


class _Int8Linear(nn.Module):
    """Dynamically quantised linear layer: int8 weights (per output channel), activations quantised per call."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        weight = weight.detach().float().contiguous()  # (out, in)
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        with warnings.catch_warnings():  # torch marks its quantized tensors deprecated; they still work
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(
                weight, scales.double(), torch.zeros_like(scales, dtype=torch.long), axis=0, dtype=torch.qint8
            )
            self.packed = torch.ops.quantized.linear_prepack(quantized, bias.detach().float().contiguous())
        self.out_features = weight.size(0)

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:  # `out` is only a hint: unused
        return torch.ops.quantized.linear_dynamic(x, self.packed)  # (tokens, out)


class _Layer(nn.Module):
    """One encoder layer, computed on (tokens, dim) rows; the same function as TransformerBlock in eval mode."""

    def __init__(self, block: nn.Module, linear: type[nn.Module]) -> None:
        super().__init__()
        attention, ffn = block.attention, block.ffn
        self.n_heads, self.head_dim = attention.n_heads, attention.head_dim
        qkv_weight = torch.cat([attention.q_lin.weight, attention.k_lin.weight, attention.v_lin.weight])  # (3*dim, dim)
        qkv_bias = torch.cat([attention.q_lin.bias, attention.k_lin.bias, attention.v_lin.bias])  # (3*dim,)
        self.qkv = linear(qkv_weight, qkv_bias)
        self.out_lin = linear(attention.out_lin.weight, attention.out_lin.bias)
        self.lin1 = linear(ffn.lin1.weight, ffn.lin1.bias)
        self.lin2 = linear(ffn.lin2.weight, ffn.lin2.bias)
        self.activation = torch.ops.aten.gelu_ if ffn.activation is F.gelu else torch.ops.aten.relu_
        self.sa_layer_norm = _FrozenLayerNorm(block.sa_layer_norm)
        self.output_layer_norm = _FrozenLayerNorm(block.output_layer_norm)

    def forward(self, x: Tensor, attend: Attend, scratch: dict[str, Tensor]) -> Tensor:
        qkv = self.qkv(x, out=scratch.get("qkv"))  # (tokens, 3*dim): q | k | v
        context = attend(qkv, self.n_heads, self.head_dim)  # (tokens, dim): heads concatenated
        attended = self.out_lin(context)  # (tokens, dim)
        attended += x  # residual, in place
        x = self.sa_layer_norm(attended)  # (tokens, dim)
        hidden = self.activation(self.lin1(x, out=scratch.get("hidden")))  # (tokens, hidden_dim), in place
        output = self.lin2(hidden)  # (tokens, dim)
        output += x  # residual, in place
        return self.output_layer_norm(output)  # (tokens, dim)


Attend = Callable[[Tensor, int, int], Tensor]  # (qkv (tokens, 3*dim), heads, head_dim) -> context (tokens, dim)


def padded_attention(batch: int, key_mask: Tensor | None) -> Attend:
    """Attention over ``batch`` rows of equal length, padding masked by ``key_mask`` (batch, 1, 1, seq)."""

    def attend(qkv: Tensor, heads: int, head_dim: int) -> Tensor:
        tokens = qkv.size(0)
        qkv = qkv.view(batch, tokens // batch, 3, heads, head_dim)  # (batch, seq, 3, heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (batch, heads, seq, head_dim) views
        context, _ = sdpa_attention(query, key, value, key_mask)  # (batch, heads, seq, head_dim)
        return context.transpose(1, 2).reshape(tokens, heads * head_dim)  # (tokens, dim)

    return attend


def packed_attention(lengths: Sequence[int]) -> Attend:
    """Attention within each of several sequences laid end to end (no padding, no mask)."""
    single = padded_attention(1, None)

    def attend(qkv: Tensor, heads: int, head_dim: int) -> Tensor:
        return torch.cat([single(part, heads, head_dim) for part in qkv.split(list(lengths))])  # (tokens, dim)

    return attend


class _FrozenLayerNorm(nn.Module):
    """A LayerNorm's weights as non-persistent buffers."""

    def __init__(self, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.normalized_shape, self.eps = tuple(layer_norm.normalized_shape), layer_norm.eps
        self.register_buffer("weight", layer_norm.weight.detach(), persistent=False)
        self.register_buffer("bias", layer_norm.bias.detach(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class FastDistilBertForQuestionAnswering(nn.Module):
    """Inference-only DistilBERT QA built by :func:`optimize_for_inference`. Call it like the model:
    ``fast(input_ids, attention_mask=None)`` -> QuestionAnsweringOutput(start_logits, end_logits)."""

    def __init__(self, model: DistilBertForQuestionAnswering, quantize: str | None = None) -> None:
        super().__init__()
        if quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
        if quantize == "int8" and (model.device.type != "cpu" or model.dtype != torch.float32):
            raise ValueError("quantize='int8' needs a float32 model on the CPU")
        self.config, self.quantize = model.config, quantize
        embeddings = model.distilbert.embeddings
        for name, tensor in (
            ("word_embeddings", embeddings.word_embeddings.weight),
            ("position_embeddings", embeddings.position_embeddings.weight),
            ("qa_weight", model.qa_outputs.weight),
            ("qa_bias", model.qa_outputs.bias),
        ):
            self.register_buffer(name, tensor.detach(), persistent=False)
        self.embedding_layer_norm = _FrozenLayerNorm(embeddings.LayerNorm)
        linear = _Int8Linear if quantize == "int8" else _Linear
        with torch.no_grad():
            self.layers = nn.ModuleList(_Layer(block, linear) for block in model.distilbert.transformer.layer)
        self._scratch_key: tuple | None = None
        self._scratch: dict[str, Tensor] = {}
        self._lock = threading.Lock()
        self.eval()

    def _apply(self, fn: Any, recurse: bool = True) -> FastDistilBertForQuestionAnswering:
        if self.quantize == "int8":
            raise RuntimeError("an int8 module cannot be moved or cast; build it from a model already in place")
        self._scratch_key, self._scratch = None, {}  # rebuilt on the next call, on the new device / dtype
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return self.qa_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.qa_weight.dtype

    def train(self, mode: bool = True) -> FastDistilBertForQuestionAnswering:
        if mode:
            raise RuntimeError("FastDistilBertForQuestionAnswering is for inference only; train the original model")
        return super().train(False)

    def _scratch_for(self, tokens: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """Output buffers for the fused QKV and the feed-forward hidden layer, kept for the last shape."""
        key = (tokens, dtype)
        if self._scratch_key != key:
            layer = self.layers[0]
            self._scratch = {
                "qkv": torch.empty(tokens, layer.qkv.out_features, device=self.device, dtype=dtype),
                "hidden": torch.empty(tokens, layer.lin1.out_features, device=self.device, dtype=dtype),
            }
            self._scratch_key = key
        return self._scratch

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> QuestionAnsweringOutput:
        """input_ids (batch, seq); attention_mask (batch, seq), 1 for tokens and 0 for padding, or None."""
        # The model's own input checks (they read only self.config), so both raise the same errors.
        DistilBertForQuestionAnswering._check_inputs(self, input_ids, attention_mask)
        batch, seq = input_ids.shape
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):  # all ones masks nothing: drop it
            key_mask = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, seq)
        positions = self.position_embeddings[:seq]  # (seq, dim)
        x = F.embedding(input_ids, self.word_embeddings) + positions  # (batch, seq, dim)
        x = self.embedding_layer_norm(x).view(batch * seq, -1)  # (tokens, dim)
        logits = self._encode(x, padded_attention(batch, key_mask)).view(batch, seq, 2)  # (batch, seq, 2)
        start_logits, end_logits = logits.unbind(dim=-1)  # (batch, seq) each
        return QuestionAnsweringOutput(start_logits=start_logits.contiguous(), end_logits=end_logits.contiguous())

    @torch.inference_mode()
    def forward_packed(self, input_ids: Tensor, lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Sequences of different lengths laid end to end, with no padding: input_ids (tokens,) and the
        ``lengths`` that sum to tokens. The linear layers run on all tokens at once and attention runs
        within each sequence, so no work is spent on padding and no mask is needed.
        Returns start and end logits, (tokens,) each."""
        if input_ids.dim() != 1 or sum(lengths) != input_ids.numel():
            raise ValueError(f"input_ids {tuple(input_ids.shape)} must be 1-D with {sum(lengths)} = sum(lengths) ids")
        if max(lengths) > self.config.max_position_embeddings:
            raise ValueError(f"a sequence of {max(lengths)} tokens exceeds {self.config.max_position_embeddings}")
        positions = torch.cat([torch.arange(n, device=input_ids.device) for n in lengths])  # (tokens,)
        x = F.embedding(input_ids, self.word_embeddings) + self.position_embeddings[positions]  # (tokens, dim)
        logits = self._encode(self.embedding_layer_norm(x), packed_attention(lengths))  # (tokens, 2)
        start_logits, end_logits = logits.unbind(dim=-1)  # (tokens,) each
        return start_logits.contiguous(), end_logits.contiguous()

    def _encode(self, x: Tensor, attend: Attend) -> Tensor:
        """The layers and the span head on embedded tokens x (tokens, dim) -> logits (tokens, 2)."""
        with self._lock:
            scratch = self._scratch_for(x.size(0), x.dtype)
            for layer in self.layers:
                x = layer(x, attend, scratch)  # (tokens, dim)
        return F.linear(x, self.qa_weight, self.qa_bias)  # (tokens, 2)


def optimize_for_inference(
    model: DistilBertForQuestionAnswering, quantize: str | None = None
) -> FastDistilBertForQuestionAnswering:
    """A faster, inference-only module computing the same function as ``model`` in eval mode (see the
    module docstring). ``model`` is left unchanged. ``quantize="int8"``: CPU, approximate."""
    if not isinstance(model, DistilBertForQuestionAnswering):
        raise TypeError(f"expected a distilqa DistilBertForQuestionAnswering, got {type(model).__name__}")
    return FastDistilBertForQuestionAnswering(model, quantize=quantize)
