"""distilqa.linear: the GEMM library behind the model's nn.Linear layers is a switch on those same
modules: same parameters, same state dict, the same logits within float32 rounding, and training
still runs PyTorch's autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distilqa import DistilBertConfig, DistilBertForQuestionAnswering
from distilqa import linear as linear_module
from distilqa.linear import OneDNNLinear, linear_backend, quantize_int8, set_linear_backend

needs_onednn = pytest.mark.skipif(not linear_module.onednn_available(), reason="this PyTorch has no oneDNN")
CONFIG = DistilBertConfig(vocab_size=500, dim=64, n_layers=2, n_heads=4, hidden_dim=128)


@pytest.fixture
def model() -> DistilBertForQuestionAnswering:
    torch.manual_seed(0)
    return DistilBertForQuestionAnswering(CONFIG).eval()


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).start_logits


@needs_onednn
def test_switching_backends_keeps_modules_and_logits(model):
    ids = torch.randint(1, 500, (3, 40))
    expected = logits(model, ids)
    modules = list(model.modules())
    assert set_linear_backend(model, "onednn") == "onednn" and linear_backend(model) == "onednn"
    assert all(type(m) is OneDNNLinear for m in model.modules() if isinstance(m, nn.Linear))
    assert list(model.modules()) == modules  # the same objects, only their class changed
    # Measured: 2e-7 at this size; a different GEMM library rounds in a different order.
    assert (logits(model, ids) - expected).abs().max() <= 1e-5
    set_linear_backend(model, "aten")
    assert linear_backend(model) == "aten" and torch.equal(logits(model, ids), expected)


@needs_onednn
def test_onednn_linear_is_used_for_inference_and_autograd_for_training(model, monkeypatch):
    calls = []
    original = torch.ops.mkldnn._linear_pointwise

    class Recorder:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return original(*args)

    set_linear_backend(model, "onednn")
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Recorder())
    logits(model, torch.randint(1, 500, (1, 8)))
    assert len(calls) == 6 * CONFIG.n_layers + 1  # q, k, v, out, lin1, lin2 per layer, and the head
    calls.clear()
    model.train()
    ids = torch.randint(1, 500, (2, 8))
    loss = model(ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])).loss
    loss.backward()
    assert calls == [] and model.qa_outputs.weight.grad is not None


def test_auto_picks_the_measured_faster_backend(monkeypatch):
    linear_module.fastest_linear_backend.cache_clear()
    monkeypatch.setattr(linear_module, "onednn_available", lambda: True)
    try:
        for rates, expected in [
            ({"aten": 200.0, "onednn": 450.0}, "onednn"),
            ({"aten": 400.0, "onednn": 420.0}, "aten"),
        ]:
            monkeypatch.setattr(linear_module, "gemm_throughput", lambda backend, r=rates: r[backend])
            linear_module.fastest_linear_backend.cache_clear()
            assert linear_module.fastest_linear_backend() == expected
    finally:
        linear_module.fastest_linear_backend.cache_clear()


def test_unknown_backend_is_refused(model):
    with pytest.raises(ValueError, match="unknown linear backend 'mkl'"):
        set_linear_backend(model, "mkl")


def test_int8_transforms_the_models_own_linear_layers(model):
    ids = torch.randint(1, 500, (2, 30))
    expected = logits(model, ids)
    embeddings = model.distilbert.embeddings.word_embeddings
    quantize_int8(model.distilbert.transformer)
    quantized = [m for m in model.distilbert.transformer.modules() if type(m) is torch.ao.nn.quantized.dynamic.Linear]
    assert len(quantized) == 6 * CONFIG.n_layers
    assert type(model.qa_outputs) is nn.Linear and model.distilbert.embeddings.word_embeddings is embeddings
    difference = (logits(model, ids) - expected).abs().max().item()
    # Approximate by design: measured 1e-4 at this size (random weights); exact would be 0.
    assert 0 < difference < 2e-3
