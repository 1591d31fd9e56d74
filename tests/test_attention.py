"""The attention cores: eager and sdpa agree, never produce NaN, and the core is swappable."""

from __future__ import annotations

import pytest
import torch

from distilqa import DistilBertConfig, DistilBertForQuestionAnswering
from distilqa.attention import (
    ATTENTION_IMPLEMENTATIONS,
    PackedWindows,
    attend,
    fastest_cpu_attention,
    onednn_attention,
    resolve_attention,
    sdpa_attention,
)
from distilqa.model import eager_attention

MEASURE_FASTEST = fastest_cpu_attention
CORES = {"eager": eager_attention, "sdpa": sdpa_attention, "onednn": onednn_attention}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TINY = dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64)


def random_qkv(batch=3, heads=4, seq=9, head_dim=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=generator).to(dtype) for _ in range(3))
    return q, k, v


def key_mask_from_lengths(lengths, seq):
    """(batch, 1, 1, seq) bool, True at the first ``length`` keys of each row."""
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]  # (batch, seq)
    return mask[:, None, None, :]


def test_eager_and_sdpa_agree_with_padding_fp32():
    q, k, v = random_qkv(batch=3, seq=9)
    mask = key_mask_from_lengths([9, 5, 1], 9)
    eager, _ = eager_attention(q, k, v, mask)
    fused, _ = sdpa_attention(q, k, v, mask)
    assert eager.shape == fused.shape == (3, 4, 9, 16)
    assert (eager - fused).abs().max().item() <= 1e-5


def test_eager_and_sdpa_agree_without_mask():
    q, k, v = random_qkv(batch=2, seq=33, head_dim=64)
    eager, _ = eager_attention(q, k, v, None)
    fused, _ = sdpa_attention(q, k, v, None)
    assert (eager - fused).abs().max().item() <= 1e-5


def attention_by_definition(q, k, v, lengths):
    """softmax(q kᵀ / √d) v in float64, each row over its first ``length`` keys only (the keys are
    sliced, not masked): the textbook formula, computed independently of the cores."""
    weights = torch.zeros((*q.shape[:3], k.size(2)), dtype=torch.float64)  # (batch, heads, seq, seq)
    for row, length in enumerate(lengths):
        scores = q[row].double() @ k[row, :, :length].double().transpose(-1, -2) / q.size(-1) ** 0.5
        exp = (scores - scores.amax(-1, keepdim=True)).exp()  # (heads, seq, length)
        weights[row, :, :, :length] = exp / exp.sum(-1, keepdim=True)
    return weights @ v.double(), weights  # (batch, heads, seq, head_dim), (batch, heads, seq, seq)


@pytest.mark.parametrize("core_name", list(CORES))
def test_cores_compute_attention_by_its_definition(core_name):
    """Measured max abs difference from the float64 definition: 1.2e-7 (eager and sdpa)."""
    q, k, v = random_qkv(batch=3, seq=9)
    lengths = [9, 5, 1]
    expected, _ = attention_by_definition(q, k, v, lengths)
    context, _ = CORES[core_name](q, k, v, key_mask_from_lengths(lengths, 9))
    assert (context.double() - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("core_name", list(CORES))
def test_packed_windows_attend_only_inside_each_window(core_name):
    """Windows of 5, 9 and 1 tokens laid end to end: each window's context is attention over its own
    keys only (the definition, computed per window)."""
    q, k, v = random_qkv(batch=1, seq=15)
    windows = PackedWindows((5, 9, 1))
    context, _ = attend(CORES[core_name], q, k, v, windows)
    assert windows.offsets == (0, 5, 14, 15)
    for start, end in [(0, 5), (5, 14), (14, 15)]:
        piece = slice(start, end)
        expected, _ = attention_by_definition(q[:, :, piece], k[:, :, piece], v[:, :, piece], [end - start])
        assert (context[:, :, piece].double() - expected).abs().max().item() <= 1e-6
    assert windows.position_ids().tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0]]


def test_eager_weights_are_the_softmax_over_real_keys():
    q, k, v = random_qkv(batch=2, seq=6)
    lengths = [6, 3]
    _, weights = eager_attention(q, k, v, key_mask_from_lengths(lengths, 6), need_weights=True)
    _, expected = attention_by_definition(q, k, v, lengths)
    assert weights.shape == (2, 4, 6, 6)
    assert (weights.double() - expected).abs().max().item() <= 1e-6
    assert torch.equal(weights[1, :, :, 3:], torch.zeros(4, 6, 3)), "padding keys must get exactly 0 weight"
    assert eager_attention(q, k, v, key_mask_from_lengths(lengths, 6))[1] is None


def test_padding_keys_do_not_change_the_result():
    """A row padded to 9 gives the same context as the same row unpadded (5 keys)."""
    q, k, v = random_qkv(batch=1, seq=9)
    mask = key_mask_from_lengths([5], 9)
    for core in CORES.values():
        padded, _ = core(q, k, v, mask)
        short, _ = core(q[:, :, :5], k[:, :, :5], v[:, :, :5], None)
        assert (padded[:, :, :5] - short).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("core_name", list(CORES))
def test_all_padding_row_attends_uniformly_and_length_one(core_name, dtype):
    """The documented behaviour (README, attention.py) of a row whose keys are all padding, never NaN:
    the eager and onednn cores give it uniform weights over every key (its context is the mean of the
    values); the sdpa core (and onednn where it hands over to sdpa) lets it attend to every key as if
    unmasked."""
    core = CORES[core_name]
    q, k, v = random_qkv(batch=3, seq=7, dtype=dtype)
    mask = key_mask_from_lengths([7, 0, 2], 7)  # row 1: every key is padding
    context, _ = core(q, k, v, mask)
    assert context.dtype == dtype
    assert torch.isfinite(context).all()
    if core_name == "eager" or (core_name == "onednn" and dtype != torch.float16):  # fp16: onednn runs sdpa
        expected = v[1].float().mean(dim=-2, keepdim=True).expand(4, 7, 16)  # (heads, seq, head_dim)
    else:
        expected = attention_by_definition(q[1:2].float(), k[1:2].float(), v[1:2].float(), [7])[0][0].float()
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # half precision: inputs and sums rounded
    assert (context[1].float() - expected).abs().max().item() <= tolerance
    if core_name == "eager":
        _, weights = core(q, k, v, mask, need_weights=True)
        assert torch.equal(weights[1], torch.full((4, 7, 7), 1 / 7, dtype=dtype))
    # Length 1, with the only key real or padding.
    q1, k1, v1 = random_qkv(batch=2, seq=1, dtype=dtype)
    context, _ = core(q1, k1, v1, key_mask_from_lengths([1, 0], 1))
    assert context.shape == (2, 4, 1, 16)
    assert torch.isfinite(context).all()
    # With a single real key, attention returns that key's value.
    torch.testing.assert_close(context[0], v1[0])


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)], ids=str)
def test_eager_and_sdpa_agree_in_half_precision(dtype, tolerance):
    """Both cores in half precision against the fp32 result, on rows with at least one real key.
    Measured max abs diff: fp16 eager 2.2e-3, sdpa 1.3e-3; bf16 eager 1.1e-2, sdpa 9.5e-3 (the inputs
    themselves are rounded to half precision); tolerances leave a 4-5x margin."""
    q, k, v = random_qkv(batch=2, seq=9)
    mask = key_mask_from_lengths([9, 4], 9)
    exact, _ = eager_attention(q, k, v, mask)
    for core in CORES.values():
        half, _ = core(q.to(dtype), k.to(dtype), v.to(dtype), mask)
        assert (half.float() - exact).abs().max().item() <= tolerance


def test_sdpa_refuses_to_return_weights():
    q, k, v = random_qkv()
    with pytest.raises(ValueError, match="eager"):
        sdpa_attention(q, k, v, None, need_weights=True)


def test_resolve_attention_by_name_and_callable():
    assert resolve_attention("sdpa") is sdpa_attention
    assert resolve_attention("onednn") is onednn_attention
    assert set(ATTENTION_IMPLEMENTATIONS) >= {"sdpa", "onednn", "triton"}

    def custom(query, key, value, key_mask, dropout_p=0.0, need_weights=False):
        return eager_attention(query, key, value, key_mask, dropout_p, need_weights)

    assert resolve_attention(custom) is custom


@pytest.mark.parametrize("name", ["flash_attention_2", "Eager", "", "sdpa "])
def test_resolve_attention_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="unknown attention implementation") as error:
        resolve_attention(name)
    assert "'eager'" in str(error.value) and "'sdpa'" in str(error.value)


def test_unknown_name_rejected_by_the_model():
    with pytest.raises(ValueError, match="unknown attention implementation"):
        DistilBertForQuestionAnswering(DistilBertConfig(**TINY), attn_implementation="flex")


def tiny_inputs():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 1000, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    return input_ids, attention_mask


def test_custom_attention_function_is_called():
    """The core is swappable: a function passed to the constructor runs in every layer."""
    calls = []

    def counting_attention(query, key, value, key_mask, dropout_p=0.0, need_weights=False):
        calls.append((tuple(query.shape), None if key_mask is None else tuple(key_mask.shape)))
        return eager_attention(query, key, value, key_mask, dropout_p, need_weights)

    torch.manual_seed(0)
    model = DistilBertForQuestionAnswering(DistilBertConfig(**TINY), attn_implementation=counting_attention).eval()
    reference = DistilBertForQuestionAnswering(DistilBertConfig(**TINY), attn_implementation="eager").eval()
    reference.load_state_dict(model.state_dict())
    input_ids, attention_mask = tiny_inputs()
    with torch.no_grad():
        out = model(input_ids, attention_mask)
        expected = reference(input_ids, attention_mask)
    assert calls == [((2, 4, 12, 16), (2, 1, 1, 12))] * TINY["n_layers"]
    assert model.attn_implementation == "counting_attention"
    assert torch.equal(out.start_logits, expected.start_logits)
    assert torch.equal(out.end_logits, expected.end_logits)


def test_custom_attention_changes_the_output():
    """A core that ignores attention entirely (returns the values) really replaces the computation."""

    def value_passthrough(query, key, value, key_mask, dropout_p=0.0, need_weights=False):
        return value, None

    torch.manual_seed(0)
    model = DistilBertForQuestionAnswering(DistilBertConfig(**TINY), attn_implementation="eager").eval()
    input_ids, attention_mask = tiny_inputs()
    with torch.no_grad():
        before = model(input_ids, attention_mask).start_logits
        model.set_attn_implementation(value_passthrough)
        after = model(input_ids, attention_mask).start_logits
    assert (before - after).abs().max().item() > 1e-4


def test_set_attn_implementation_switches_every_layer():
    torch.manual_seed(0)
    model = DistilBertForQuestionAnswering(DistilBertConfig(**TINY), attn_implementation="eager").eval()
    assert model.attn_implementation == "eager"
    assert all(b.attention.attention_function is eager_attention for b in model.distilbert.transformer.layer)
    input_ids, attention_mask = tiny_inputs()
    with torch.no_grad():
        eager = model(input_ids, attention_mask)
        model.set_attn_implementation("sdpa")
        assert model.attn_implementation == "sdpa"
        assert all(b.attention.attention_function is sdpa_attention for b in model.distilbert.transformer.layer)
        fused = model(input_ids, attention_mask)
        # Attention maps are still available: they always come from the eager core.
        with_maps = model(input_ids, attention_mask, output_attentions=True)
    real = attention_mask.bool()
    assert (eager.start_logits - fused.start_logits)[real].abs().max().item() <= 1e-5
    assert (eager.end_logits - fused.end_logits)[real].abs().max().item() <= 1e-5
    assert len(with_maps.attentions) == TINY["n_layers"]
    assert with_maps.attentions[0].shape == (2, 4, 12, 12)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        model.set_attn_implementation("nope")
    assert model.attn_implementation == "sdpa", "a rejected name must leave the model unchanged"


def test_default_attention_is_sdpa():
    model = DistilBertForQuestionAnswering(DistilBertConfig(**TINY))
    assert model.attn_implementation == "sdpa"


def test_auto_runs_the_core_measured_faster_and_matches_eager(monkeypatch):
    from distilqa import attention

    q, k, v = random_qkv(batch=2, seq=11)
    mask = key_mask_from_lengths([11, 6], 11)
    calls, measure = [], MEASURE_FASTEST.__wrapped__  # the real measurement (conftest pins "auto" to sdpa)
    for name in ("sdpa", "onednn"):
        monkeypatch.setattr(attention, "fastest_cpu_attention", lambda *args, name=name: name)
        monkeypatch.setitem(
            attention.ATTENTION_IMPLEMENTATIONS, name, lambda *a, core=CORES[name], n=name: calls.append(n) or core(*a)
        )
        context, _ = attention.auto_attention(q, k, v, mask)
        assert (context - eager_attention(q, k, v, mask)[0]).abs().max() <= 1e-6
    assert calls == ["sdpa", "onednn"]
    assert measure(seq=32, repeat=1) in ("sdpa", "onednn", "eager")
    assert measure(torch.bfloat16, 2, 4, 32, 16, repeat=1) in ("sdpa", "onednn", "eager")
    assert measure(torch.float16, seq=32, repeat=1) == "sdpa"  # measured in fp32 and bf16 only


def test_auto_chooses_per_shape_rounded_up(monkeypatch):
    """The core is measured per dtype and shape: a window of 70 tokens asks about 128, a batch of 3 about 4,
    and batches beyond 8 reuse 8's measurement; each answer is the core that runs."""
    from distilqa import attention

    asked, ran = [], []
    monkeypatch.setattr(attention, "fastest_cpu_attention", lambda *args: asked.append(args) or "onednn")
    monkeypatch.setitem(
        attention.ATTENTION_IMPLEMENTATIONS, "onednn", lambda *a: ran.append(a[0].shape) or (a[0], None)
    )
    for batch, seq in [(3, 70), (1, 384), (20, 129)]:
        attention.auto_attention(*random_qkv(batch=batch, seq=seq, dtype=torch.bfloat16), None)
    assert asked == [(torch.bfloat16, 4, 4, 128, 16), (torch.bfloat16, 1, 4, 384, 16), (torch.bfloat16, 8, 4, 192, 16)]
    assert ran == [(3, 4, 70, 16), (1, 4, 384, 16), (20, 4, 129, 16)]


def test_auto_measures_every_candidate_eager_included(monkeypatch):
    """The written-out core is registered by name and measured with the others; a clock that each core
    advances by its own cost makes the choice deterministic: the cheapest wins if clearly cheaper."""
    from distilqa import attention, hardware

    assert attention.resolve_attention("eager") is eager_attention
    clock = [0.0]
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: clock[0])

    def costing(seconds):
        return lambda *args: clock.__setitem__(0, clock[0] + seconds)

    for costs, expected in [
        ({"sdpa": 3.0, "onednn": 2.0, "eager": 1.0}, "eager"),
        ({"sdpa": 3.0, "onednn": 2.0, "eager": 4.0}, "onednn"),
        ({"sdpa": 1.0, "onednn": 0.97, "eager": 2.0}, "sdpa"),  # not clearly faster: sdpa stays
    ]:
        for name, seconds in costs.items():
            monkeypatch.setitem(attention.ATTENTION_IMPLEMENTATIONS, name, costing(seconds))
        assert MEASURE_FASTEST.__wrapped__(torch.bfloat16, seq=16, repeat=3) == expected


def test_onednn_core_skips_padding_keys_and_matches_eager():
    """Right padding: each row attends over its real keys only (the GEMMs see n keys, not seq), with
    eager's result; a mask that is not right padding hands over to sdpa, with eager's result too."""
    q, k, v = random_qkv(batch=3, seq=13)
    for mask in (
        key_mask_from_lengths([13, 7, 1], 13),
        torch.rand(3, 1, 1, 13, generator=torch.Generator().manual_seed(1)) > 0.3,
    ):
        context, _ = onednn_attention(q, k, v, mask)
        assert (context - eager_attention(q, k, v, mask)[0]).abs().max() <= 1e-6
