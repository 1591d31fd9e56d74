"""distilqa.parity: the layer-by-layer report behind ``distilqa verify``."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import save_reference_checkpoint

from distilqa import DistilBertForQuestionAnswering
from distilqa.parity import ParityReport, ParityRow, compare_models, verify_checkpoint
from distilqa.testing import sample_inputs

TINY = dict(vocab_size=1000, dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=64)


def expected_row_names(n_layers: int, with_attentions: bool) -> list[str]:
    names = ["embeddings"]
    for layer in range(1, n_layers + 1):
        names += [f"layer {layer} attention", f"layer {layer}"] if with_attentions else [f"layer {layer}"]
    return [*names, "start_logits", "end_logits"]


@pytest.fixture(scope="module")
def published_report(published_checkpoint) -> ParityReport:
    return verify_checkpoint(published_checkpoint)


@pytest.fixture(scope="module")
def tiny_parity_checkpoint(tmp_path_factory):
    """3 layers of width 32 (no tokenizer files): enough layers for a report to name one."""
    return save_reference_checkpoint(tmp_path_factory.mktemp("tiny-parity"), seed=2, **TINY)


def load_reference(directory, attn_implementation="eager"):
    transformers = pytest.importorskip("transformers")
    return transformers.DistilBertForQuestionAnswering.from_pretrained(
        directory, attn_implementation=attn_implementation
    ).eval()


def test_published_checkpoint_passes_with_zero_difference(published_report, published_checkpoint):
    report = published_report
    assert report.passed
    assert report.first_divergence is None
    assert [row.name for row in report.rows] == expected_row_names(6, with_attentions=True)
    assert all(row.max_abs_diff == 0.0 for row in report.rows), report.format()
    assert all(row.tolerance == 1e-5 and row.passed for row in report.rows)
    assert (report.checkpoint, report.attn_implementation, report.dtype) == (
        str(published_checkpoint),
        "eager",
        "float32",
    )


def test_format_has_table_and_verdict(published_report):
    text = published_report.format()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("name"))
    assert [part.strip() for part in header.split("|")] == ["name", "max abs diff", "tolerance", "result"]
    body = [line for line in lines if "|" in line and not line.startswith("name")]
    assert len(body) == len(published_report.rows)
    assert len({line.index("|") for line in [*body, header]}) == 1, "columns must line up"
    assert "layer 3 attention" in text and "start_logits" in text
    assert all(line.rstrip().endswith("PASS") for line in body)
    assert lines[-1].startswith("PASS: ")
    assert "FAIL" not in text


def test_perturbed_layer_3_is_the_first_divergence(published_checkpoint):
    ours = DistilBertForQuestionAnswering.from_pretrained(published_checkpoint, attn_implementation="eager")
    weight = ours.distilbert.transformer.layer[2].ffn.lin1.weight  # layer 3 in the report's 1-based names
    # Random noise of scale 1e-3: a constant shift would be invisible here, since lin1's input comes
    # out of a LayerNorm and sums to ~0 over the features.
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weight.add_(1e-3 * noise)
    reference = load_reference(published_checkpoint)
    input_ids, attention_mask = sample_inputs(28996, max_length=32)
    rows = compare_models(ours, reference, input_ids, attention_mask, tolerance=1e-5)
    report = ParityReport(rows, str(published_checkpoint), "eager", "float32")
    assert not report.passed
    assert report.first_divergence == "layer 3"
    by_name = {row.name: row for row in rows}
    # Everything before layer 3's feed-forward is untouched: exactly equal, including its attention.
    for name in ["embeddings", "layer 1 attention", "layer 1", "layer 2 attention", "layer 2", "layer 3 attention"]:
        assert by_name[name].max_abs_diff == 0.0, name
    assert by_name["layer 3"].max_abs_diff > 1e-3
    assert not by_name["layer 6"].passed and not by_name["start_logits"].passed
    text = report.format()
    assert text.splitlines()[-1] == "FAIL: first difference at layer 3"
    assert "FAIL" in next(line for line in text.splitlines() if line.startswith("layer 3 ") and "attention" not in line)


def test_sdpa_report_has_no_attention_rows(tiny_parity_checkpoint):
    report = verify_checkpoint(tiny_parity_checkpoint, attn_implementation="sdpa")
    assert report.passed, report.format()
    assert [row.name for row in report.rows] == expected_row_names(3, with_attentions=False)
    assert report.attn_implementation == "sdpa"


@pytest.mark.parametrize(("dtype", "name"), [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_half_precision_report(tiny_parity_checkpoint, dtype, name):
    report = verify_checkpoint(tiny_parity_checkpoint, dtype=dtype)
    assert report.dtype == name
    assert all(row.tolerance == 1e-2 for row in report.rows)
    assert report.passed, report.format()


def test_explicit_tolerance(tiny_parity_checkpoint):
    report = verify_checkpoint(tiny_parity_checkpoint, tolerance=0.0)
    assert report.passed  # eager against eager: exactly 0
    assert {row.tolerance for row in report.rows} == {0.0}


def test_hidden_state_differences_at_padding_do_not_count(tiny_parity_checkpoint):
    """A reference whose hidden states and logits differ only at padding positions still passes;
    the same difference at a real position fails."""
    ours = DistilBertForQuestionAnswering.from_pretrained(tiny_parity_checkpoint, attn_implementation="sdpa")
    input_ids, attention_mask = sample_inputs(TINY["vocab_size"], max_length=20)

    @dataclass
    class Output:
        start_logits: torch.Tensor
        end_logits: torch.Tensor
        hidden_states: tuple
        attentions: tuple = ()

    class Shifted(torch.nn.Module):
        """Our own model, with +1 added at the positions in ``where``."""

        def __init__(self, where):
            super().__init__()
            self.model, self.where = ours, where

        def forward(self, input_ids, attention_mask, output_hidden_states, output_attentions, return_dict):
            out = self.model(input_ids, attention_mask, output_hidden_states=True)
            shift = self.where.float()
            return Output(
                out.start_logits + shift,
                out.end_logits + shift,
                tuple(h + shift[..., None] for h in out.hidden_states),
            )

    padding = attention_mask == 0
    rows = compare_models(ours, Shifted(padding).eval(), input_ids, attention_mask, tolerance=1e-6)
    assert all(row.passed for row in rows), rows
    real_token = torch.zeros_like(padding)
    real_token[0, 3] = True
    rows = compare_models(ours, Shifted(real_token).eval(), input_ids, attention_mask, tolerance=1e-6)
    assert rows[0].name == "embeddings" and not rows[0].passed
    assert rows[0].max_abs_diff == pytest.approx(1.0)


def test_models_must_be_in_eval_mode(tiny_parity_checkpoint):
    ours = DistilBertForQuestionAnswering.from_pretrained(tiny_parity_checkpoint).train()
    reference = load_reference(tiny_parity_checkpoint)
    input_ids, attention_mask = sample_inputs(TINY["vocab_size"], max_length=8)
    with pytest.raises(ValueError, match="eval"):
        compare_models(ours, reference, input_ids, attention_mask, 1e-5)


def test_nan_is_a_failure():
    row = ParityRow("layer 1", float("nan"), 1e-5)
    assert not row.passed
    report = ParityReport([ParityRow("embeddings", 0.0, 1e-5), row], "x", "eager", "float32")
    assert report.first_divergence == "layer 1"
    assert report.format().splitlines()[-1] == "FAIL: first difference at layer 1"


def test_sample_inputs_are_deterministic_padded_rows():
    input_ids, attention_mask = sample_inputs(28996)
    again_ids, again_mask = sample_inputs(28996)
    assert torch.equal(input_ids, again_ids) and torch.equal(attention_mask, again_mask)
    assert not torch.equal(input_ids, sample_inputs(28996, seed=1)[0])
    assert input_ids.shape == attention_mask.shape == (3, 200)
    assert input_ids.dtype == attention_mask.dtype == torch.int64
    assert attention_mask.sum(1).tolist() == [7, 64, 200]
    assert (input_ids[:, 0] == 101).all()
    real = attention_mask.bool()
    assert (input_ids[real][input_ids[real] != 101] >= 1000).all()
    assert (input_ids < 28996).all()
    assert (input_ids[~real] == 0).all()
    # Right padding: a row's real tokens come first.
    assert torch.equal(attention_mask, attention_mask.sort(dim=1, descending=True).values)


@pytest.mark.parametrize(("vocab_size", "max_length"), [(50, 10), (103, 200), (1001, 5)])
def test_sample_inputs_small_vocabularies(vocab_size, max_length):
    input_ids, attention_mask = sample_inputs(vocab_size, max_length=max_length)
    assert input_ids.shape == (3, max_length)
    assert (input_ids < vocab_size).all() and (input_ids[attention_mask.bool()] > 0).all()
    assert attention_mask.sum(1).tolist() == [min(7, max_length), min(64, max_length), max_length]
    assert ((input_ids[:, 0] == 101).all()) == (vocab_size > 102)


def test_verify_takes_dtype_by_name_and_a_device(tiny_parity_checkpoint):
    report = verify_checkpoint(tiny_parity_checkpoint, dtype="bfloat16", device="cpu")
    assert report.dtype == "bfloat16" and report.passed, report.format()
    with pytest.raises(ValueError, match="dtype"):
        verify_checkpoint(tiny_parity_checkpoint, dtype="float64")


@pytest.mark.filterwarnings("ignore:Cannot enable progress bars")
def test_save_reference_checkpoint_leaves_global_state_as_it_was(tmp_path):
    """The global RNG stream and transformers' progress-bar switch are the same after the call."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.enable_progress_bar()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    save_reference_checkpoint(tmp_path, seed=5, **TINY)
    assert torch.equal(torch.rand(3), expected)
    assert transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    save_reference_checkpoint(tmp_path, seed=5, **TINY)
    assert not transformers.utils.logging.is_progress_bar_enabled()


@pytest.mark.parametrize(
    ("checkpoint", "low", "high"), [("published_checkpoint", 0, 0.003), ("peaked_checkpoint", 0.01, 1)]
)
def test_span_head_sharpness(request, checkpoint, low, high):
    """span_head_sharpness turns flat random span scores into a trained model's: the best span of
    the rows of 64 and 150 tokens, measured 0.30 and 0.032 sharpened, 0.0008 and 0.0002 not."""
    from distilqa.pipeline import decode_spans

    model = DistilBertForQuestionAnswering.from_pretrained(request.getfixturevalue(checkpoint))
    input_ids, attention_mask = sample_inputs(28996, seed=3, max_length=150)
    with torch.no_grad():
        out = model(input_ids, attention_mask)
    spans = decode_spans(out.start_logits, out.end_logits, attention_mask.bool(), 15, 1)
    best = [window_spans[0][0] for window_spans, _ in spans[1:]]  # the rows of 64 and 150 tokens
    assert all(low <= score <= high for score in best), best


def test_missing_transformers_is_a_clear_import_error(tiny_parity_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install 'distilqa\[test\]'"):
        verify_checkpoint(tiny_parity_checkpoint)
