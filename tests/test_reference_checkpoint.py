"""distilqa.testing: the reference checkpoints the parity tests stand on, and the random inputs.

transformers initialises every bias to 0 and every LayerNorm to (1, 0): a model that dropped or
misplaced one would still match it. The reference checkpoints perturb all of them, so each path of
the one model (every attention core, every GEMM backend) is checked with biases that matter.
"""

from __future__ import annotations

import pytest
import torch
from conftest import save_reference_checkpoint
from safetensors.torch import load_file

from distilqa import DistilBertForQuestionAnswering
from distilqa.linear import LINEAR_BACKENDS, onednn_available
from distilqa.testing import BIAS_STD, LAYER_NORM_STD, random_inputs, sample_inputs

SMALL = dict(vocab_size=1200, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64)
# Ours against transformers on a perturbed small checkpoint, float32: measured 0 (aten, eager and sdpa)
# and 1.2e-7 / 1.0e-7 (oneDNN, eager / sdpa: another GEMM library rounds in another order). Dropping
# the bias of oneDNN's linear layers moves the results by 0.13 (measured).
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    return save_reference_checkpoint(tmp_path_factory.mktemp("small-reference"), seed=4, **SMALL)


def layer_norm_and_bias_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in state.items() if name.endswith(".bias") or "orm.weight" in name}


def test_every_bias_and_layer_norm_is_perturbed_deterministically(small_checkpoint, tmp_path):
    state = load_file(small_checkpoint / "model.safetensors")
    biases = [value for name, value in state.items() if name.endswith(".bias")]
    norm_weights = [value for name, value in state.items() if "layer_norm.weight" in name or "LayerNorm.weight" in name]
    # 6 linear layers and 2 LayerNorms per block, the embeddings' LayerNorm, the span head.
    assert len(biases) == 8 * SMALL["n_layers"] + 1 + 1
    assert len(norm_weights) == 2 * SMALL["n_layers"] + 1
    for value in biases:
        assert value.numel() == 2 or 0.5 * BIAS_STD < value.std() < 2 * BIAS_STD
        assert value.abs().min() > 0
    for value in norm_weights:
        assert 0.5 * LAYER_NORM_STD < (value - 1).std() < 2 * LAYER_NORM_STD
    again = load_file(save_reference_checkpoint(tmp_path / "again", seed=4, **SMALL) / "model.safetensors")
    other = load_file(save_reference_checkpoint(tmp_path / "other", seed=5, **SMALL) / "model.safetensors")
    for name, value in layer_norm_and_bias_tensors(state).items():
        assert torch.equal(value, again[name]), name
        assert not torch.equal(value, other[name]), name


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_every_gemm_backend_matches_transformers_with_biases_that_matter(
    small_checkpoint, backend, attn_implementation
):
    if backend == "onednn" and not onednn_available():
        pytest.skip("this PyTorch has no oneDNN")
    transformers = pytest.importorskip("transformers")
    reference = transformers.DistilBertForQuestionAnswering.from_pretrained(
        small_checkpoint, attn_implementation=attn_implementation
    ).eval()
    ours = DistilBertForQuestionAnswering.from_pretrained(
        small_checkpoint, attn_implementation=attn_implementation, linear_backend=backend
    )
    input_ids, attention_mask = sample_inputs(SMALL["vocab_size"], seed=1, max_length=48)
    real = attention_mask.bool()
    with torch.inference_mode():
        mine = ours(input_ids, attention_mask, output_hidden_states=True)
        theirs = reference(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    pairs = [(mine.start_logits, theirs.start_logits), (mine.end_logits, theirs.end_logits)]
    pairs += list(zip(mine.hidden_states, theirs.hidden_states, strict=True))
    differences = [(a[real] - b[real]).abs().max().item() for a, b in pairs]
    assert max(differences) <= TOLERANCE, differences


def test_random_inputs_pad_each_row_to_its_length():
    input_ids, attention_mask = random_inputs(5000, [5, 1, 9], max_length=12, seed=3)
    assert input_ids.shape == attention_mask.shape == (3, 12)
    assert attention_mask.sum(1).tolist() == [5, 1, 9]
    assert (input_ids[:, 0] == 101).all() and (input_ids[~attention_mask.bool()] == 0).all()
    assert torch.equal(input_ids, random_inputs(5000, [5, 1, 9], max_length=12, seed=3)[0])
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(input_ids, random_inputs(5000, [5, 1, 9], max_length=12, generator=generator)[0])
    assert random_inputs(50, [4])[0].shape == (1, 4)  # max_length defaults to the longest row
    with pytest.raises(ValueError, match=r"row lengths in 1\.\.max_length"):
        random_inputs(5000, [13], max_length=12)
