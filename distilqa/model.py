"""DistilBERT for extractive question answering, written out by hand.

DistilBERT (Sanh et al. 2019) is BERT with half the layers and no token-type embeddings or pooler,
trained by distillation. For question answering a linear head scores every token's final hidden
state as the start and as the end of the answer span.

    input_ids (batch, seq)
      -> Embeddings: word + learned position, LayerNorm, dropout         (batch, seq, dim)
      -> n_layers x TransformerBlock (post-LN):
           x = LayerNorm(x + SelfAttention(x))                          (batch, seq, dim)
           x = LayerNorm(x + FFN(x))                                    (batch, seq, dim)
      -> dropout, qa_outputs: Linear(dim, 2)                            (batch, seq, 2)
      -> start_logits, end_logits                                       (batch, seq) each

Module names mirror the published checkpoint's keys, so its weights load strictly, with no renaming.

The only implementation of the network in distilqa. Speed comes from switches on this one model, each tested
for the same logits: attention core, GEMM library and post-ops (``distilqa.linear``), dtype, packed windows.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distilqa import attention, linear, pruning
from distilqa.attention import AttentionFunction, AttentionMask, attend, attention_mask_and_positions, resolve_attention
from distilqa.config import DistilBertConfig
from distilqa.validate import check_model_inputs
from distilqa.weights import load_pretrained, save_pretrained


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
    return torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle)).float()


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
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (batch, seq, dim)
        return self.dropout(self.LayerNorm(embeddings))  # (batch, seq, dim)


def eager_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, dropout_p: float = 0.0, need_weights: bool = False
) -> tuple[Tensor, Tensor | None]:
    """softmax(Q Kᵀ / √d) V, step by step in the reference's order of operations; every other core computes
    the same. query, key, value (batch, heads, seq, head_dim); mask None or a (batch, 1, 1, seq) bool key
    mask, True at real tokens. -> context (batch, heads, seq, head_dim), weights (batch, heads, seq, seq)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * query.size(-1) ** -0.5  # (batch, heads, seq, seq)
    if mask is not None:
        # The dtype's most negative finite value, not -inf: a row whose keys are all padding then gets
        # uniform weights instead of NaN, in fp32, fp16 and bf16 alike.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1)  # (batch, heads, seq, seq): each query's weights over the keys
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0.0)
    context = torch.matmul(weights, value)  # (batch, heads, seq, head_dim): the weighted sum of values
    return context, (weights if need_weights else None)


# The written-out core by name, beside the other cores of distilqa.attention ("auto" measures it too).
attention.ATTENTION_IMPLEMENTATIONS["eager"] = eager_attention


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
        self,
        x: Tensor,
        mask: AttentionMask,
        need_weights: bool,
        head_mask: Tensor | None = None,
        residual: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x, residual (batch, seq, dim), residual added to the output; head_mask (n_heads,): 0 silences a head."""
        batch, seq, _ = x.shape
        if not self.n_heads:  # every head pruned: out_lin has no inputs left, the sub-layer adds only its bias
            return linear.linear_add(self.out_lin, x[..., :0], residual), None

        def split_heads(t: Tensor) -> Tensor:  # (batch, seq, dim) -> (batch, heads, seq, head_dim)
            return t.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)

        query, key, value = split_heads(self.q_lin(x)), split_heads(self.k_lin(x)), split_heads(self.v_lin(x))
        core = eager_attention if need_weights else self.attention_function  # only eager returns the maps
        dropout_p = self.dropout_p if self.training else 0.0
        context, weights = attend(core, query, key, value, mask, dropout_p, need_weights)  # (batch, heads, seq, hd)
        if head_mask is not None:  # scaling a head's output scales its attention weights (Michel et al. 2019)
            context = context * pruning.heads_present(head_mask, self.heads)[None, :, None, None].to(context.dtype)
        context = context.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)  # heads side by side
        return linear.linear_add(self.out_lin, context, residual), weights  # out_lin(context) + residual, maps

    @property
    def n_heads(self) -> int:  # heads still here
        return len(self.heads)


class FFN(nn.Module):
    """Position-wise feed-forward: Linear(dim, hidden_dim), GELU or ReLU, Linear(hidden_dim, dim)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.activation = nn.GELU() if config.activation == "gelu" else nn.ReLU()  # exact (erf); fusable: linear.py
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.chunk_tokens = 0  # > 0: that many positions at a time (set by a GEMM backend; see distilqa.linear)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:  # x, residual: (batch, seq, dim)
        if 0 < self.chunk_tokens < x[..., 0].numel() and residual is not None:  # position-wise: same result
            chunks = zip(*(t.flatten(0, -2).split(self.chunk_tokens) for t in (x, residual)))  # (tokens, dim)
            return torch.cat([self(x_part, r_part) for x_part, r_part in chunks]).view_as(x)
        hidden = self.activation(self.lin1(x))  # (batch, seq, hidden_dim)
        return linear.linear_add(self.lin2, hidden, residual, self.dropout)  # dropout(lin2(hidden)) + residual


class TransformerBlock(nn.Module):
    """One post-LayerNorm encoder layer; each sub-layer adds the residual itself (see linear.linear_add)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)

    def forward(
        self, x: Tensor, mask: AttentionMask, need_weights: bool, head_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        attended, weights = self.attention(x, mask, need_weights, head_mask, residual=x)  # x + SelfAttention(x)
        x = self.sa_layer_norm(attended)  # (batch, seq, dim)
        x = self.output_layer_norm(self.ffn(x, residual=x))  # x + FFN(x): (batch, seq, dim)
        return x, weights


class Transformer(nn.Module):
    def __init__(self, config: DistilBertConfig):  # the stack of blocks, named as in the checkpoint
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))


class DistilBertModel(nn.Module):
    """The encoder: embeddings and the stack of blocks."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
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
        """The last hidden state (batch, seq, dim), and the hidden states and attention maps asked for."""
        mask, position_ids = attention_mask_and_positions(attention_mask, window_lengths, input_ids.device)
        x = self.embeddings(input_ids, position_ids)  # (batch, seq, dim)
        hidden_states, attentions = [x] if output_hidden_states else [], []
        for i, block in enumerate(self.transformer.layer):
            x, weights = block(x, mask, output_attentions, None if head_mask is None else head_mask[i])
            hidden_states += [x] if output_hidden_states else []
            attentions += [weights] if output_attentions else []
        return x, tuple(hidden_states), tuple(attentions)


class DistilBertForQuestionAnswering(nn.Module):
    """DistilBERT with the span head: a start and an end logit for every token."""

    def __init__(self, config: DistilBertConfig | None = None, attn_implementation: str | AttentionFunction = "sdpa"):
        super().__init__()
        # The model's own copy: pruning records itself there, never in the caller's config object.
        self.config = config = copy.deepcopy(config) if config is not None else DistilBertConfig()
        self.distilbert = DistilBertModel(config)
        self.dropout = nn.Dropout(config.qa_dropout)
        self.qa_outputs = nn.Linear(config.dim, 2)
        self.set_attn_implementation(attn_implementation)
        self.apply(self._init_weights)
        self.prune_heads(config.pruned_heads)  # a pruned checkpoint's config builds its pruned shapes

    def _init_weights(self, module: nn.Module) -> None:  # BERT's, for a model not loaded from a checkpoint
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, Embeddings) and self.config.sinusoidal_pos_embds:
            table = sinusoidal_position_table(self.config.max_position_embeddings, self.config.dim)
            module.position_embeddings.weight.data.copy_(table)

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
        """input_ids (batch, seq); attention_mask (batch, seq), 1 for tokens and 0 for padding; start_positions,
        end_positions (batch,) gold token indices, for the training loss; head_mask (heads,) or (n_layers, heads),
        0 removes a head's contribution; window_lengths: input_ids is one row (1, seq) of windows of these
        lengths end to end, each attending only to itself, positions counted from its own start (no padding)."""
        check_model_inputs(input_ids, attention_mask, window_lengths, self.config.max_position_embeddings)
        head_mask = pruning.expand_head_mask(head_mask, self.config.n_layers, self.config.n_heads)
        x, hidden_states, attentions = self.distilbert(
            input_ids, attention_mask, output_hidden_states, output_attentions, head_mask, window_lengths
        )  # (batch, seq, dim)
        logits = self.qa_outputs(self.dropout(x))  # (batch, seq, 2)
        start_logits, end_logits = logits.unbind(dim=-1)  # (batch, seq) each
        loss = None if end_positions is None else span_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringOutput(
            start_logits.contiguous(), end_logits.contiguous(), loss, hidden_states or None, attentions or None
        )

    def set_attn_implementation(self, implementation: str | AttentionFunction) -> None:  # switches: how, not what
        """Every layer's attention core: "eager", "sdpa", "onednn", "auto", "triton" or a function like them."""
        function = resolve_attention(implementation)
        self.attn_implementation = implementation if isinstance(implementation, str) else function.__name__
        for block in self.distilbert.transformer.layer:
            block.attention.attention_function = function

    def set_linear_backend(self, backend: str = "auto") -> str:
        """Which GEMM runs every nn.Linear ("aten", "onednn", "onednn-int8", "auto": distilqa.linear); returns it."""
        return linear.set_linear_backend(self, backend)

    linear_backend = property(linear.linear_backend, doc="The GEMM backend of the nn.Linear layers, or 'mixed'.")

    def compile_blocks(self) -> None:
        """``torch.compile`` each block in place, dynamic shapes; packed windows' loop stays outside."""
        for block in self.distilbert.transformer.layer:
            block.compile(dynamic=True)

    def prune_heads(self, heads_to_prune: dict[int, Iterable[int]]) -> None:
        """Remove heads for good, ``{layer: [heads]}`` numbered as in the unpruned model: the same result as
        masking them (see distilqa.pruning); ``config.pruned_heads`` records them for save/load."""
        pruning.prune_heads(self, heads_to_prune)

    @property
    def device(self) -> torch.device:  # the embeddings': never quantised or swapped
        return self.distilbert.embeddings.word_embeddings.weight.device

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
        """A checkpoint folder (config.json, safetensors) or hub repo id, in eval mode: see weights.load_pretrained."""
        return load_pretrained(cls, name_or_path, revision, device, dtype, attn_implementation, linear_backend)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors with the published key names."""
        save_pretrained(self, directory)


def span_loss(start_logits: Tensor, end_logits: Tensor, start_positions: Tensor, end_positions: Tensor) -> Tensor:
    """Mean of the start and end cross-entropies; a gold position outside the sequence (an answer cut off by
    windowing) is clamped to ``seq`` and ignored, as in the reference."""
    seq = start_logits.size(1)
    start_positions = start_positions.reshape(-1).clamp(0, seq)  # (batch,)
    end_positions = end_positions.reshape(-1).clamp(0, seq)  # (batch,)
    start_loss = F.cross_entropy(start_logits, start_positions, ignore_index=seq)  # ()
    end_loss = F.cross_entropy(end_logits, end_positions, ignore_index=seq)  # ()
    return (start_loss + end_loss) / 2
