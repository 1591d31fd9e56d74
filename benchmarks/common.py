"""What the benchmark scripts share, one of each: the machine's description, the options every script
takes, the GEMM reference, round-robin timing (A, B, C, A, B, C, ...: load from other processes lands
on all alike, so ratios hold when absolute times wander), JSON, markdown tables and bar charts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from distilqa.config import DistilBertConfig
from distilqa.hardware import cpu_info, has_native_bfloat16
from distilqa.linear import onednn_available

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = Path(os.environ.get("DISTILQA_DATA", ROOT.parent / "shared" / "data"))
SQUAD_FILE = SHARED_DATA / "squad" / "dev-v1.1.json.zip"
VOCAB_FILE = SHARED_DATA / "vocab" / "bert-base-cased-vocab.txt"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# One colour family per kind of row, the same in every figure: distilqa blue, peer runtimes (and
# PyTorch's own SDPA backends) orange, the reference (transformers) grey.
FAMILIES = {"distilqa": "Blues", "peer": "Oranges", "reference": "Greys"}
PEERS = ("onnxruntime", "openvino")


def kind(name: str) -> str:
    """The colour family of a row named ``name`` ("distilqa ...", "transformers ...", a peer, sdpa-*)."""
    if name.startswith("transformers"):
        return "reference"
    if name.startswith(PEERS) or name.startswith("sdpa-"):
        return "peer"
    return "distilqa"


def colours(names: Sequence[str]) -> dict[str, Any]:
    """A colour per name: its kind's colormap, shades spread over the names of that kind."""
    import matplotlib

    result = {}
    for family, cmap in FAMILIES.items():
        members = [n for n in names if kind(n) == family]
        for index, name in enumerate(members):
            result[name] = matplotlib.colormaps[cmap](0.85 - 0.5 * index / max(1, len(members) - 1))
    return result


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


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
            "cuda": torch.version.cuda if cuda else None, "load_average_at_start": load_average()}  # fmt: skip


def script(name: str, doc: str, options: Callable, run: Callable, table: Callable, plot: Callable | None,
           repeats: int, warmup: int, argv: list[str] | None) -> dict[str, Any]:  # fmt: skip
    """What each script's ``main`` does: parse the common options and its own, measure, write the JSON
    (by default benchmarks/results/<name>-<device>.json), then print its table and draw its picture."""
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
    args = parser.parse_args(argv)
    payload = run(args)
    output = args.output or RESULTS / f"{name}{'-small' if args.small else ''}-{torch.device(args.device).type}.json"
    print(f"wrote {write_json(output, payload)}")
    print(table(payload))
    if plot is not None:
        print(f"wrote {plot(payload, args.plot or output.with_suffix('.png'))}")
    return payload


def setup(args: argparse.Namespace) -> tuple[torch.device, list[str]]:
    """Fix the thread count; resolve the device and dtype names of the common options."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    names = args.dtypes.split(",") if args.dtypes else (["fp32"] if device.type == "cpu" else list(DTYPES))
    if unknown := [name for name in names if name not in DTYPES]:
        raise SystemExit(f"unknown dtype(s) {', '.join(unknown)}; expected some of {', '.join(DTYPES)}")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    return device, names


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"1x128,8x384"`` -> [(1, 128), (8, 384)]."""
    pairs = []
    for item in text.split(","):
        first, _, second = item.strip().lower().partition("x")
        if not (first.isdigit() and second.isdigit() and int(first) > 0 and int(second) > 0):
            raise SystemExit(f"cannot read {item!r} as AxB with positive integers, e.g. 8x384")
        pairs.append((int(first), int(second)))
    return pairs


def window_flops(config: DistilBertConfig, length: int) -> dict[str, int]:
    """FLOPs of one window of ``length`` tokens: every linear layer 2*M*K*N (q, k, v, out, lin1, lin2
    per layer, and the span head) and attention's two matmuls 2*2*heads*L*L*head_dim per layer.
    Embeddings, LayerNorm, GELU, softmax and bias additions are not counted."""
    per_token = 2 * (4 * config.dim * config.dim + 2 * config.dim * config.hidden_dim)
    linear = config.n_layers * per_token * length + 2 * length * config.dim * 2
    attention = config.n_layers * 2 * 2 * config.n_heads * length * length * config.head_dim
    return {"linear": linear, "attention": attention, "total": linear + attention}


def layer_gemms(config: DistilBertConfig) -> list[tuple[int, int, int]]:
    """(K, N, count) of one encoder layer's linear layers: q, k, v, out; lin1; lin2."""
    return [(config.dim, config.dim, 4), (config.dim, config.hidden_dim, 1), (config.hidden_dim, config.dim, 1)]


def gemm_reference(config: DistilBertConfig, tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One encoder layer's GEMMs (no bias: pure matrix products) at M = ``tokens``, per library:
    {"gemm F.linear": fn, "gemm onednn": fn}. F.linear is MKL for fp32 on the CPU; the faster library
    is the practical limit of a forward pass."""
    generator = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    work = [(randn(tokens, k), randn(n, k), count) for k, n, count in layer_gemms(config)]
    libraries = {"F.linear": lambda x, w: torch.nn.functional.linear(x, w)}
    if device.type == "cpu" and dtype == torch.float32 and onednn_available():
        libraries["onednn"] = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    def run(linear: Callable) -> Callable[[], None]:
        return lambda: [linear(x, w) for x, w, count in work for _ in range(count)]

    return {f"gemm {name}": run(linear) for name, linear in libraries.items()}


def gemm_rates(config: DistilBertConfig, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """fp32 GFLOP/s of each library at the layer's GEMMs, the best over M = 384, 2048 and 3072 tokens
    (a window, the pipeline's CPU token cap, 8 windows)."""
    rates: dict[str, float] = {}
    for tokens in (384, 2048, 3072):
        flops = sum(2 * tokens * k * n * count for k, n, count in layer_gemms(config))
        timings = time_round_robin(gemm_reference(config, tokens, device, torch.float32), 1, repeats, device)
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


def time_round_robin(
    functions: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Time each function ``repeats`` times after ``warmup`` untimed rounds, interleaved round-robin,
    the garbage collector off. CPU: ``time.perf_counter``; CUDA: CUDA events, read after one final
    synchronisation. Returns :func:`summarize` per name."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        for function in functions.values():
            function()
    torch.cuda.synchronize(device) if cuda else gc.collect()
    marks: dict[str, list] = {name: [] for name in functions}
    gc.disable()
    try:
        for _ in range(repeats):
            for name, function in functions.items():
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


def clean(value: Any) -> Any:
    """``value`` for JSON: non-finite floats become null."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Indented JSON (non-finite floats become null), folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=2) + "\n", encoding="utf-8")
    return path


def cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "| --- |" + " ---: |" * (len(headers) - 1)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def caption(payload: dict[str, Any]) -> str:
    """Where a result comes from, for every figure: device, threads, torch version, date."""
    m = payload["machine"]
    return f"{m['device_name']}, {m['torch_threads']} thread(s), torch {m['torch']}, {m['date'][:10]}"


def figure(path: Path, panels: Sequence[dict[str, Any]], title: str, payload: dict[str, Any]) -> Path:
    """Bar charts, one panel each, coloured by :func:`kind` of each bar's name, titled with ``title``
    and :func:`caption`. A panel has a ``title`` and either

    - ``bars`` [(name, value)] and ``xlabel``: horizontal bars, each labelled with its name and value
      (no legend to decode), and optionally ``line`` (value, label), a dashed reference line; or
    - ``series`` {name: values per category}, ``categories`` and ``ylabel``: grouped vertical bars,
      with one legend for the figure, outside the panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        (vertical_bars if grouped else horizontal_bars)(axis, panel, palette)
    if grouped:
        handles = [matplotlib.patches.Patch(color=palette[name], label=name) for name in names]
        fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"{title}\n{caption(payload)}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / width if grouped else 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def horizontal_bars(axis: Any, panel: dict[str, Any], palette: dict[str, Any]) -> None:
    names, values = [n for n, _ in panel["bars"]], [math.nan if v is None else v for _, v in panel["bars"]]
    axis.barh(range(len(names)), values, color=[palette[name] for name in names])
    axis.set_yticks(range(len(names)), names, fontsize=8)
    axis.invert_yaxis()
    top = max([v for v in values if math.isfinite(v)] + [panel["line"][0] if "line" in panel else 0.0])
    for y, value in enumerate(values):
        if math.isfinite(value):
            axis.text(value + top * 0.01, y, cell(value), va="center", fontsize=7, backgroundcolor="white")
    line = panel.get("line")
    if line:
        axis.axvline(line[0], color="black", linestyle="--", linewidth=1)
    axis.set_xlim(0, top * 1.18)
    axis.set_xlabel(panel["xlabel"] + (f"; dashed: {line[1]}, {cell(line[0])}" if line else ""), fontsize=8)
    axis.grid(axis="x", alpha=0.3)


def vertical_bars(axis: Any, panel: dict[str, Any], palette: dict[str, Any]) -> None:
    width = 0.8 / len(panel["series"])
    for index, (name, values) in enumerate(panel["series"].items()):
        xs = [c + (index - (len(panel["series"]) - 1) / 2) * width for c in range(len(panel["categories"]))]
        axis.bar(xs, [math.nan if v is None else v for v in values], width, color=palette[name])
    axis.set_xticks(range(len(panel["categories"])), panel["categories"], fontsize=8)
    axis.set_ylabel(panel["ylabel"], fontsize=8)
    axis.grid(axis="y", alpha=0.3)
