"""The runtimes a user might pick instead of distilqa: ONNX Runtime and OpenVINO, each running
transformers' DistilBertForQuestionAnswering exported with ``torch.onnx.export`` (the same weights as
every other row of a run), wrapped as a module called like the models: ``peer(input_ids,
attention_mask)`` with (batch, seq) tensors, returning ``start_logits`` and ``end_logits`` (batch, seq).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor


def export_reference_onnx(checkpoint: Path, path: Path) -> Path:
    """transformers' model from ``checkpoint`` as ONNX (fp32, dynamic batch and sequence axes)."""
    import transformers

    model = transformers.DistilBertForQuestionAnswering.from_pretrained(checkpoint, attn_implementation="eager")
    model.eval().config.return_dict = False  # a (start, end) tuple for the exporter
    names = ("input_ids", "attention_mask", "start_logits", "end_logits")
    ids = torch.ones(2, 16, dtype=torch.long)
    with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is the legacy one
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (ids, torch.ones_like(ids)), str(path), input_names=names[:2], output_names=names[2:],
            dynamic_axes={name: {0: "batch", 1: "seq"} for name in names}, opset_version=17, dynamo=False,
        )  # fmt: skip
    return path


class Peer(torch.nn.Module):
    """A peer runtime with what QuestionAnswerer reads of a model (``config``, ``device``), so that it
    answers through distilqa's own tokenization and decoding (padded windows: ``packed=False``)."""

    def __init__(self, run: Callable[[dict], list], config: object = None) -> None:
        super().__init__()
        self.run, self.config = run, config

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> SimpleNamespace:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        start, end = self.run({"input_ids": input_ids.cpu().numpy(), "attention_mask": mask.cpu().numpy()})
        return SimpleNamespace(start_logits=torch.from_numpy(start), end_logits=torch.from_numpy(end))


def onnxruntime_peer(onnx_path: Path, threads: int, config: object = None) -> Peer:
    """ONNX Runtime's CPU execution provider, every graph optimisation on."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return Peer(lambda feed: session.run(["start_logits", "end_logits"], feed), config)


def openvino_peer(onnx_path: Path, threads: int, config: object = None) -> Peer:
    """OpenVINO on the CPU in float32: by default it would compute in bfloat16 where the CPU has it."""
    import openvino

    hints = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    compiled = openvino.Core().compile_model(str(onnx_path), "CPU", hints)
    return Peer(lambda feed: [(out := compiled(feed))["start_logits"], out["end_logits"]], config)


PEERS = {"onnxruntime": onnxruntime_peer, "openvino": openvino_peer}


def load_peer(name: str) -> Callable[[Path, torch.device, torch.dtype], Peer]:
    """A forward-benchmark builder: exports the checkpoint folder's model to ONNX once, runs it with ``name``."""

    def build(folder: Path, device: torch.device, dtype: torch.dtype) -> Peer:
        onnx_path = Path(folder) / "reference.onnx"
        if not onnx_path.exists():
            export_reference_onnx(folder, onnx_path)
        return PEERS[name](onnx_path, torch.get_num_threads())

    return build
