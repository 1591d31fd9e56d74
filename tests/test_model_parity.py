"""Parity with the reference: transformers' DistilBertForQuestionAnswering.

minGPT-style: transformers builds a model with random weights at the published configuration and
saves it with safetensors (fixture ``published_checkpoint``); distilqa loads that file and both run
the same inputs. With eager attention on both sides the two implementations execute the same
floating-point operations in the same order, so every result must be bit-for-bit equal
(``torch.equal``); a tolerance there would hide a real difference. With sdpa the fused kernel may
reorder sums, so those comparisons use 1e-5 (measured on this CPU: 0 against the reference's sdpa for
every shape below, 2.1e-6 against its eager core).
"""

from __future__ import annotations

import math
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_reference_checkpoint

import distilqa
from distilqa import DistilBertConfig, DistilBertForQuestionAnswering
from distilqa.testing import random_inputs, sample_inputs

SDPA_TOLERANCE = 1e-5
MODEL_PY = Path(distilqa.__file__).with_name("model.py")


def load_reference(directory, attn_implementation, dtype=torch.float32):
    """transformers' model from ``directory``; skips the calling test when transformers is missing."""
    transformers = pytest.importorskip("transformers")
    return transformers.DistilBertForQuestionAnswering.from_pretrained(
        directory, attn_implementation=attn_implementation, dtype=dtype
    ).eval()


@pytest.fixture(scope="module")
def reference_eager(published_checkpoint):
    return load_reference(published_checkpoint, "eager")


@pytest.fixture(scope="module")
def reference_sdpa(published_checkpoint):
    return load_reference(published_checkpoint, "sdpa")


@pytest.fixture(scope="module")
def ours_eager(published_checkpoint):
    return DistilBertForQuestionAnswering.from_pretrained(published_checkpoint, attn_implementation="eager")


@pytest.fixture(scope="module")
def ours_sdpa(published_checkpoint):
    return DistilBertForQuestionAnswering.from_pretrained(published_checkpoint, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def padded_batch():
    """Rows of 7, 64 and 200 real tokens, right-padded to 200: every row has different padding."""
    input_ids, attention_mask = sample_inputs(28996)
    assert attention_mask.sum(1).tolist() == [7, 64, 200]
    return input_ids, attention_mask


def run_both(ours, reference, input_ids, attention_mask, output_attentions=False, **kwargs):
    with torch.no_grad():
        mine = ours(input_ids, attention_mask, output_hidden_states=True, output_attentions=output_attentions, **kwargs)
        theirs = reference(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            output_attentions=output_attentions,
            **kwargs,
        )
    return mine, theirs


def assert_exactly_equal(mine, theirs, n_layers, with_attentions):
    assert torch.equal(mine.start_logits, theirs.start_logits)
    assert torch.equal(mine.end_logits, theirs.end_logits)
    assert len(mine.hidden_states) == len(theirs.hidden_states) == n_layers + 1
    for index, (a, b) in enumerate(zip(mine.hidden_states, theirs.hidden_states)):
        assert torch.equal(a, b), f"hidden state {index} differs by {(a - b).abs().max().item():.3e}"
    if with_attentions:
        assert len(mine.attentions) == len(theirs.attentions) == n_layers
        for index, (a, b) in enumerate(zip(mine.attentions, theirs.attentions)):
            assert torch.equal(a, b), f"attention map {index} differs by {(a - b).abs().max().item():.3e}"


def max_diff_at_real_positions(mine, theirs, attention_mask) -> float:
    """Largest |difference| over logits and hidden states at non-padding positions: a padding
    position's values are never read, and fused kernels may legitimately compute them differently."""
    real = attention_mask.bool()
    pairs = [(mine.start_logits, theirs.start_logits), (mine.end_logits, theirs.end_logits)]
    pairs += list(zip(mine.hidden_states, theirs.hidden_states))
    return max((a[real] - b[real]).abs().max().item() for a, b in pairs)


def batch_of_length(length: int, seed: int = 0):
    """Two rows of ``length`` positions, the second padded to half its length (one row if length 1)."""
    lengths = [length] if length == 1 else [length, (length + 1) // 2]
    return random_inputs(28996, lengths, seed=seed)


# -- the published configuration ----------------------------------------------------------------


def test_eager_is_bit_identical_on_padded_batch(ours_eager, reference_eager, padded_batch):
    """Logits, all 7 hidden states and all 6 attention maps are torch.equal, padding positions included."""
    mine, theirs = run_both(ours_eager, reference_eager, *padded_batch, output_attentions=True)
    assert mine.start_logits.shape == (3, 200)
    assert mine.attentions[0].shape == (3, 12, 200, 200)
    assert_exactly_equal(mine, theirs, n_layers=6, with_attentions=True)


def test_sdpa_matches_on_padded_batch(ours_sdpa, reference_sdpa, padded_batch):
    mine, theirs = run_both(ours_sdpa, reference_sdpa, *padded_batch)
    assert len(mine.hidden_states) == 7
    assert max_diff_at_real_positions(mine, theirs, padded_batch[1]) <= SDPA_TOLERANCE  # measured: 0.0


def test_ours_sdpa_matches_reference_eager(ours_sdpa, reference_eager, padded_batch):
    """Across cores: our fused path against the reference's written-out one."""
    mine, theirs = run_both(ours_sdpa, reference_eager, *padded_batch)
    assert max_diff_at_real_positions(mine, theirs, padded_batch[1]) <= SDPA_TOLERANCE  # measured: 2.1e-6


@pytest.mark.parametrize("length", [1, 2, 17, 128, 384, 512])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_sequence_lengths(length, attn_implementation, request):
    """Measured max abs diff for sdpa at lengths 1, 2, 17, 128, 384 and 512: 0.0 each."""
    ours = request.getfixturevalue(f"ours_{attn_implementation}")
    reference = request.getfixturevalue(f"reference_{attn_implementation}")
    input_ids, attention_mask = batch_of_length(length)
    mine, theirs = run_both(ours, reference, input_ids, attention_mask)
    assert mine.start_logits.shape == input_ids.shape
    if attn_implementation == "eager":
        assert_exactly_equal(mine, theirs, n_layers=6, with_attentions=False)
    else:
        assert max_diff_at_real_positions(mine, theirs, attention_mask) <= SDPA_TOLERANCE


def test_no_attention_mask_means_all_tokens(ours_eager, reference_eager):
    """No mask on one side, a mask of ones on the other (each way round): the same logits."""
    input_ids = batch_of_length(9)[0][:1]  # one row, no padding
    ones = torch.ones_like(input_ids)
    with torch.no_grad():
        mine, mine_masked = ours_eager(input_ids), ours_eager(input_ids, ones)
        theirs, theirs_masked = (
            reference_eager(input_ids=input_ids),
            reference_eager(input_ids=input_ids, attention_mask=ones),
        )
    for ours, reference in ((mine, theirs_masked), (mine_masked, theirs)):
        assert torch.equal(ours.start_logits, reference.start_logits)
        assert torch.equal(ours.end_logits, reference.end_logits)
    assert mine.hidden_states is None and mine.attentions is None and mine.loss is None


def test_too_long_input_is_a_clear_error(ours_sdpa):
    input_ids = torch.full((1, 513), 1000)
    with pytest.raises(ValueError, match=r"513 tokens.*512 positions"):
        ours_sdpa(input_ids, torch.ones_like(input_ids))


def test_bad_input_shapes_are_clear_errors(ours_sdpa):
    with pytest.raises(ValueError, match="input_ids"):
        ours_sdpa(torch.full((5,), 1000))
    with pytest.raises(ValueError, match="input_ids"):
        ours_sdpa(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="attention_mask shape"):
        ours_sdpa(torch.full((1, 5), 1000), torch.ones(1, 4, dtype=torch.long))


# -- small configurations ------------------------------------------------------------------------

SMALL = dict(vocab_size=1000, dim=64, hidden_dim=128, n_layers=2, max_position_embeddings=128)


@pytest.mark.parametrize(
    ("activation", "n_heads", "sinusoidal"),
    [("relu", 1, False), ("gelu", 4, False), ("relu", 8, True), ("gelu", 8, True)],
)
def test_small_configurations(tmp_path, activation, n_heads, sinusoidal):
    directory = save_reference_checkpoint(
        tmp_path, seed=n_heads, activation=activation, n_heads=n_heads, sinusoidal_pos_embds=sinusoidal, **SMALL
    )
    input_ids, attention_mask = sample_inputs(SMALL["vocab_size"], seed=n_heads, max_length=40)
    for attn_implementation in ("eager", "sdpa"):
        ours = DistilBertForQuestionAnswering.from_pretrained(directory, attn_implementation=attn_implementation)
        assert (ours.config.activation, ours.config.n_heads) == (activation, n_heads)
        assert ours.config.sinusoidal_pos_embds is sinusoidal
        reference = load_reference(directory, attn_implementation)
        eager = attn_implementation == "eager"
        mine, theirs = run_both(ours, reference, input_ids, attention_mask, output_attentions=eager)
        if eager:
            assert_exactly_equal(mine, theirs, n_layers=2, with_attentions=True)
            assert mine.attentions[0].shape == (3, n_heads, 40, 40)
        else:
            assert max_diff_at_real_positions(mine, theirs, attention_mask) <= SDPA_TOLERANCE


# -- half precision ------------------------------------------------------------------------------

# Ours in half precision against transformers in the same dtype: the same operations in the same
# order (sdpa: the same fused call on the same inputs), so both cores are exact (measured: 0 for fp16
# and bf16, eager and sdpa), and the test asserts torch.equal.
# Ours in half precision against the fp32 reference: the precision lost by the dtype. Measured on
# the random published-size checkpoint, biases and LayerNorms perturbed (batch 2, seq 16, logits of
# magnitude ~1.4):
#   fp16: logits 2.0e-3 / 1.5e-3 (eager / sdpa), hidden states 8.9e-3 / 7.7e-3
#   bf16: logits 1.8e-2 / 1.6e-2 (eager / sdpa), hidden states 5.8e-2 / 6.3e-2
# Tolerances leave a 2.5-3.4x margin; relative to the logit scale they are ~4e-3 (fp16) and ~4e-2 (bf16).
VS_FP32_LOGIT_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 5e-2}
VS_FP32_HIDDEN_TOLERANCE = {torch.float16: 2.5e-2, torch.bfloat16: 2e-1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(published_checkpoint, reference_eager, dtype):
    """bf16 matmul is slow on CPU, so this uses a short batch: 2 rows of 16, one padded."""
    input_ids, attention_mask = batch_of_length(16, seed=3)
    real = attention_mask.bool()
    with torch.no_grad():
        fp32 = reference_eager(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    logit_scale = max(fp32.start_logits[real].abs().max().item(), fp32.end_logits[real].abs().max().item())
    assert logit_scale > 0.1, "the comparison is meaningless if the logits are ~0"
    for attn_implementation in ("eager", "sdpa"):
        ours = DistilBertForQuestionAnswering.from_pretrained(
            published_checkpoint, dtype=dtype, attn_implementation=attn_implementation
        )
        reference = load_reference(published_checkpoint, attn_implementation, dtype=dtype)
        mine, theirs = run_both(ours, reference, input_ids, attention_mask)
        assert mine.start_logits.dtype == dtype
        assert torch.isfinite(mine.start_logits).all() and torch.isfinite(mine.end_logits).all()
        assert_exactly_equal(mine, theirs, n_layers=6, with_attentions=False)
        for name in ("start_logits", "end_logits"):
            diff = (getattr(mine, name).float() - getattr(fp32, name))[real].abs().max().item()
            assert diff <= VS_FP32_LOGIT_TOLERANCE[dtype], f"{name}: {diff:.2e}"
        hidden = max((a.float() - b)[real].abs().max().item() for a, b in zip(mine.hidden_states, fp32.hidden_states))
        assert hidden <= VS_FP32_HIDDEN_TOLERANCE[dtype]


# -- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loss_batch():
    input_ids, attention_mask = batch_of_length(24, seed=5)
    input_ids = torch.cat([input_ids, input_ids[:1]])
    attention_mask = torch.cat([attention_mask, attention_mask[:1]])
    return input_ids, attention_mask  # (3, 24)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ([3, 0, 10], [5, 2, 11]),
        ([3, 24, 7], [5, 9, 300]),  # positions >= seq are out of range: clamped to seq and ignored
        ([[1], [2], [3]], [[4], [5], [6]]),  # (batch, 1) is accepted like (batch,)
    ],
)
def test_loss_equals_reference(ours_eager, reference_eager, loss_batch, start, end):
    start_positions, end_positions = torch.tensor(start), torch.tensor(end)
    mine, theirs = run_both(
        ours_eager, reference_eager, *loss_batch, start_positions=start_positions, end_positions=end_positions
    )
    assert mine.loss.shape == ()
    assert torch.isfinite(mine.loss)
    assert torch.equal(mine.loss, theirs.loss)


def test_out_of_range_positions_are_ignored(ours_eager, loss_batch):
    """Row 1's start is out of range: its start term is dropped from the start mean."""
    input_ids, attention_mask = loss_batch
    with torch.no_grad():
        out = ours_eager(input_ids, attention_mask, torch.tensor([3, 1000, 7]), torch.tensor([5, 9, 8]))
    log_start = out.start_logits.log_softmax(-1)
    log_end = out.end_logits.log_softmax(-1)
    start_loss = -(log_start[0, 3] + log_start[2, 7]) / 2
    end_loss = -(log_end[0, 5] + log_end[1, 9] + log_end[2, 8]) / 3
    torch.testing.assert_close(out.loss, (start_loss + end_loss) / 2)


def test_gradients_flow_and_match_reference(ours_eager, reference_eager, loss_batch):
    input_ids, attention_mask = loss_batch
    start_positions, end_positions = torch.tensor([3, 0, 10]), torch.tensor([5, 2, 11])
    try:
        mine = ours_eager(input_ids, attention_mask, start_positions, end_positions)
        theirs = reference_eager(
            input_ids=input_ids,
            attention_mask=attention_mask,
            start_positions=start_positions,
            end_positions=end_positions,
        )
        mine.loss.backward()
        theirs.loss.backward()
        our_grad = ours_eager.distilbert.transformer.layer[0].attention.q_lin.weight.grad
        their_grad = reference_eager.distilbert.transformer.layer[0].attention.q_lin.weight.grad
        assert our_grad is not None, "loaded weights must require grad (fine-tuning)"
        assert torch.isfinite(our_grad).all()
        assert our_grad.abs().max().item() > 0
        # Measured: max abs diff 0 (the backward passes run the same kernels too).
        torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-8)
        assert all(p.grad is not None for p in ours_eager.parameters() if p.requires_grad)
    finally:
        ours_eager.zero_grad(set_to_none=True)
        reference_eager.zero_grad(set_to_none=True)


TINY = dict(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32)


def test_a_few_sgd_steps_lower_the_loss():
    torch.manual_seed(0)
    model = DistilBertForQuestionAnswering(
        DistilBertConfig(**TINY, dropout=0.0, attention_dropout=0.0, qa_dropout=0.0)
    ).train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 100, (8, 16), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[4:, 12:] = 0
    start_positions = torch.randint(0, 12, (8,), generator=generator)
    end_positions = (start_positions + 2).clamp(max=11)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(input_ids, attention_mask, start_positions, end_positions).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_dropout_is_stochastic_in_train_and_off_in_eval():
    torch.manual_seed(0)
    model = DistilBertForQuestionAnswering(DistilBertConfig(**TINY, dropout=0.1, attention_dropout=0.1))
    input_ids = torch.randint(1, 100, (2, 16))
    model.train()
    first, second = model(input_ids).start_logits, model(input_ids).start_logits
    assert not torch.equal(first, second)
    model.eval()
    with torch.no_grad():
        first, second = model(input_ids).start_logits, model(input_ids).start_logits
    assert torch.equal(first, second)


# -- initialisation ------------------------------------------------------------------------------


def reference_sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    pytest.importorskip("transformers")
    from transformers.models.distilbert.modeling_distilbert import _create_sinusoidal_embeddings

    return _create_sinusoidal_embeddings(n_positions, dim, torch.empty(n_positions, dim))


@pytest.fixture(scope="module")
def fresh_published_model():
    torch.manual_seed(0)
    return DistilBertForQuestionAnswering(DistilBertConfig(sinusoidal_pos_embds=True))


def test_fresh_position_table_is_sinusoidal(fresh_published_model):
    """Spot values from the formula of "Attention is all you need", in Python floats:
    PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(pos / 10000^(2i/dim))."""
    table = fresh_published_model.distilbert.embeddings.position_embeddings.weight.detach()
    for pos, column in [(0, 0), (0, 1), (1, 0), (1, 1), (7, 10), (100, 301), (511, 766), (511, 767)]:
        angle = pos / 10000 ** (2 * (column // 2) / 768)
        expected = math.sin(angle) if column % 2 == 0 else math.cos(angle)
        assert abs(table[pos, column].item() - expected) <= 1e-6, (pos, column)


def test_fresh_position_table_matches_transformers(fresh_published_model):
    table = fresh_published_model.distilbert.embeddings.position_embeddings.weight.detach()
    torch.testing.assert_close(table, reference_sinusoidal_table(512, 768), rtol=0, atol=1e-6)


def test_learned_position_table_when_not_sinusoidal():
    torch.manual_seed(0)
    model = DistilBertForQuestionAnswering(DistilBertConfig(**TINY, sinusoidal_pos_embds=False))
    table = model.distilbert.embeddings.position_embeddings.weight.detach()
    sinusoidal = reference_sinusoidal_table(TINY["max_position_embeddings"], TINY["dim"])
    assert (table - sinusoidal).abs().max().item() > 0.5
    assert 0.01 < table.std().item() < 0.03  # normal(0, initializer_range=0.02)


def test_fresh_model_initialisation():
    torch.manual_seed(0)
    model = DistilBertForQuestionAnswering(DistilBertConfig(**TINY))
    assert torch.equal(model.distilbert.embeddings.word_embeddings.weight[0], torch.zeros(TINY["dim"]))
    assert torch.equal(model.qa_outputs.bias, torch.zeros(2))
    assert model.training  # a fresh model starts in train mode, like any nn.Module


# -- the package ---------------------------------------------------------------------------------


def test_distilqa_never_imports_transformers():
    """Every distilqa module (found by walking the package, so new ones are covered) imports
    without pulling in transformers: it is a test-only dependency."""
    modules = sorted(info.name for info in pkgutil.walk_packages(distilqa.__path__, prefix="distilqa.") if info.name)
    assert "distilqa.model" in modules and "distilqa.parity" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {['distilqa', *modules]!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'transformers' or m.startswith('transformers.'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_model_py_is_readable():
    """The model is meant to be read in one sitting. It was ~300 lines; packing, head_mask and
    prune_heads brought it to 411 (2026-11-30). The limit stops unnoticed growth, not the next switch."""
    lines = MODEL_PY.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 430, f"model.py has {len(lines)} lines"
