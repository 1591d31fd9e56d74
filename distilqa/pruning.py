"""Head masks and head pruning: the bookkeeping behind ``model.head_mask`` and ``model.prune_heads``.

A head mask (Michel et al. 2019, "Are Sixteen Heads Really Better than One?") scales each head's
output; 0 silences a head. Pruning removes masked heads for good: their rows of ``q_lin``, ``k_lin``,
``v_lin`` and columns of ``out_lin`` go, so the model computes what it computed with those heads
masked, with smaller matrices. Heads are always numbered as in the unpruned layer, so a mask or a
pruning request means the same heads before and after pruning.

This module works on the model's own modules (any object with ``heads``, ``head_dim`` and the four
``nn.Linear`` projections); it imports nothing from the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


def check_heads_to_prune(heads_to_prune: Mapping[int, Iterable[int]], n_layers: int, n_heads: int) -> dict[int, set]:
    """``{layer: heads}`` as ints, or ValueError naming the layer or head out of range."""
    checked = {}
    for layer, heads in heads_to_prune.items():
        if not 0 <= int(layer) < n_layers:
            raise ValueError(f"cannot prune heads of layer {layer}: the model has layers 0..{n_layers - 1}")
        heads = {int(head) for head in heads}
        if bad := sorted(head for head in heads if not 0 <= head < n_heads):
            raise ValueError(f"cannot prune heads {bad} of layer {layer}: heads are 0..{n_heads - 1}")
        checked[int(layer)] = heads
    return checked


def prune_heads(model: nn.Module, heads_to_prune: Mapping[int, Iterable[int]]) -> None:
    """``model.prune_heads``: prune each layer's heads (numbered as in the unpruned model) and record them in
    ``model.config.pruned_heads``, the model's own copy of its config, for save and load."""
    layers = model.distilbert.transformer.layer
    for layer, heads in check_heads_to_prune(heads_to_prune, len(layers), model.config.n_heads).items():
        prune_attention_heads(layers[layer].attention, heads)
        model.config.pruned_heads[layer] = sorted(set(model.config.pruned_heads.get(layer, [])) | heads)


def prune_attention_heads(attention: nn.Module, heads: Iterable[int]) -> None:
    """Remove ``heads`` (numbered as in the unpruned layer; ones already gone are skipped) from one
    attention module, in place: new, smaller parameters in the same ``nn.Linear`` modules, so linear
    backends and hooks stay. q/k/v: (dim -> kept * head_dim); out_lin: (kept * head_dim -> dim)."""
    removed = set(heads)
    kept = [i for i, head in enumerate(attention.heads) if head not in removed]  # positions among current heads
    if len(kept) == len(attention.heads):
        return
    device = attention.q_lin.weight.device
    first = torch.tensor(kept, dtype=torch.long, device=device)[:, None] * attention.head_dim
    features = (first + torch.arange(attention.head_dim, device=device)).flatten()  # (kept * head_dim,)
    with torch.no_grad():
        for linear in (attention.q_lin, attention.k_lin, attention.v_lin):
            linear.weight = nn.Parameter(linear.weight[features].clone())  # (kept * head_dim, dim)
            linear.bias = nn.Parameter(linear.bias[features].clone())  # (kept * head_dim,)
            linear.out_features = len(features)
        attention.out_lin.weight = nn.Parameter(attention.out_lin.weight[:, features].clone())
        attention.out_lin.in_features = len(features)
    attention.heads = [attention.heads[i] for i in kept]


def expand_head_mask(head_mask: Tensor | None, n_layers: int, n_heads: int) -> Tensor | None:
    """(heads,) for every layer, or (n_layers, heads) -> (n_layers, heads); None stays None; ValueError otherwise."""
    if head_mask is None:
        return None
    if head_mask.dim() == 1:
        head_mask = head_mask[None, :].expand(n_layers, -1)
    if head_mask.shape != (n_layers, n_heads):
        raise ValueError(
            f"head_mask must have shape ({n_heads},) or ({n_layers}, {n_heads}), got {tuple(head_mask.shape)}"
        )
    return head_mask


def heads_present(layer_head_mask: Tensor, heads: list[int]) -> Tensor:
    """A layer's mask (n_heads,) numbered as in the unpruned layer -> the entries of the heads still
    there (len(heads),), in the order of the layer's current heads."""
    return layer_head_mask[heads] if len(heads) < layer_head_mask.numel() else layer_head_mask
