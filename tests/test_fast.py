"""distilqa.fast: the opt-in inference module computes the model's function and leaves the model alone.

Its fp32 logits must agree with the readable model's (sdpa and eager) to 1e-5 at every real
(non-padding) position; the model's state dict, keys and outputs must be exactly what they were.
"""

from __future__ import annotations

import threading

import pytest
import torch

from distilqa import DistilBertConfig, DistilBertForQuestionAnswering
from distilqa.fast import FastDistilBertForQuestionAnswering, optimize_for_inference
from distilqa.parity import sample_inputs

TOLERANCE = 1e-5
TINY = dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64)


@pytest.fixture(scope="module")
def ours_sdpa(published_checkpoint):
    return DistilBertForQuestionAnswering.from_pretrained(published_checkpoint, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def ours_eager(published_checkpoint):
    return DistilBertForQuestionAnswering.from_pretrained(published_checkpoint, attn_implementation="eager")


@pytest.fixture(scope="module")
def fast(ours_sdpa):
    return optimize_for_inference(ours_sdpa)


def logits(model, input_ids, attention_mask=None):
    with torch.inference_mode():
        output = model(input_ids, attention_mask)
    return output.start_logits, output.end_logits


def max_diff(a, b, attention_mask=None):
    """Largest |difference| of start and end logits, over real positions only when a mask is given."""
    real = torch.ones_like(a[0], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    return max((x[real] - y[real]).abs().max().item() for x, y in zip(a, b))


def random_batch(batch, seq, vocab_size=28996, seed=0, pad_last_row=True):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000 if vocab_size > 1000 else 1, vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if pad_last_row and batch > 1:
        attention_mask[-1, seq // 2 :] = 0
    return input_ids * attention_mask, attention_mask


# -- same function as the model -------------------------------------------------------------------


def test_matches_sdpa_and_eager_on_the_padded_batch(fast, ours_sdpa, ours_eager):
    input_ids, attention_mask = sample_inputs(28996)  # rows of 7, 64 and 200 real tokens
    got = logits(fast, input_ids, attention_mask)
    assert got[0].shape == got[1].shape == (3, 200)
    assert max_diff(got, logits(ours_sdpa, input_ids, attention_mask), attention_mask) <= TOLERANCE
    assert max_diff(got, logits(ours_eager, input_ids, attention_mask), attention_mask) <= TOLERANCE


@pytest.mark.parametrize("batch, seq", [(1, 1), (1, 128), (2, 384), (3, 77), (1, 512)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_the_model_at_many_shapes(fast, ours_sdpa, ours_eager, batch, seq, masked):
    input_ids, attention_mask = random_batch(batch, seq, seed=batch * 1000 + seq)
    mask = attention_mask if masked else None
    got = logits(fast, input_ids, mask)
    assert max_diff(got, logits(ours_sdpa, input_ids, mask), mask) <= TOLERANCE
    assert max_diff(got, logits(ours_eager, input_ids, mask), mask) <= TOLERANCE


def test_all_ones_mask_is_the_same_as_no_mask(fast):
    input_ids, _ = random_batch(2, 96, pad_last_row=False)
    with_ones = logits(fast, input_ids, torch.ones_like(input_ids))
    without = logits(fast, input_ids, None)
    assert all(torch.equal(a, b) for a, b in zip(with_ones, without))


def test_all_padding_row_is_finite_and_matches_sdpa(fast, ours_sdpa):
    input_ids, attention_mask = random_batch(2, 16)
    attention_mask[0] = 0  # a row with no real token at all
    got = logits(fast, input_ids, attention_mask)
    assert all(torch.isfinite(t).all() for t in got)
    assert max_diff(got, logits(ours_sdpa, input_ids, attention_mask)) <= TOLERANCE


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("n_heads", [1, 4])
def test_small_configurations(activation, n_heads):
    torch.manual_seed(0)
    model = DistilBertForQuestionAnswering(DistilBertConfig(**{**TINY, "activation": activation, "n_heads": n_heads}))
    model.eval()
    input_ids, attention_mask = random_batch(3, 40, vocab_size=1000)
    got = logits(optimize_for_inference(model), input_ids, attention_mask)
    assert max_diff(got, logits(model, input_ids, attention_mask), attention_mask) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype):
    torch.manual_seed(0)
    model = DistilBertForQuestionAnswering(DistilBertConfig(**TINY)).eval()
    half = DistilBertForQuestionAnswering(DistilBertConfig(**TINY)).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(dtype)
    input_ids, attention_mask = random_batch(2, 32, vocab_size=1000)
    got = logits(optimize_for_inference(half), input_ids, attention_mask)
    assert got[0].dtype == dtype
    assert max_diff(got, logits(half, input_ids, attention_mask), attention_mask) <= 5e-2


# -- scratch buffers: reuse never leaks between calls or shapes --------------------------------


def test_results_do_not_alias_reused_buffers(fast):
    first_ids, first_mask = random_batch(2, 64, seed=1)
    first = logits(fast, first_ids, first_mask)
    kept = tuple(t.clone() for t in first)
    for batch, seq in [(2, 64), (1, 200), (4, 32)]:
        logits(fast, *random_batch(batch, seq, seed=seq))
    assert all(torch.equal(a, b) for a, b in zip(first, kept)), "an earlier result changed after later calls"
    again = logits(fast, first_ids, first_mask)
    assert all(torch.equal(a, b) for a, b in zip(again, kept)), "the same input gave a different result later"


def test_concurrent_calls_are_serialised_and_correct(fast):
    inputs = [random_batch(2, 48, seed=seed) for seed in range(4)]
    expected = [logits(fast, *batch) for batch in inputs]
    results: list = [None] * len(inputs)

    def work(index):
        results[index] = logits(fast, *inputs[index])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


# -- the model is left alone ------------------------------------------------------------------


def test_the_model_and_its_state_dict_are_unchanged(published_checkpoint):
    model = DistilBertForQuestionAnswering.from_pretrained(published_checkpoint, attn_implementation="eager")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    input_ids, attention_mask = sample_inputs(28996)
    output_before = logits(model, input_ids, attention_mask)
    fast = optimize_for_inference(model)
    logits(fast, input_ids, attention_mask)
    after = model.state_dict()
    assert list(after) == list(before), "the model's state_dict keys changed"
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert not any("qkv" in name for name in after)
    output_after = logits(model, input_ids, attention_mask)
    assert all(torch.equal(a, b) for a, b in zip(output_before, output_after))
    assert model.attn_implementation == "eager"


def test_the_fast_module_holds_no_checkpoint_state(fast):
    assert fast.state_dict() == {}
    assert list(fast.parameters()) == []
    assert isinstance(fast, FastDistilBertForQuestionAnswering)
    assert not fast.training


def test_training_mode_is_refused(fast):
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()


def test_input_errors_are_the_models(fast):
    with pytest.raises(ValueError, match="longer than"):
        fast(torch.ones(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        fast(torch.ones(2, 8, dtype=torch.long), torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        fast(torch.ones(2, 8))


def test_rejects_other_inputs(ours_sdpa):
    with pytest.raises(TypeError):
        optimize_for_inference(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="quantize"):
        optimize_for_inference(ours_sdpa, quantize="int4")


# -- int8 (approximate, opt-in) -------------------------------------------------------------------


def test_int8_is_close_but_approximate(fast, ours_sdpa):
    quantized = optimize_for_inference(ours_sdpa, quantize="int8")
    input_ids, attention_mask = sample_inputs(28996)
    got = logits(quantized, input_ids, attention_mask)
    want = logits(ours_sdpa, input_ids, attention_mask)
    deviation = max_diff(got, want, attention_mask)
    scale = max(t[attention_mask.bool()].abs().max().item() for t in want)
    assert 0 < deviation < 0.1 * scale, f"int8 deviation {deviation:.4f} for logits up to {scale:.3f}"
    real = attention_mask.bool()
    correlation = torch.corrcoef(torch.stack([got[0][real], want[0][real]]))[0, 1].item()
    assert correlation > 0.99
    assert quantized.state_dict() == {}


# -- packed sequences (no padding) ----------------------------------------------------------------


def test_forward_packed_matches_each_sequence_alone(fast, ours_sdpa):
    lengths = [7, 64, 1, 200]
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(1000, 28996, (n,), generator=generator) for n in lengths]
    start, end = fast.forward_packed(torch.cat(sequences), lengths)
    assert start.shape == end.shape == (sum(lengths),)
    for sequence, got_start, got_end in zip(sequences, start.split(lengths), end.split(lengths)):
        want = logits(ours_sdpa, sequence[None, :])
        assert max_diff((got_start[None, :], got_end[None, :]), want) <= TOLERANCE


def test_forward_packed_equals_the_padded_batch_at_real_positions(fast):
    input_ids, attention_mask = sample_inputs(28996)  # rows of 7, 64 and 200 real tokens
    lengths = attention_mask.sum(1).tolist()
    padded = logits(fast, input_ids, attention_mask)
    packed = fast.forward_packed(input_ids[attention_mask.bool()], lengths)
    real = attention_mask.bool()
    assert max((p - q[real]).abs().max().item() for p, q in zip(packed, padded)) <= TOLERANCE


def test_forward_packed_input_errors(fast):
    with pytest.raises(ValueError, match="sum"):
        fast.forward_packed(torch.ones(10, dtype=torch.long), [4, 5])
    with pytest.raises(ValueError, match="1-D"):
        fast.forward_packed(torch.ones(2, 5, dtype=torch.long), [5, 5])
    with pytest.raises(ValueError, match="exceeds"):
        fast.forward_packed(torch.ones(513, dtype=torch.long), [513])
