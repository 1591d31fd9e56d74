"""The runtimes a user might pick instead of distilqa, as peers in the benchmarks: ONNX Runtime and
OpenVINO, each running transformers' DistilBertForQuestionAnswering exported with
``torch.onnx.export`` (same weights as every other row of a run).

Each peer is wrapped as a module called like the models, ``peer(input_ids, attention_mask)`` with
(batch, seq) tensors, returning an object with ``start_logits`` and ``end_logits`` (batch, seq) as
torch tensors, so the benchmarks time and compare it like any other variant. Install them with
``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class PeerOutput:
    start_logits: Tensor  # (batch, seq)
    end_logits: Tensor  # (batch, seq)


class _LogitsOnly(torch.nn.Module):
    """transformers' model with plain (input_ids, attention_mask) -> (start, end) for the exporter."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return output.start_logits, output.end_logits


def export_reference_onnx(checkpoint: Path, path: Path) -> Path:
    """transformers' model from ``checkpoint`` as ONNX (fp32, dynamic batch and sequence axes)."""
    import transformers

    model = transformers.DistilBertForQuestionAnswering.from_pretrained(checkpoint, attn_implementation="eager")
    wrapper = _LogitsOnly(model).eval()  # the exporter restores the wrapper's mode: it must be eval too
    ids = torch.ones(2, 16, dtype=torch.long)
    axes = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is the legacy one
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, torch.ones_like(ids)),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["start_logits", "end_logits"],
            dynamic_axes={name: axes for name in ("input_ids", "attention_mask", "start_logits", "end_logits")},
            opset_version=17,
            dynamo=False,
        )
    return path


class _Peer(torch.nn.Module):
    """What QuestionAnswerer reads of a model (``config``, ``device``), so that a peer can answer
    through the same tokenization and decoding (padded windows: ``packed=False``)."""

    def __init__(self, config: object) -> None:
        super().__init__()
        self.config = config

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> PeerOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feed = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.long().cpu().numpy()}
        start, end = self.run(feed)
        return PeerOutput(torch.from_numpy(start), torch.from_numpy(end))


class OnnxRuntimePeer(_Peer):
    """ONNX Runtime's CPU execution provider, all graph optimisations on, ``threads`` intra-op threads."""

    def __init__(self, onnx_path: Path, threads: int, config: object = None) -> None:
        super().__init__(config)
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run(self, feed: dict) -> list:
        return self.session.run(["start_logits", "end_logits"], feed)


class OpenVinoPeer(_Peer):
    """OpenVINO on the CPU in float32 (``INFERENCE_PRECISION_HINT=f32``: by default OpenVINO would
    compute in bfloat16 on CPUs that have it, which is not the same arithmetic)."""

    def __init__(self, onnx_path: Path, threads: int, config: object = None) -> None:
        super().__init__(config)
        import openvino

        self.compiled = openvino.Core().compile_model(
            str(onnx_path),
            "CPU",
            {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"},
        )

    def run(self, feed: dict) -> list:
        result = self.compiled(feed)
        return [result["start_logits"], result["end_logits"]]


PEERS = {"onnxruntime": OnnxRuntimePeer, "openvino": OpenVinoPeer}
