"""Helpers shared by the benchmark scripts, one of each: the machine's description, command-line
options every script takes, timing, JSON output, tables and plots.

Timing interleaves the things compared (round-robin: A, B, C, A, B, C, ...) instead of timing
each in its own block, so that load from other processes on a shared machine lands on all of
them alike and the ratios between them stay meaningful even when absolute times wander.
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

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------- the machine


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine shows here."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell where and how a result was measured."""
    import transformers

    cpu = cpu_info()
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu["model"],
        "cpu_flags": [flag for flag, present in cpu["isa"].items() if present],
        "isa": cpu["isa"],
        "native_bfloat16": has_native_bfloat16(device),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": cpu["model"],
        "load_average_at_start": load_average(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


# ---------------------------------------------------------------------------- command line


def add_common_arguments(
    parser: argparse.ArgumentParser,
    default_repeats: int,
    default_warmup: int,
    plot_default: str = "no plot",
    load_control: bool = False,
) -> None:
    """Options every benchmark script takes; with ``load_control``, also --max-other-load and
    --retries for scripts that time with :func:`time_callables`."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument(
        "--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default: fp32 on CPU, all on CUDA)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all usable cores)")
    parser.add_argument("--repeats", type=int, default=default_repeats, help="timed runs of each case")
    parser.add_argument("--warmup", type=int, default=default_warmup, help="untimed runs of each case first")
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check that the script works")
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON path (default benchmarks/results/<name>-<device>.json)"
    )
    parser.add_argument("--plot", type=Path, default=None, help=f"PNG path for a plot (default: {plot_default})")
    if not load_control:
        return
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.15,
        help="time a block again when other processes used more than this share of the CPUs meanwhile",
    )
    parser.add_argument("--retries", type=int, default=2, help="at most this many re-timings of a disturbed block")


def setup(args: argparse.Namespace) -> tuple[torch.device, list[str]]:
    """Fix the thread count and resolve the device and dtypes of the parsed common options."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    names = args.dtypes.split(",") if args.dtypes else (["fp32"] if device.type == "cpu" else list(DTYPES))
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown dtype(s) {', '.join(unknown)}; expected some of {', '.join(DTYPES)}")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    return device, names


def default_output(name: str, device: torch.device) -> Path:
    return RESULTS_DIR / f"{name}-{device.type}.json"


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"1x128,8x384"`` -> [(1, 128), (8, 384)]."""
    pairs = []
    for item in text.split(","):
        first, _, second = item.strip().lower().partition("x")
        if not first.isdigit() or not second.isdigit() or int(first) < 1 or int(second) < 1:
            raise SystemExit(f"cannot read {item!r} as AxB with positive integers, e.g. 8x384")
        pairs.append((int(first), int(second)))
    return pairs


# ---------------------------------------------------------------------------- work


def window_flops(config: DistilBertConfig, length: int) -> dict[str, int]:
    """FLOPs of one window of ``length`` tokens through the model: every linear layer 2*M*K*N (q, k,
    v, out, lin1, lin2 per layer, and the qa head) and attention's two matmuls 2*2*heads*L*L*head_dim
    per layer. Embeddings, LayerNorm, GELU, softmax and bias additions are not counted."""
    per_token = 2 * (4 * config.dim * config.dim + 2 * config.dim * config.hidden_dim)
    linear = config.n_layers * per_token * length + 2 * length * config.dim * 2
    attention = config.n_layers * 2 * 2 * config.n_heads * length * length * config.head_dim
    return {"linear": linear, "attention": attention, "total": linear + attention}


# ---------------------------------------------------------------------------- timing


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median, spread and count of a list of durations, in milliseconds."""
    ms = sorted(1000.0 * s for s in seconds)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "mean_ms": statistics.fmean(ms),
        "repeats": len(ms),
    }


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far; None off Linux."""
    try:
        import resource

        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except (ImportError, OSError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OtherLoad:
    """Measures the share of the machine's CPU time that *other* processes used between ``start()``
    and ``stop()`` (0: none, 1: every core busy with other work); None where /proc/stat is missing."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()

    def stop(self) -> float | None:
        now = _cpu_seconds()
        if self.cpu is None or now is None:
            return None
        wall = max(time.perf_counter() - self.wall, 1e-9)
        others = (now[0] - self.cpu[0]) - (now[1] - self.cpu[1])
        return min(1.0, max(0.0, others / (wall * _usable_cores())))


def wait_for_idle(max_seconds: float, threshold: float, window: float = 2.0) -> float | None:
    """Sleep in ``window``-second steps until other processes use less than ``threshold`` of the
    machine (or ``max_seconds`` pass); returns the last measured share."""
    load, deadline = None, time.monotonic() + max_seconds
    while True:
        meter = OtherLoad()
        meter.start()
        time.sleep(window)
        load = meter.stop()
        if load is None or load < threshold or time.monotonic() >= deadline:
            return load


def time_callables(
    functions: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: torch.device,
    retries: int = 0,
    max_other_load: float = 1.0,
) -> dict[str, dict[str, Any]]:
    """Time each function ``repeats`` times after ``warmup`` untimed calls, interleaved round-robin.

    CPU: ``time.perf_counter`` around each call. CUDA: a pair of CUDA events around each call
    (the GPU time between them), read after one synchronisation at the end.

    On a shared machine other processes can take the cores mid-measurement; the share of the CPU
    they used during the timed rounds is measured (``other_load``). When it exceeds
    ``max_other_load``, the block is timed again (after waiting up to a minute for the machine to
    quieten), up to ``retries`` times, keeping the least disturbed attempt.

    Returns, by name, :func:`summarize` of the durations plus ``samples_ms`` (each round's time, in
    round order, so rounds can be paired across functions), ``other_load`` and ``attempts``.
    """
    best: dict[str, dict[str, Any]] | None = None
    for attempt in range(1, retries + 2):
        timings = _time_round_robin(functions, warmup, repeats, device)
        load = next(iter(timings.values()))["other_load"] if timings else None
        if best is None or (load is not None and load < best[next(iter(best))]["other_load"]):
            best = timings
        if load is None or load <= max_other_load or attempt == retries + 1:
            break
        wait_for_idle(60.0, max_other_load)
    for stats in best.values():
        stats["attempts"] = attempt
    return best


def _time_round_robin(
    functions: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    cuda = device.type == "cuda"
    for _ in range(warmup):
        for function in functions.values():
            function()
    if cuda:
        torch.cuda.synchronize(device)
    durations: dict[str, list] = {name: [] for name in functions}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    meter = OtherLoad()
    meter.start()
    try:
        for _ in range(repeats):
            for name, function in functions.items():
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    function()
                    end.record()
                    durations[name].append((start, end))
                else:
                    begin = time.perf_counter()
                    function()
                    durations[name].append(time.perf_counter() - begin)
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        if gc_was_enabled:
            gc.enable()
    other_load = meter.stop()
    if cuda:
        durations = {name: [s.elapsed_time(e) / 1000.0 for s, e in pairs] for name, pairs in durations.items()}
    return {
        name: {**summarize(seconds), "samples_ms": [1000.0 * t for t in seconds], "other_load": other_load}
        for name, seconds in durations.items()
    }


def paired_ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float:
    """Median over rounds of numerator time / denominator time, pairing the calls made in the same
    round of :func:`time_callables`: less sensitive to load that comes and goes than a ratio of medians."""
    return statistics.median(a / b for a, b in zip(numerator["samples_ms"], denominator["samples_ms"]))


# ---------------------------------------------------------------------------- output


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (non-finite floats become null), creating folders."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=2) + "\n", encoding="utf-8")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats are shown with 3 significant decimals of their magnitude."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if not math.isfinite(value):
                return "-"
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return "-" if value is None else str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in text]
    return "\n".join([line, rule, *body])


def plot_panels(path: Path, panels: Sequence[dict[str, Any]], ylabel: str, title: str, columns: int = 2) -> Path:
    """Grouped bar charts, one panel each. A panel is a dict with ``title``, ``categories`` (x tick
    labels) and ``series``: {legend name: (values, lower, upper)} where lower/upper are the error
    bar ends (or None); a value of None or NaN leaves a gap. Optional: ``ylabel`` (overrides the
    shared one), ``hline`` (a dashed horizontal reference line at that value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(len(panels) / columns))
    cols = min(columns, max(1, len(panels)))
    figure, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.8 * rows), squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, panel in zip(axes.flat, panels):
        categories, series = panel["categories"], panel["series"]
        width = 0.8 / max(1, len(series))
        for index, (name, (values, lower, upper)) in enumerate(series.items()):
            xs = [c + (index - (len(series) - 1) / 2) * width for c in range(len(categories))]
            heights = [math.nan if v is None else v for v in values]
            errors = None
            if lower is not None and upper is not None:
                errors = [
                    [0 if (v is None or lo is None) else max(0.0, v - lo) for v, lo in zip(values, lower)],
                    [0 if (v is None or hi is None) else max(0.0, hi - v) for v, hi in zip(values, upper)],
                ]
            axis.bar(xs, heights, width, yerr=errors, capsize=2, label=name)
        axis.set_xticks(range(len(categories)))
        axis.set_xticklabels(
            categories, rotation=30 if len(categories) > 4 else 0, ha="right" if len(categories) > 4 else "center"
        )
        axis.set_title(panel["title"], fontsize=10)
        axis.set_ylabel(panel.get("ylabel", ylabel))
        if "hline" in panel:
            axis.axhline(panel["hline"], color="gray", linestyle="--", linewidth=1)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
