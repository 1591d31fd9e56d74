"""distilqa.pruning: head pruning changes the pruned model only, never the config it was built from."""

from __future__ import annotations

import pytest
import torch

from distilqa import DistilBertConfig, DistilBertForQuestionAnswering
from distilqa.pruning import expand_head_mask, heads_present

CONFIG = dict(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)


def test_pruning_one_model_leaves_the_callers_config_and_later_models_alone():
    config = DistilBertConfig(**CONFIG)
    first = DistilBertForQuestionAnswering(config)
    first.prune_heads({0: [1, 2]})
    assert first.config.pruned_heads == {0: [1, 2]}
    assert config.pruned_heads == {}  # the caller's object is untouched
    second = DistilBertForQuestionAnswering(config)
    assert [block.attention.n_heads for block in second.distilbert.transformer.layer] == [4, 4]
    assert second.config.pruned_heads == {}


def test_a_config_that_records_pruning_builds_the_pruned_shapes():
    model = DistilBertForQuestionAnswering(DistilBertConfig(**CONFIG, pruned_heads={"1": [0, 3]}))
    assert [block.attention.heads for block in model.distilbert.transformer.layer] == [[0, 1, 2, 3], [1, 2]]
    assert model.distilbert.transformer.layer[1].attention.q_lin.weight.shape == (16, 32)


def test_head_masks_are_expanded_per_layer_and_follow_pruning():
    assert expand_head_mask(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, 4).shape == (2, 4)
    with pytest.raises(ValueError, match=r"shape \(4,\) or \(2, 4\)"):
        expand_head_mask(torch.ones(3), 2, 4)
    mask = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert heads_present(mask, [1, 3]).tolist() == pytest.approx([0.2, 0.4])  # numbered as before pruning
    assert heads_present(mask, [0, 1, 2, 3]) is mask
