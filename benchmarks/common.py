"""What the benchmark scripts share: machine info, options, the GEMM reference, round-robin timing (A, B,
C, A, B, C, ...: load from other processes lands on all alike), JSON, tables, bar charts and the peers."""

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from distilqa import files
from distilqa.config import DistilBertConfig
from distilqa.hardware import cpu_info, has_native_bfloat16, keep_freed_memory
from distilqa.linear import onednn_available
from distilqa.plotting import require_matplotlib, save_figure

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = Path(os.environ.get("DISTILQA_DATA", ROOT.parent / "shared" / "data"))
SQUAD_FILE = SHARED_DATA / "squad" / "dev-v1.1.json.zip"
VOCAB_FILE = SHARED_DATA / "vocab" / "bert-base-cased-vocab.txt"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

PEERS = ("onnxruntime", "openvino")  # runtimes a user might pick instead, running transformers' model as ONNX
# The colours of every figure: distilqa blue, peers (and PyTorch's SDPA backends) orange, transformers grey.
FAMILIES = {"distilqa": "Blues", "peer": "Oranges", "reference": "Greys"}


def kind(name: str) -> str:
    """The colour family of a row named ``name`` ("distilqa ...", "transformers ...", a peer, sdpa-*)."""
    if name.startswith("transformers"):
        return "reference"
    return "peer" if name.startswith((*PEERS, "sdpa-")) else "distilqa"


def colours(names: Sequence[str]) -> dict[str, Any]:
    """A colour per name: its kind's colormap, shades spread over the names of that kind."""
    import matplotlib

    result = {}
    for family, cmap in FAMILIES.items():
        members = [n for n in names if kind(n) == family]
        for index, name in enumerate(members):
            result[name] = matplotlib.colormaps[cmap](0.85 - 0.5 * index / max(1, len(members) - 1))
    return result


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where and how a result was measured: CPU model and ISA flags, threads, versions, date, load."""
    import transformers

    cpu, cuda = cpu_info(), device.type == "cuda"
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu_model": cpu["model"],
            "cpu_flags": [flag for flag, present in cpu["isa"].items() if present],
            "native_bfloat16": has_native_bfloat16(device), "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else cpu["model"],
            "cuda": torch.version.cuda if cuda else None,
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}  # fmt: skip


def main(name: str, doc: str, options: Callable, run: Callable, table: Callable, plot: Callable | None,
         repeats: int, warmup: int) -> None:  # fmt: skip
    """Parse the options, measure (``run(args, device, dtype_names)``), write the JSON, table and picture."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add = parser.add_argument
    add("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    add("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default: fp32 on CPU, all on CUDA)")
    add("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    add("--repeats", type=int, default=repeats, help="timed runs of each case")
    add("--warmup", type=int, default=warmup, help="untimed runs of each case first")
    add("--small", action="store_true", help="tiny sizes, to check that the script works")
    add("--output", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    add("--plot", type=Path, default=None, help="PNG path (default: beside the JSON)")
    options(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    dtype_names = args.dtypes.split(",") if args.dtypes else (["fp32"] if device.type == "cpu" else list(DTYPES))
    if unknown := [d for d in dtype_names if d not in DTYPES]:
        raise SystemExit(f"unknown dtype(s) {', '.join(unknown)}; expected some of {', '.join(DTYPES)}")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    machine = machine_info(device)
    # every library in the process then runs as distilqa's QuestionAnswerer runs on the CPU
    machine["glibc_keeps_freed_memory"] = device.type == "cpu" and keep_freed_memory()
    payload = {"benchmark": name, "machine": machine, **run(args, device, dtype_names)}
    machine["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    output = args.output or RESULTS / f"{name}{'-small' if args.small else ''}-{device.type}.json"
    print(f"wrote {write_json(output, payload)}")
    print(table(payload))
    if plot is not None:
        print(f"wrote {plot(payload, args.plot or output.with_suffix('.png'))}")


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"1x128,8x384"`` -> [(1, 128), (8, 384)]."""
    pairs = [item.strip().lower().partition("x")[::2] for item in text.split(",")]
    if not all(a.isdigit() and b.isdigit() and int(a) > 0 and int(b) > 0 for a, b in pairs):
        raise SystemExit(f"cannot read {text!r} as AxB pairs of positive integers, e.g. 1x128,8x384")
    return [(int(a), int(b)) for a, b in pairs]


def window_flops(config: DistilBertConfig, length: int) -> dict[str, int]:
    """FLOPs of one window of ``length`` tokens: the linear layers' 2*M*K*N and attention's two matmuls
    per layer (2*2*heads*L*L*head_dim); embeddings, LayerNorm, GELU, softmax and biases not counted."""
    per_token = 2 * (4 * config.dim * config.dim + 2 * config.dim * config.hidden_dim)
    linear = config.n_layers * per_token * length + 2 * length * config.dim * 2
    attention = config.n_layers * 2 * 2 * config.n_heads * length * length * config.head_dim
    return {"linear": linear, "attention": attention, "total": linear + attention}


def layer_gemms(config: DistilBertConfig) -> list[tuple[int, int, int]]:
    """(K, N, count) of one encoder layer's linear layers: q, k, v, out; lin1; lin2."""
    return [(config.dim, config.dim, 4), (config.dim, config.hidden_dim, 1), (config.hidden_dim, config.dim, 1)]


def gemm_reference(config: DistilBertConfig, tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One encoder layer's GEMMs (no bias) at M = ``tokens``, {"gemm <library>": fn}: F.linear (MKL), oneDNN."""
    generator = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    work = [(randn(tokens, k), randn(n, k), count) for k, n, count in layer_gemms(config)]
    gemms = {"gemm F.linear": lambda: [torch.nn.functional.linear(x, w) for x, w, c in work for _ in range(c)]}
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and onednn_available():
        onednn = torch.ops.mkldnn._linear_pointwise
        gemms["gemm onednn"] = lambda: [onednn(x, w, None, "none", [], "") for x, w, c in work for _ in range(c)]
    return gemms


def gemm_rates(config: DistilBertConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """GFLOP/s per library at the layer's GEMMs in ``dtype``, the best of M = 384, 2048 and 3072 tokens."""
    rates: dict[str, float] = {}
    for tokens in (384, 2048, 3072):
        flops = sum(2 * tokens * k * n * count for k, n, count in layer_gemms(config))
        timings = time_round_robin(gemm_reference(config, tokens, device, dtype), 1, 5, device)
        for name, timing in timings.items():
            library = name.removeprefix("gemm ")
            rates[library] = max(rates.get(library, 0.0), flops / timing["median_ms"] / 1e6)
    return rates


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, extremes and the samples of a list of durations, in milliseconds."""
    ms = [1000.0 * s for s in seconds]
    q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return {"median_ms": median, "min_ms": min(ms), "max_ms": max(ms), "q1_ms": q1, "q3_ms": q3, "repeats": len(ms),
            "samples_ms": ms}  # fmt: skip


def time_round_robin(functions: dict[str, Callable], warmup: int, repeats: int, device: torch.device) -> dict:
    """:func:`summarize` per function of ``repeats`` interleaved calls after ``warmup`` rounds, gc off."""
    cuda = device.type == "cuda"
    for function in [*functions.values()] * warmup:
        function()
    torch.cuda.synchronize(device) if cuda else gc.collect()
    marks: dict[str, list] = {name: [] for name in functions}
    gc.disable()
    try:
        for name, function in [*functions.items()] * repeats:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(), function(), end.record()
                marks[name].append((start, end))
            else:
                began = time.perf_counter()
                function()
                marks[name].append(time.perf_counter() - began)
    finally:
        gc.enable()
    if cuda:
        torch.cuda.synchronize(device)
        marks = {name: [s.elapsed_time(e) / 1000 for s, e in pairs] for name, pairs in marks.items()}
    return {name: summarize(seconds) for name, seconds in marks.items()}


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Indented JSON, non-finite floats as null, written atomically (folders created)."""
    return files.write_json(path, json.loads(json.dumps(payload), parse_constant=lambda _: None))


def cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "| --- |" + " ---: |" * (len(headers) - 1)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(path: Path, panels: Sequence[dict[str, Any]], title: str, payload: dict[str, Any]) -> Path:
    """Bar charts coloured by :func:`kind`, a panel each: a ``title`` and ``bars`` [(name, value)], ``xlabel``,
    maybe ``line`` (value, label), dashed; or ``series`` {name: values}, ``categories``, ``ylabel``."""
    plt = require_matplotlib("the benchmarks")
    names = list(dict.fromkeys(n for p in panels for n in (p["series"] if "series" in p else dict(p["bars"]))))
    palette, grouped, columns = colours(names), "series" in panels[0], min(2, len(panels))
    height = 3.4 if grouped else max(len(p["bars"]) for p in panels) * 0.32 + 1.2
    width = 6 * columns + 2.4 if grouped else 7.2 * columns
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width, height * rows + 0.8), squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, panel in zip(axes.flat, panels):
        axis.set_title(panel["title"], fontsize=9)
        if grouped:  # one group of vertical bars per category, a bar per series
            bar = 0.8 / len(panel["series"])
            for index, (name, values) in enumerate(panel["series"].items()):
                xs = [c + (index - (len(panel["series"]) - 1) / 2) * bar for c in range(len(panel["categories"]))]
                axis.bar(xs, [math.nan if v is None else v for v in values], bar, color=palette[name])
            axis.set_xticks(range(len(panel["categories"])), panel["categories"], fontsize=8)
            axis.set_ylabel(panel["ylabel"], fontsize=8)
            axis.grid(axis="y", alpha=0.3)
            continue
        labels, values = [n for n, _ in panel["bars"]], [math.nan if v is None else v for _, v in panel["bars"]]
        axis.barh(range(len(labels)), values, color=[palette[label] for label in labels])
        axis.set_yticks(range(len(labels)), labels, fontsize=8)
        axis.invert_yaxis()
        line = panel.get("line")
        top = max([v for v in values if math.isfinite(v)] + [line[0] if line else 0.0])
        for y, value in enumerate(values):
            if math.isfinite(value):
                axis.text(value + top * 0.01, y, cell(value), va="center", fontsize=7, backgroundcolor="white")
        if line:
            axis.axvline(line[0], color="black", linestyle="--", linewidth=1)
        axis.set_xlim(0, top * 1.18)
        axis.set_xlabel(panel["xlabel"] + (f"; dashed: {line[1]}, {cell(line[0])}" if line else ""), fontsize=8)
        axis.grid(axis="x", alpha=0.3)
    if grouped:
        handles = [plt.Rectangle((0, 0), 1, 1, color=palette[name], label=name) for name in names]
        fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    m = payload["machine"]
    source = f"{m['device_name']}, {m['torch_threads']} thread(s), torch {m['torch']}, {m['date'][:10]}"
    fig.suptitle(f"{title}\n{source}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / width if grouped else 1, 1 - 0.3 / (height * rows + 0.8)))  # room: title
    return save_figure(fig, path, dpi=110)


def export_reference_onnx(checkpoint: Path, path: Path) -> Path:
    """transformers' model from ``checkpoint`` as ONNX (fp32, dynamic batch and sequence axes)."""
    import transformers

    model = transformers.DistilBertForQuestionAnswering.from_pretrained(checkpoint, attn_implementation="eager")
    model.eval().config.return_dict = False  # a (start, end) tuple for the exporter
    names = ("input_ids", "attention_mask", "start_logits", "end_logits")
    ids = torch.ones(2, 16, dtype=torch.long)
    with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is the legacy one
        warnings.simplefilter("ignore")
        axes = {name: {0: "batch", 1: "seq"} for name in names}
        torch.onnx.export(model, (ids, torch.ones_like(ids)), str(path), input_names=names[:2], output_names=names[2:],
                          dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    return path


class Peer(torch.nn.Module):
    """A runtime with the ``config`` and ``device`` QuestionAnswerer reads (use it with ``packed=False``)."""

    def __init__(self, run: Callable[[dict], list], config: object = None) -> None:
        super().__init__()
        self.run, self.config, self.device = run, config, torch.device("cpu")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> SimpleNamespace:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        start, end = self.run({"input_ids": input_ids.cpu().numpy(), "attention_mask": mask.cpu().numpy()})
        return SimpleNamespace(start_logits=torch.from_numpy(start), end_logits=torch.from_numpy(end))


def load_peer(name: str, checkpoint: Path, onnx_path: Path, config: object = None) -> Peer:
    """A runtime of PEERS running the checkpoint's model, exported to ``onnx_path`` unless it is there:
    ONNX Runtime's CPU provider; OpenVINO's CPU plugin in float32 (else bfloat16 where the CPU has it)."""
    if not onnx_path.exists():
        export_reference_onnx(checkpoint, onnx_path)
    threads = torch.get_num_threads()
    if name == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        return Peer(lambda feed: session.run(["start_logits", "end_logits"], feed), config)
    import openvino

    hints = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    compiled = openvino.Core().compile_model(str(onnx_path), "CPU", hints)
    return Peer(lambda feed: [(out := compiled(feed))["start_logits"], out["end_logits"]], config)
