"""ONNX export: onnxruntime reproduces distilqa's logits within 1e-4 at several shapes, padded and
unpadded; the folder carries its tokenizer; a failed check writes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from distilqa import DistilBertForQuestionAnswering  # noqa: E402
from distilqa.cli import main  # noqa: E402
from distilqa.export import ExportCheckError, export_onnx  # noqa: E402

TOLERANCE = 1e-4
# Shapes other than those the export checks itself: one token, an odd length, the longest sequence.
SHAPES = [(1, 1), (1, 5), (3, 50), (5, 200), (2, 512)]


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx") / "tiny"
    return export_onnx(tiny_checkpoint, directory)


def run_both(model, session, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    with torch.inference_mode():
        output = model(input_ids, attention_mask)
    start, end = session.run(
        ["start_logits", "end_logits"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    )
    return (output.start_logits.numpy(), output.end_logits.numpy()), (start, end)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_onnxruntime_matches_model_logits(exported, tiny_checkpoint, padded):
    assert exported.max_abs_diff <= TOLERANCE
    model = DistilBertForQuestionAnswering.from_pretrained(tiny_checkpoint)
    session = onnxruntime.InferenceSession(str(exported.directory / "model.onnx"), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for batch, seq in SHAPES:
        input_ids = torch.randint(1, model.config.vocab_size, (batch, seq), generator=generator)
        attention_mask = torch.ones(batch, seq, dtype=torch.long)
        if padded:
            lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
            lengths[0] = seq
            attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
            input_ids = input_ids * attention_mask
        expected, got = run_both(model, session, input_ids, attention_mask)
        for reference, value in zip(expected, got):
            assert value.shape == (batch, seq)
            np.testing.assert_allclose(value, reference, rtol=0, atol=TOLERANCE, err_msg=f"{batch}x{seq}")
        if padded and batch > 1:  # padding really is masked: a short row alone gives its own logits
            row = int(attention_mask[1].sum())
            alone = session.run(
                ["start_logits"],
                {"input_ids": input_ids[1:2, :row].numpy(), "attention_mask": attention_mask[1:2, :row].numpy()},
            )[0]
            np.testing.assert_allclose(got[0][1, :row], alone[0], rtol=0, atol=TOLERANCE)


def test_folder_runs_alone_with_its_tokenizer(exported, tiny_checkpoint):
    """Tokenize with the folder's tokenizer.json, run the folder's model.onnx: distilqa's logits."""
    from tokenizers import Tokenizer

    names = {path.name for path in exported.directory.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= names
    tokenizer = Tokenizer.from_file(str(exported.directory / "tokenizer.json"))
    encoding = tokenizer.encode("Where was it founded?", "The company was founded in Paris in 1999.")
    input_ids = torch.tensor([encoding.ids])
    attention_mask = torch.ones_like(input_ids)
    model = DistilBertForQuestionAnswering.from_pretrained(tiny_checkpoint)
    session = onnxruntime.InferenceSession(str(exported.directory / "model.onnx"), providers=["CPUExecutionProvider"])
    expected, got = run_both(model, session, input_ids, attention_mask)
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=TOLERANCE)
    assert encoding.tokens[0] == "[CLS]" and "Paris" in encoding.tokens


def test_a_check_above_the_tolerance_writes_nothing(tiny_checkpoint, tmp_path):
    directory = tmp_path / "refused"
    with pytest.raises(ExportCheckError, match=r"differ from distilqa's by up to \S+, above the 0 limit"):
        export_onnx(tiny_checkpoint, directory, tolerance=0.0)  # float32 rounding alone exceeds 0
    assert not directory.exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone too


def test_a_loaded_model_exports_and_keeps_its_settings(tiny_checkpoint, tmp_path):
    """A model a QuestionAnswerer runs (oneDNN GEMMs where available, here in training mode) exports
    through plain aten GEMMs and is handed back as it was."""
    from distilqa.linear import onednn_available

    backend = "onednn" if onednn_available() else "aten"
    model = DistilBertForQuestionAnswering.from_pretrained(tiny_checkpoint, linear_backend=backend).train()
    report = export_onnx(model, tmp_path / "loaded", tokenizer_dir=tiny_checkpoint)
    assert report.max_abs_diff <= TOLERANCE
    assert model.training and model.linear_backend == backend
    with pytest.raises(ValueError, match="needs tokenizer_dir"):
        export_onnx(model, tmp_path / "other")


def test_cli_export(tiny_checkpoint, tmp_path, capsys):
    directory = tmp_path / "exported"
    assert main(["export", "--output", str(directory), "--model", str(tiny_checkpoint), "--device", "cpu"]) == 0
    assert "max |difference|" in capsys.readouterr().out
    written = {path.name: path.read_bytes() for path in directory.iterdir()}
    assert "model.onnx" in written
    assert main(["export", "--onnx", str(directory), "--model", str(tiny_checkpoint)]) == 2  # the old spelling
    assert f"--output {directory} already exists" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == written
    assert main(["export", "--output", str(directory), "--model", str(tiny_checkpoint), "--overwrite"]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["exported"]  # no temporary folder left


def test_a_failed_export_writes_nothing(tiny_checkpoint, tmp_path):
    directory = tmp_path / "exported"
    directory.mkdir()
    (directory / "kept.txt").write_text("old", encoding="utf-8")
    with pytest.raises(ExportCheckError, match="nothing was written"):
        export_onnx(tiny_checkpoint, directory, tolerance=-1.0, overwrite=True)  # no difference passes
    assert [path.name for path in tmp_path.iterdir()] == ["exported"]
    assert [path.name for path in directory.iterdir()] == ["kept.txt"]


@pytest.mark.slow  # the published size: about 25 s to export and check
def test_published_size_export(published_checkpoint, tmp_path):
    report = export_onnx(published_checkpoint, tmp_path / "published")
    assert report.max_abs_diff <= TOLERANCE
