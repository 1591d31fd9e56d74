"""DistilBERT for extractive question answering, written out by hand.

DistilBERT (Sanh et al. 2019, "DistilBERT, a distilled version of BERT") is BERT with half the
layers and no token-type embeddings or pooler, trained by distillation. For question answering a
linear head reads every token's final hidden state and scores it as the start and as the end of
the answer span.

    input_ids (batch, seq)
      -> Embeddings: word + learned position, LayerNorm, dropout         (batch, seq, dim)
      -> n_layers x TransformerBlock (post-LN):
           x = LayerNorm(x + SelfAttention(x))                          (batch, seq, dim)
           x = LayerNorm(x + FFN(x))                                    (batch, seq, dim)
      -> dropout, qa_outputs: Linear(dim, 2)                            (batch, seq, 2)
      -> start_logits, end_logits                                       (batch, seq) each

Module names mirror the keys of the published checkpoint (``distilbert.transformer.layer.0.
attention.q_lin.weight``, ...) so its weights load strictly, with no renaming.

This is the only implementation of the network in distilqa. Everything that answers, trains or
measures runs this module; speed comes from switches on it, each tested for the same logits:
which attention core (``set_attn_implementation``), which GEMM runs its ``nn.Linear`` layers
(``set_linear_backend``), which dtype, and whether windows are padded into a batch or packed end
to end (``window_lengths``, no work spent on padding).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distilqa.attention import (
    AttentionFunction,
    AttentionMask,
    PackedWindows,
    attend,
    eager_attention,
    resolve_attention,
)
from distilqa.config import DistilBertConfig
from distilqa.linear import set_linear_backend


@dataclass
class QuestionAnsweringOutput:
    start_logits: Tensor  # (batch, seq)
    end_logits: Tensor  # (batch, seq)
    loss: Tensor | None = None  # () mean of the start and end cross-entropies
    hidden_states: tuple[Tensor, ...] | None = None  # n_layers + 1 of (batch, seq, dim), embeddings first
    attentions: tuple[Tensor, ...] | None = None  # n_layers of (batch, heads, seq, seq)


def sinusoidal_position_table(n_positions: int, dim: int) -> Tensor:
    """The fixed table of "Attention is all you need": sin on even, cos on odd columns. (n_positions, dim)"""
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (n_positions, 1)
    frequency = 10000.0 ** (-2.0 * (torch.arange(dim, dtype=torch.float64) // 2) / dim)  # (dim,)
    angle = position * frequency  # (n_positions, dim)
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle))  # (n_positions, dim)
    return table.float()


class Embeddings(nn.Module):
    """Token embedding plus learned absolute position embedding (DistilBERT has no token types)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=1e-12)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """position_ids (batch or 1, seq): each token's position; by default 0, 1, ... along the row."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device)[None, :]  # (1, seq)
        words = self.word_embeddings(input_ids)  # (batch, seq, dim)
        embeddings = words + self.position_embeddings(position_ids)  # (batch, seq, dim) + (1, seq, dim)
        return self.dropout(self.LayerNorm(embeddings))  # (batch, seq, dim)


class MultiHeadSelfAttention(nn.Module):
    """Project to queries, keys and values, attend per head, project back."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.heads = list(range(config.n_heads))  # the heads still here, numbered as in the unpruned layer
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)
        self.dropout_p = config.attention_dropout
        self.attention_function: AttentionFunction = eager_attention  # swapped by set_attn_implementation

    def forward(
        self, x: Tensor, mask: AttentionMask, need_weights: bool, head_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x (batch, seq, dim); mask as in distilqa.attention; head_mask (config.n_heads,), 0 silences a
        head; it is numbered as in the unpruned layer, so it means the same heads after pruning."""
        batch, seq, dim = x.shape
        if not self.heads:  # every head pruned: the sub-layer adds only out_lin's bias
            return self.out_lin.bias.expand(batch, seq, dim), None

        def split_heads(t: Tensor) -> Tensor:  # (batch, seq, dim) -> (batch, heads, seq, head_dim)
            return t.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)

        query = split_heads(self.q_lin(x))  # (batch, heads, seq, head_dim)
        key = split_heads(self.k_lin(x))  # (batch, heads, seq, head_dim)
        value = split_heads(self.v_lin(x))  # (batch, heads, seq, head_dim)
        # Attention maps always come from the written-out core: fused kernels do not return them.
        core = eager_attention if need_weights else self.attention_function
        dropout_p = self.dropout_p if self.training else 0.0
        context, weights = attend(core, query, key, value, mask, dropout_p, need_weights)  # (batch, heads, seq, hd)
        if head_mask is not None:  # scaling a head's output scales its attention weights (Michel et al. 2019)
            head_mask = head_mask[self.heads] if len(self.heads) < head_mask.numel() else head_mask  # (heads,)
            context = context * head_mask[None, :, None, None].to(context.dtype)  # (batch, heads, seq, head_dim)
        context = context.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)  # heads concatenated
        return self.out_lin(context), weights  # (batch, seq, dim), (batch, heads, seq, seq) or None

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    def prune_heads(self, heads: Iterable[int]) -> None:
        """Remove heads for good (numbered as in the unpruned layer; ones already gone are skipped):
        their rows of q_lin, k_lin, v_lin (dim -> heads * head_dim) and columns of out_lin."""
        removed = set(heads)
        kept = [i for i, head in enumerate(self.heads) if head not in removed]  # positions among current heads
        if len(kept) == len(self.heads):
            return
        first = torch.tensor(kept, dtype=torch.long, device=self.q_lin.weight.device)[:, None] * self.head_dim
        features = (first + torch.arange(self.head_dim, device=first.device)).flatten()  # (kept * head_dim,)
        with torch.no_grad():  # new parameters in the same modules, so linear backends and hooks stay
            for linear in (self.q_lin, self.k_lin, self.v_lin):
                linear.weight = nn.Parameter(linear.weight[features].clone())  # (kept * head_dim, dim)
                linear.bias = nn.Parameter(linear.bias[features].clone())  # (kept * head_dim,)
                linear.out_features = len(features)
            self.out_lin.weight = nn.Parameter(self.out_lin.weight[:, features].clone())  # (dim, kept * head_dim)
            self.out_lin.in_features = len(features)
        self.heads = [self.heads[i] for i in kept]


class FFN(nn.Module):
    """Position-wise feed-forward: Linear(dim, hidden_dim), GELU or ReLU, Linear(hidden_dim, dim)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.activation = F.gelu if config.activation == "gelu" else F.relu  # exact (erf) GELU
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.activation(self.lin1(x))  # (batch, seq, hidden_dim)
        return self.dropout(self.lin2(hidden))  # (batch, seq, dim)


class TransformerBlock(nn.Module):
    """One post-LayerNorm encoder layer: residual then LayerNorm around each sub-layer."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)

    def forward(
        self, x: Tensor, mask: AttentionMask, need_weights: bool, head_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        attended, weights = self.attention(x, mask, need_weights, head_mask)  # (batch, seq, dim)
        x = self.sa_layer_norm(attended + x)  # (batch, seq, dim)
        x = self.output_layer_norm(self.ffn(x) + x)  # (batch, seq, dim)
        return x, weights


class Transformer(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))


class DistilBertModel(nn.Module):
    """The encoder: embeddings and the stack of blocks."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        output_hidden_states: bool,
        output_attentions: bool,
        head_mask: Tensor | None = None,
        window_lengths: Sequence[int] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Returns the last hidden state (batch, seq, dim), and the per-layer hidden states and
        attention maps that were asked for (empty tuples otherwise)."""
        mask: AttentionMask = None
        position_ids = None
        if window_lengths is not None:  # one row of windows end to end: positions restart at each window
            mask = PackedWindows(tuple(window_lengths))
            position_ids = mask.position_ids(input_ids.device)  # (1, seq)
        elif attention_mask is not None and not bool(attention_mask.all()):  # all ones masks nothing: skip it
            mask = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, seq): broadcast over heads, queries
        x = self.embeddings(input_ids, position_ids)  # (batch, seq, dim)
        hidden_states, attentions = [x] if output_hidden_states else [], []
        for i, block in enumerate(self.transformer.layer):
            layer_head_mask = None if head_mask is None else head_mask[i]  # (heads,)
            x, weights = block(x, mask, output_attentions, layer_head_mask)  # (batch, seq, dim)
            if output_hidden_states:
                hidden_states.append(x)
            if output_attentions:
                attentions.append(weights)
        return x, tuple(hidden_states), tuple(attentions)


class DistilBertForQuestionAnswering(nn.Module):
    """DistilBERT with the span head: a start and an end logit for every token."""

    def __init__(self, config: DistilBertConfig | None = None, attn_implementation: str | AttentionFunction = "sdpa"):
        super().__init__()
        self.config = config = config or DistilBertConfig()
        self.distilbert = DistilBertModel(config)
        self.dropout = nn.Dropout(config.qa_dropout)
        self.qa_outputs = nn.Linear(config.dim, 2)
        self.set_attn_implementation(attn_implementation)
        self.linear_backend = "aten"
        self.apply(self._init_weights)
        self.prune_heads(config.pruned_heads)  # a pruned checkpoint's config builds its pruned shapes

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation, for a model that is not loaded from a checkpoint."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, Embeddings) and self.config.sinusoidal_pos_embds:
            table = sinusoidal_position_table(self.config.max_position_embeddings, self.config.dim)
            module.position_embeddings.weight.data.copy_(table)

    def set_attn_implementation(self, implementation: str | AttentionFunction) -> None:
        """Swap the attention core of every layer: ``"eager"``, ``"sdpa"`` or an attention function."""
        function = resolve_attention(implementation)
        self.attn_implementation = implementation if isinstance(implementation, str) else function.__name__
        for block in self.distilbert.transformer.layer:
            block.attention.attention_function = function

    def prune_heads(self, heads_to_prune: dict[int, Iterable[int]]) -> None:
        """Remove attention heads for good, ``{layer: [heads]}`` numbered as in the unpruned model
        (as transformers v4 did). The model then computes what it computed with those heads masked
        (``head_mask`` 0), with smaller matrices; ``config.pruned_heads`` records them, so
        ``save_pretrained`` / ``from_pretrained`` round-trip the pruned model."""
        layers = self.distilbert.transformer.layer
        for layer, heads in heads_to_prune.items():
            if not 0 <= int(layer) < len(layers):
                raise ValueError(f"cannot prune heads of layer {layer}: the model has layers 0..{len(layers) - 1}")
            heads = {int(head) for head in heads}
            if bad := sorted(head for head in heads if not 0 <= head < self.config.n_heads):
                raise ValueError(f"cannot prune heads {bad} of layer {layer}: heads are 0..{self.config.n_heads - 1}")
            layers[int(layer)].attention.prune_heads(heads)
            pruned = set(self.config.pruned_heads.get(int(layer), [])) | heads
            self.config.pruned_heads[int(layer)] = sorted(pruned)

    def set_linear_backend(self, backend: str = "auto") -> str:
        """Which GEMM runs every ``nn.Linear``: "aten" (PyTorch's default), "onednn", or "auto" (the
        faster of the two on this machine, measured once). Returns the backend chosen. The float32
        logits agree within 1e-5 whichever runs; see distilqa.linear."""
        self.linear_backend = set_linear_backend(self, backend)
        return self.linear_backend

    def compile_blocks(self) -> None:
        """``torch.compile`` each transformer block in place, with dynamic shapes, so that new batch
        sizes and sequence lengths reuse the compiled code. The per-window loop of packed attention
        stays outside the graphs (``attend_each_window`` is not compiled), so new window lengths never
        recompile. The blocks keep their parameters: training and weight updates still show."""
        for block in self.distilbert.transformer.layer:
            block.compile(dynamic=True)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        head_mask: Tensor | None = None,
        window_lengths: Sequence[int] | None = None,
    ) -> QuestionAnsweringOutput:
        """input_ids (batch, seq) token ids; attention_mask (batch, seq), 1 for tokens and 0 for padding;
        start_positions / end_positions (batch,) gold token indices, to get the training loss;
        head_mask (heads,) or (n_layers, heads), 1 keeps a head and 0 removes its contribution;
        window_lengths: the input is one row (1, seq) of windows of these lengths laid end to end,
        each attending only to itself with positions counted from its own start (no padding)."""
        self._check_inputs(input_ids, attention_mask, window_lengths)
        if head_mask is not None:
            head_mask = self._expand_head_mask(head_mask)  # (n_layers, heads)
        x, hidden_states, attentions = self.distilbert(
            input_ids, attention_mask, output_hidden_states, output_attentions, head_mask, window_lengths
        )  # (batch, seq, dim)
        logits = self.qa_outputs(self.dropout(x))  # (batch, seq, 2)
        start_logits, end_logits = logits.unbind(dim=-1)  # (batch, seq) each
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringOutput(
            start_logits=start_logits.contiguous(),
            end_logits=end_logits.contiguous(),
            loss=loss,
            hidden_states=hidden_states or None,
            attentions=attentions or None,
        )

    def _expand_head_mask(self, head_mask: Tensor) -> Tensor:
        """(heads,) for every layer, or (n_layers, heads) -> (n_layers, heads)."""
        layers, heads = self.config.n_layers, self.config.n_heads
        if head_mask.dim() == 1:
            head_mask = head_mask[None, :].expand(layers, -1)
        if head_mask.shape != (layers, heads):
            raise ValueError(
                f"head_mask must have shape ({heads},) or ({layers}, {heads}), got {tuple(head_mask.shape)}"
            )
        return head_mask

    def _check_inputs(
        self, input_ids: Tensor, attention_mask: Tensor | None, window_lengths: Sequence[int] | None = None
    ) -> None:
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(
                f"input_ids must be an integer tensor (batch, seq), got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if window_lengths is not None:
            if input_ids.size(0) != 1 or sum(window_lengths) != input_ids.size(1) or attention_mask is not None:
                raise ValueError(
                    f"packed windows are one row (1, seq) with seq = sum(window_lengths) and no attention_mask; "
                    f"got input_ids {tuple(input_ids.shape)} for lengths summing to {sum(window_lengths)}"
                )
            if max(window_lengths) > self.config.max_position_embeddings:
                raise ValueError(
                    f"a window of {max(window_lengths)} tokens is longer than the model's "
                    f"{self.config.max_position_embeddings} positions"
                )
            return
        if input_ids.size(1) > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {input_ids.size(1)} tokens is longer than the model's "
                f"{self.config.max_position_embeddings} positions; split it into windows"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )

    @property
    def device(self) -> torch.device:
        return self.distilbert.embeddings.word_embeddings.weight.device  # embeddings: never quantised or swapped

    @property
    def dtype(self) -> torch.dtype:
        return self.distilbert.embeddings.word_embeddings.weight.dtype

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | AttentionFunction = "sdpa",
        linear_backend: str = "aten",
    ) -> DistilBertForQuestionAnswering:
        """Load a checkpoint folder (config.json + safetensors) or a hub repo id, in eval mode.

        ``dtype``: None or float32 (exact), bfloat16, float16, or "auto" (bfloat16 where the
        hardware multiplies it natively, see distilqa.hardware). ``linear_backend``: see
        :meth:`set_linear_backend`; the default "aten" reproduces transformers bit for bit."""
        from distilqa.hardware import resolve_dtype
        from distilqa.weights import load_pretrained

        device = torch.device(device or "cpu")
        model = load_pretrained(cls, name_or_path, revision, device, resolve_dtype(dtype, device), attn_implementation)
        model.set_linear_backend(linear_backend)
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors with the published key names."""
        from distilqa.weights import save_pretrained

        save_pretrained(self, directory)


def span_loss(start_logits: Tensor, end_logits: Tensor, start_positions: Tensor, end_positions: Tensor) -> Tensor:
    """Mean of the start and end cross-entropies. A gold position outside the sequence (e.g. an answer
    cut off by windowing) is clamped to ``seq`` and ignored, as in the reference."""
    seq = start_logits.size(1)
    start_positions = start_positions.reshape(-1).clamp(0, seq)  # (batch,)
    end_positions = end_positions.reshape(-1).clamp(0, seq)  # (batch,)
    start_loss = F.cross_entropy(start_logits, start_positions, ignore_index=seq)  # ()
    end_loss = F.cross_entropy(end_logits, end_positions, ignore_index=seq)  # ()
    return (start_loss + end_loss) / 2
