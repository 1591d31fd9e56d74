"""Export the hand-written model to ONNX, checked against its own logits before anything is written.

The folder that :func:`export_onnx` writes runs in any ONNX runtime::

    DIR/model.onnx              inputs  input_ids (batch, seq) int64, attention_mask (batch, seq) int64
                                outputs start_logits (batch, seq) float32, end_logits (batch, seq) float32
    DIR/config.json             the model's configuration
    DIR/tokenizer.json, vocab.txt, tokenizer_config.json   the tokenizer files of the checkpoint

``batch`` and ``seq`` are dynamic axes (seq up to the model's ``max_position_embeddings``). The graph
is traced from the same :class:`~distilqa.model.DistilBertForQuestionAnswering` object distilqa
runs, through a two-line adapter that only turns its output dataclass into a tuple. At export time
onnxruntime runs the file at several shapes, padded and unpadded, and the largest absolute
difference from the model's own logits is reported; above ``tolerance`` (1e-4) nothing is written.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from distilqa.files import atomic_write, check_output
from distilqa.model import DistilBertForQuestionAnswering
from distilqa.testing import random_inputs
from distilqa.weights import CONFIG_FILE, TOKENIZER_FILES, load_checkpoint

ONNX_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("start_logits", "end_logits")
DEFAULT_TOLERANCE = 1e-4
# (batch, seq) shapes the export is checked at: one token row up to several rows of different lengths.
DEFAULT_CHECK_SHAPES: tuple[tuple[int, int], ...] = ((1, 7), (2, 33), (4, 64), (3, 128))
ONNX_OPSET = 17  # LayerNormalization is a single op from 17 on


class ExportCheckError(ValueError):
    """onnxruntime's logits differ from the model's by more than the tolerance."""


@dataclass
class ExportReport:
    """What was written and how closely onnxruntime reproduces the model."""

    directory: Path
    max_abs_diff: float  # over every checked shape, padded and unpadded, start and end logits
    checked: list[tuple[int, int, bool]]  # (batch, seq, padded) of each check
    tolerance: float

    def format(self) -> str:
        shapes = ", ".join(f"{b}x{s}{' padded' if p else ''}" for b, s, p in self.checked)
        return (
            f"wrote {self.directory / ONNX_FILE}; onnxruntime vs distilqa logits: max |difference| "
            f"{self.max_abs_diff:.2e} (limit {self.tolerance:.0e}) at {shapes}"
        )


class _TupleOutput(nn.Module):
    """Holds the model and returns its logits as a tuple, since ONNX graphs output tensors, not dataclasses."""

    def __init__(self, model: DistilBertForQuestionAnswering):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        output = self.model(input_ids, attention_mask)
        return output.start_logits, output.end_logits  # (batch, seq) each


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx and onnxruntime ({error.name} is missing): pip install 'distilqa[onnx]'"
        ) from None
    return onnx, onnxruntime


def check_lengths(batch: int, seq: int, padded: bool) -> list[int]:
    """Real tokens per row of a check batch: all ``seq``, or with ``padded`` decreasing lengths after a
    full first row (so the padded path of every row is compared too)."""
    if not padded:
        return [seq] * batch
    return [seq] + [max(1, seq - row * max(1, seq // (batch + 1))) for row in range(1, batch)]


def compare_with_onnxruntime(
    model: DistilBertForQuestionAnswering,
    onnx_path: str | os.PathLike,
    shapes: Sequence[tuple[int, int]] = DEFAULT_CHECK_SHAPES,
    seed: int = 0,
) -> tuple[float, list[tuple[int, int, bool]]]:
    """Run ``model`` and the ONNX file at each (batch, seq), unpadded and padded, on the same random
    inputs; returns the largest |difference| of the start and end logits, and what was checked."""
    _, onnxruntime = _require_onnx()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst, checked = 0.0, []
    for batch, seq in shapes:
        for padded in (False, True) if batch > 1 else (False,):
            lengths = check_lengths(batch, seq, padded)
            input_ids, attention_mask = random_inputs(model.config.vocab_size, lengths, seq, generator=generator)
            with torch.inference_mode():
                expected = model(input_ids.to(model.device), attention_mask.to(model.device))
            got = session.run(
                list(OUTPUT_NAMES), {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
            )
            for reference, value in zip((expected.start_logits, expected.end_logits), got):
                worst = max(worst, (reference.float().cpu() - torch.from_numpy(value)).abs().max().item())
            checked.append((batch, seq, padded))
    return worst, checked


def export_onnx(
    model: str | os.PathLike | DistilBertForQuestionAnswering,
    directory: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    check_shapes: Sequence[tuple[int, int]] = DEFAULT_CHECK_SHAPES,
    device: str | torch.device | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Export a checkpoint (folder or hub repo id, loaded on ``device``) or a loaded model to the
    folder ``directory``: ``model.onnx`` with config.json and the tokenizer files beside it.

    A loaded ``model`` is exported as it is (float32, on its device) and needs ``tokenizer_dir``,
    the folder of its tokenizer files. An existing ``directory`` is refused unless ``overwrite``
    (checked before the model loads). The export is checked with onnxruntime at ``check_shapes``
    before ``directory`` is touched: above ``tolerance`` it raises :class:`ExportCheckError` with
    the max difference, and nothing is written. The folder appears whole, or not at all.
    """
    _require_onnx()
    inputs = [tokenizer_dir] if isinstance(model, DistilBertForQuestionAnswering) else [model, tokenizer_dir]
    directory = check_output(directory, overwrite=overwrite, inputs=inputs, directory=True)
    if isinstance(model, DistilBertForQuestionAnswering):
        if tokenizer_dir is None:
            raise ValueError("exporting a loaded model needs tokenizer_dir, the folder of its tokenizer files")
        source = Path(tokenizer_dir)
    else:
        loaded = load_checkpoint(DistilBertForQuestionAnswering, model, device=device)
        source, model = loaded.directory, loaded.model
    if model.dtype != torch.float32:
        raise ValueError(f"export runs in float32; this model is {model.dtype} (load it with dtype=None)")
    if model.attn_implementation not in ("eager", "sdpa"):
        raise ValueError(
            f"the {model.attn_implementation!r} attention core does not export to ONNX; "
            "call model.set_attn_implementation('sdpa') first"
        )
    if not any((source / name).exists() for name in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(
            f"{source} has no tokenizer files (tokenizer.json or vocab.txt) to put beside the model"
        )

    was_training = model.training
    model.eval()
    checks: list[tuple[float, list[tuple[int, int, bool]]]] = []

    def write_folder(staging: Path) -> None:
        staging.mkdir()
        trace_example(model, staging / ONNX_FILE)
        max_abs_diff, checked = compare_with_onnxruntime(model, staging / ONNX_FILE, check_shapes)
        if not max_abs_diff <= tolerance:  # also catches NaN
            raise ExportCheckError(
                f"onnxruntime's logits differ from distilqa's by up to {max_abs_diff:.3g}, above the "
                f"{tolerance:g} limit; nothing was written"
            )
        model.config.to_json_file(staging / CONFIG_FILE)
        for name in TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copyfile(source / name, staging / name)
        checks.append((max_abs_diff, checked))

    try:
        atomic_write(directory, write_folder)
    finally:
        model.train(was_training)
    (max_abs_diff, checked) = checks[0]
    return ExportReport(directory, max_abs_diff, checked, tolerance)


def trace_example(model: DistilBertForQuestionAnswering, path: Path) -> None:
    """Write the ONNX graph of ``model`` with dynamic batch and sequence axes.

    The TorchScript exporter (``dynamo=False``) records the operations one padded example runs. The
    model skips its attention mask when every token is real, a data-dependent branch that
    ``torch.export`` cannot trace; tracing a padded example records the masked path, which is exact
    for unpadded input too (a mask of all ones masks nothing)."""
    length = min(16, model.config.max_position_embeddings)
    input_ids, attention_mask = random_inputs(model.config.vocab_size, check_lengths(2, length, True), length)
    axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    backend = model.linear_backend
    model.set_linear_backend("aten")  # oneDNN's GEMM is a custom op with no ONNX form; the arithmetic is the same
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about Python bools of shapes: checked at export, not graph
            torch.onnx.export(
                _TupleOutput(model).eval(),  # the exporter restores the wrapper's mode on the model: keep it eval
                (input_ids.to(model.device), attention_mask.to(model.device)),
                str(path),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    finally:
        model.set_linear_backend(backend)
