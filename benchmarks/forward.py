"""Forward-pass speed of distilqa's DistilBertForQuestionAnswering against transformers', ONNX Runtime
and OpenVINO.

All models hold the same weights: transformers' model is built with random weights at the
given configuration (the published one by default), saved with safetensors into a temporary
folder, and both libraries load that folder, in eval mode, timed under ``torch.inference_mode()``.
Each attention implementation (eager, sdpa) of each library is timed, interleaved round-robin
with the peers (transformers' model exported to ONNX and run by ONNX Runtime and by OpenVINO in
fp32, ``benchmarks/peers.py``) and with a matmul reference per GEMM library: the GEMMs of one
encoder layer (4 x 768x768, 1 x 768x3072, 1 x 3072x768, without bias: pure matrix products) at the
same M = batch * seq on the same threads, through ``F.linear`` (MKL for fp32 on the CPU) and
through oneDNN. The faster of the two is the practical limit of a forward pass on this machine.
Each forward's achieved GFLOP/s is reported, and as a fraction of that best reference.

FLOPs counted per forward: every linear layer 2*M*K*N (q, k, v, out, lin1, lin2 per layer, and
the qa head) plus attention's two batched matmuls 2 * 2*batch*heads*seq*seq*head_dim per layer.
Embeddings, LayerNorm, GELU, softmax and bias additions are not counted.

The inputs are random token ids and, per ``--masks``, an attention_mask of ones (``ones``)
or no mask (``none``), the same for every model. transformers skips an all-ones mask (it checks
``mask.all()`` and then passes no mask to the attention core); distilqa does the same.

    python benchmarks/forward.py --plot benchmarks/results/forward-cpu.png
    python benchmarks/forward.py --small            # a tiny model, to check the script works
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/forward.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
import torch.nn.functional as F

from benchmarks.common import (
    DTYPES,
    add_common_arguments,
    default_output,
    format_table,
    load_average,
    machine_info,
    paired_ratio,
    parse_pairs,
    plot_panels,
    setup,
    time_callables,
    window_flops,
    write_json,
)
from benchmarks.peers import PEERS, export_reference_onnx
from distilqa import DistilBertConfig, DistilBertForQuestionAnswering
from distilqa.linear import fastest_linear_backend, onednn_available, quantize_int8
from distilqa.testing import save_reference_checkpoint

DEFAULT_SHAPES = "1x128,1x384,8x384,32x128"
SMALL_SHAPES = "1x16,2x32"
SMALL_CONFIG = DistilBertConfig(
    vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=256, max_position_embeddings=64
)
MASKS = ("ones", "none")


# ---------------------------------------------------------------------------- models


def load_transformers(directory: Path, attn: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    model = transformers.DistilBertForQuestionAnswering.from_pretrained(
        directory, attn_implementation=attn, dtype=dtype
    )
    return model.to(device).eval()


def load_distilqa(directory: Path, attn: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return DistilBertForQuestionAnswering.from_pretrained(
        directory, attn_implementation=attn, device=device, dtype=dtype
    )


def load_distilqa_with(
    directory: Path, device: torch.device, dtype: torch.dtype, backend: str = "aten", int8: bool = False
) -> torch.nn.Module:
    """The sdpa model with its linear layers on ``backend`` (and int8-quantised with ``int8``)."""
    model = load_distilqa(directory, "sdpa", device, dtype)
    if int8:
        quantize_int8(model.distilbert.transformer)  # the layers; the small head stays float32
    else:
        model.set_linear_backend(backend)
    return model


def load_compiled(directory: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The sdpa model with ``compile_blocks()`` (dynamic shapes; parameters stay live, no freezing).
    Compilation happens on the first call: see first_call_ms."""
    model = load_distilqa(directory, "sdpa", device, dtype)
    model.compile_blocks()
    return model


def load_peer(name: str, directory: Path) -> torch.nn.Module:
    """A peer runtime on transformers' model exported once per run to ``directory/reference.onnx``."""
    onnx_path = directory / "reference.onnx"
    if not onnx_path.exists():
        export_reference_onnx(directory, onnx_path)
    return PEERS[name](onnx_path, torch.get_num_threads())


@dataclasses.dataclass(frozen=True)
class Variant:
    library: str  # "transformers", "distilqa", "onnxruntime" or "openvino"
    attn: str  # the attention core: "eager" or "sdpa"
    load: Callable[[Path, torch.device, torch.dtype], torch.nn.Module]
    compare_with: str  # the transformers variant its speed ratio is taken against
    description: str
    default: bool = True  # timed unless --variants names others
    cpu_only: bool = False
    fp32_only: bool = False


VARIANTS: dict[str, Variant] = {
    "transformers-eager": Variant(
        "transformers",
        "eager",
        lambda d, dev, dt: load_transformers(d, "eager", dev, dt),
        "transformers-eager",
        "transformers, attn_implementation='eager'",
    ),
    "transformers-sdpa": Variant(
        "transformers",
        "sdpa",
        lambda d, dev, dt: load_transformers(d, "sdpa", dev, dt),
        "transformers-sdpa",
        "transformers, attn_implementation='sdpa'",
    ),
    "onnxruntime": Variant(
        "onnxruntime",
        "onnx",
        lambda d, dev, dt: load_peer("onnxruntime", d),
        "onnxruntime",
        "transformers' model exported with torch.onnx.export, run by ONNX Runtime (CPU provider, fp32)",
        cpu_only=True,
        fp32_only=True,
    ),
    "openvino": Variant(
        "openvino",
        "onnx",
        lambda d, dev, dt: load_peer("openvino", d),
        "openvino",
        "the same ONNX file run by OpenVINO on the CPU in fp32 (INFERENCE_PRECISION_HINT=f32)",
        cpu_only=True,
        fp32_only=True,
    ),
    "distilqa-eager": Variant(
        "distilqa",
        "eager",
        lambda d, dev, dt: load_distilqa(d, "eager", dev, dt),
        "transformers-eager",
        "distilqa, attn_implementation='eager'",
    ),
    "distilqa-sdpa": Variant(
        "distilqa",
        "sdpa",
        lambda d, dev, dt: load_distilqa(d, "sdpa", dev, dt),
        "transformers-sdpa",
        "distilqa, attn_implementation='sdpa'",
    ),
    "distilqa-onednn": Variant(
        "distilqa",
        "sdpa",
        lambda d, dev, dt: load_distilqa_with(d, dev, dt, backend="onednn"),
        "transformers-sdpa",
        "distilqa sdpa with model.set_linear_backend('onednn'): fp32 GEMMs through oneDNN (what 'auto' picks "
        "where it is measured faster)",
        cpu_only=True,
    ),
    "distilqa-int8": Variant(
        "distilqa",
        "sdpa",
        lambda d, dev, dt: load_distilqa_with(d, dev, dt, int8=True),
        "transformers-sdpa",
        "distilqa sdpa with distilqa.linear.quantize_int8 on its layers: int8 dynamic quantisation of the linear "
        "layers (opt-in, CPU; approximate: see max_abs_logit_diff)",
        default=False,
        cpu_only=True,
        fp32_only=True,
    ),
    "distilqa-triton": Variant(
        "distilqa",
        "triton",
        lambda d, dev, dt: load_distilqa(d, "triton", dev, dt),
        "transformers-sdpa",
        "distilqa with attn_implementation='triton': the hand-written FlashAttention kernel (CUDA)",
        default=False,
    ),
    "distilqa-compile": Variant(
        "distilqa",
        "sdpa",
        load_compiled,
        "transformers-sdpa",
        "distilqa sdpa with model.compile_blocks(): torch.compile of each block, dynamic shapes (opt-in; "
        "compile time in first_call_ms)",
        default=False,
    ),
}


# ---------------------------------------------------------------------------- FLOPs and the matmul reference


def layer_gemms(config: DistilBertConfig) -> list[tuple[int, int, int]]:
    """(K, N, count) of the linear layers of one encoder layer: q, k, v, out; lin1; lin2."""
    return [(config.dim, config.dim, 4), (config.dim, config.hidden_dim, 1), (config.hidden_dim, config.dim, 1)]


def forward_flops(config: DistilBertConfig, batch: int, seq: int) -> dict[str, int]:
    """FLOPs of one forward pass of ``batch`` windows of ``seq`` tokens (see common.window_flops)."""
    return {name: batch * flops for name, flops in window_flops(config, seq).items()}


def matmul_reference(
    config: DistilBertConfig, tokens: int, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Callable[[], object]], dict[str, int]]:
    """Callables running one layer's GEMMs at M=tokens, each returning nothing: ``"matmul"`` all of
    them in their per-layer proportions with F.linear, without bias (pure matrix products);
    ``"matmul onednn"`` the same through oneDNN (CPU fp32, where available); ``"matmul+bias"`` the
    F.linear one with bias, as the model's layers do; and ``"gemm KxN"`` each shape alone with
    F.linear, without bias. Returns them and their FLOPs."""
    generator = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    inputs = {k: randn(tokens, k) for k in {k for k, _, _ in layer_gemms(config)}}
    weights = {(k, n): (randn(n, k) * k**-0.5, randn(n)) for k, n, _ in layer_gemms(config)}

    def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    def gemms(shapes: list[tuple[int, int, int]], bias: bool, linear: Callable = F.linear) -> Callable[[], object]:
        work = [(inputs[k], weights[(k, n)][0], weights[(k, n)][1] if bias else None, count) for k, n, count in shapes]

        def run() -> None:
            for x, w, b, count in work:
                for _ in range(count):
                    linear(x, w, b)

        return run

    functions = {"matmul": gemms(layer_gemms(config), bias=False), "matmul+bias": gemms(layer_gemms(config), bias=True)}
    per_layer = sum(2 * tokens * k * n * c for k, n, c in layer_gemms(config))
    flops = {"matmul": per_layer, "matmul+bias": per_layer}
    if device.type == "cpu" and dtype == torch.float32 and onednn_available():
        functions["matmul onednn"] = gemms(layer_gemms(config), bias=False, linear=onednn_linear)
        flops["matmul onednn"] = per_layer
    functions.update({f"gemm {k}x{n}": gemms([(k, n, 1)], bias=False) for k, n, _ in layer_gemms(config)})
    flops.update({f"gemm {k}x{n}": 2 * tokens * k * n for k, n, _ in layer_gemms(config)})
    return functions, flops


# ---------------------------------------------------------------------------- the run


def start_logits(output: Any) -> torch.Tensor:
    return output.start_logits if hasattr(output, "start_logits") else output[0]


def end_logits(output: Any) -> torch.Tensor:
    return output.end_logits if hasattr(output, "end_logits") else output[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype_names = setup(args)
    config = SMALL_CONFIG if args.small else DistilBertConfig()
    shapes = parse_pairs(args.shapes or (SMALL_SHAPES if args.small else DEFAULT_SHAPES))
    masks = list(MASKS) if args.masks == "both" else [args.masks]
    names = args.variants.split(",") if args.variants else [n for n, v in VARIANTS.items() if v.default]
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    for name in names:  # every ratio needs its transformers counterpart
        if VARIANTS[name].compare_with not in names:
            names.append(VARIANTS[name].compare_with)
    names = [n for n in VARIANTS if n in names]
    for _, seq in shapes:
        if seq > config.max_position_embeddings:
            raise SystemExit(f"seq {seq} is longer than the model's {config.max_position_embeddings} positions")

    payload: dict[str, Any] = {
        "benchmark": "forward",
        "machine": machine_info(device),
        "settings": {
            "config": dataclasses.asdict(config),
            "small": args.small,
            "shapes": [list(s) for s in shapes],
            "dtypes": dtype_names,
            "masks": masks,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "retries": args.retries,
            "max_other_load": args.max_other_load,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "variants": {n: VARIANTS[n].description for n in names},
            "timing": "interleaved round-robin over the variants and the matmul reference; "
            + ("CUDA events" if device.type == "cuda" else "time.perf_counter")
            + "; torch.inference_mode(); eval mode",
            "flops": "linear layers 2*M*K*N (M = batch*seq) + attention 2*2*batch*heads*seq*seq*head_dim "
            "per layer, + the qa head; LayerNorm, GELU, softmax, embeddings not counted",
            "matmul_reference": "torch.nn.functional.linear without bias (pure GEMM; 'with_bias': the same "
            "with bias, as the model's layers) at M = batch*seq, per encoder layer: "
            + ", ".join(f"{c} x {k}x{n}" for k, n, c in layer_gemms(config)),
            "speedup": "time of the transformers variant / time of the distilqa variant, medians of the same run "
            "(> 1: distilqa is faster); speedup_vs_strongest_peer: the same against the fastest non-distilqa "
            "variant of that shape (transformers, ONNX Runtime, OpenVINO)",
            "linear_backend_auto": fastest_linear_backend() if device.type == "cpu" else "aten",
        },
        "results": [],
        "matmul": [],
        "ratios": [],
        "skipped": [],
        "profiles": [],
    }
    with tempfile.TemporaryDirectory(prefix="distilqa-bench-") as tmp:
        checkpoint = Path(save_reference_checkpoint(Path(tmp), config))
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            models = {}
            for name in names:
                variant = VARIANTS[name]
                if (variant.cpu_only and device.type != "cpu") or (variant.fp32_only and dtype != torch.float32):
                    payload["skipped"].append({"variant": name, "dtype": dtype_name, "why": "CPU fp32 only"})
                    continue
                try:
                    models[name] = variant.load(checkpoint, device, dtype)
                except (RuntimeError, ValueError, NotImplementedError) as error:
                    payload["skipped"].append({"variant": name, "dtype": dtype_name, "why": str(error)[:300]})
            for batch, seq in shapes:
                run_shape(payload, config, models, device, dtype_name, batch, seq, masks, args)
    payload["machine"]["load_average_at_end"] = load_average()
    return payload


def run_shape(
    payload: dict[str, Any],
    config: DistilBertConfig,
    models: dict[str, torch.nn.Module],
    device: torch.device,
    dtype_name: str,
    batch: int,
    seq: int,
    masks: list[str],
    args: argparse.Namespace,
) -> None:
    generator = torch.Generator().manual_seed(batch * 100003 + seq)
    input_ids = torch.randint(1, config.vocab_size, (batch, seq), generator=generator).to(device)
    ones = torch.ones(batch, seq, dtype=torch.long, device=device)
    flops = forward_flops(config, batch, seq)
    reference, reference_flops = matmul_reference(config, batch * seq, device, DTYPES[dtype_name])

    with torch.inference_mode():
        baseline_name = "transformers-eager" if "transformers-eager" in models else next(iter(models))
        outputs, first_call_ms = {}, {}
        for name, model in list(models.items()):  # the first call of each shape (torch.compile compiles here)
            begin = time.perf_counter()
            try:
                got = model(input_ids=input_ids, attention_mask=ones)
            except (RuntimeError, ValueError, NotImplementedError) as error:  # e.g. a kernel missing for a dtype
                payload["skipped"].append(
                    {"variant": name, "dtype": dtype_name, "batch": batch, "seq": seq, "why": str(error)[:300]}
                )
                del models[name]  # for the following shapes too
                continue
            first_call_ms[name] = 1000 * (time.perf_counter() - begin)
            outputs[name] = (start_logits(got).float(), end_logits(got).float())
        if baseline_name not in outputs:
            baseline_name = next(iter(outputs))
        deviations = {
            name: max((a - b).abs().max().item() for a, b in zip(output, outputs[baseline_name]))
            for name, output in outputs.items()
        }
        for mask in masks:
            attention_mask = ones if mask == "ones" else None
            functions: dict[str, Callable[[], object]] = {
                name: (lambda m=model, a=attention_mask: m(input_ids=input_ids, attention_mask=a))
                for name, model in models.items()
            }
            functions.update(reference)
            print(
                f"[forward] {dtype_name} batch={batch} seq={seq} mask={mask}: timing {len(functions)} cases", flush=True
            )
            timings = time_callables(functions, args.warmup, args.repeats, device, args.retries, args.max_other_load)

            matmul_flops = reference_flops["matmul"]
            library_gflops = {
                name: matmul_flops / (timings[name]["median_ms"] / 1000) / 1e9
                for name in ("matmul", "matmul onednn")
                if name in timings
            }
            best_matmul = max(library_gflops, key=library_gflops.get)  # the fastest GEMM library here
            matmul_gflops = library_gflops[best_matmul]
            payload["matmul"].append(
                {
                    "batch": batch,
                    "seq": seq,
                    "M": batch * seq,
                    "dtype": dtype_name,
                    "mask": mask,
                    "gflop": matmul_flops / 1e9,
                    "timing": timings[best_matmul],
                    "gflop_per_s": matmul_gflops,
                    "best_library": "onednn" if best_matmul == "matmul onednn" else "F.linear",
                    "gflop_per_s_by_library": {
                        "onednn" if name == "matmul onednn" else "F.linear": value
                        for name, value in library_gflops.items()
                    },
                    "with_bias": {
                        "timing": timings["matmul+bias"],
                        "gflop_per_s": matmul_flops / (timings["matmul+bias"]["median_ms"] / 1000) / 1e9,
                    },
                    "gemms": [
                        {
                            "K": k,
                            "N": n,
                            "count_per_layer": count,
                            "timing": timings[f"gemm {k}x{n}"],
                            "gflop_per_s": reference_flops[f"gemm {k}x{n}"]
                            / (timings[f"gemm {k}x{n}"]["median_ms"] / 1000)
                            / 1e9,
                        }
                        for k, n, count in layer_gemms(config)
                    ],
                }
            )
            for name in models:
                timing, variant = timings[name], VARIANTS[name]
                gflop_per_s = flops["total"] / (timing["median_ms"] / 1000) / 1e9
                payload["results"].append(
                    {
                        "batch": batch,
                        "seq": seq,
                        "dtype": dtype_name,
                        "mask": mask,
                        "variant": name,
                        "library": variant.library,
                        "attn": variant.attn,
                        "timing": timing,
                        "gflop": flops["total"] / 1e9,
                        "gflop_linear": flops["linear"] / 1e9,
                        "gflop_attention": flops["attention"] / 1e9,
                        "gflop_per_s": gflop_per_s,
                        "fraction_of_matmul": gflop_per_s / matmul_gflops,
                        # the same, from each round's own times: median of (t_matmul / t_forward) * flop ratio
                        "fraction_of_matmul_paired": paired_ratio(timings[best_matmul], timing)
                        * flops["total"]
                        / matmul_flops,
                        "first_call_ms": first_call_ms[name],
                        "max_abs_logit_diff": deviations[name],
                        "logit_diff_reference": baseline_name,
                    }
                )
            peers = [name for name in models if VARIANTS[name].library != "distilqa"]
            strongest = min(peers, key=lambda name: timings[name]["median_ms"]) if peers else None
            for name in models:
                other = VARIANTS[name].compare_with
                if VARIANTS[name].library != "distilqa" or other not in timings:
                    continue
                payload["ratios"].append(
                    {
                        "batch": batch,
                        "seq": seq,
                        "dtype": dtype_name,
                        "mask": mask,
                        "distilqa": name,
                        "transformers": other,
                        "speedup": timings[other]["median_ms"] / timings[name]["median_ms"],
                        "speedup_of_min": timings[other]["min_ms"] / timings[name]["min_ms"],
                        "speedup_paired": paired_ratio(timings[other], timings[name]),
                        "strongest_peer": strongest,
                        "speedup_vs_strongest_peer": timings[strongest]["median_ms"] / timings[name]["median_ms"],
                        "speedup_vs_strongest_peer_paired": paired_ratio(timings[strongest], timings[name]),
                    }
                )
        if args.profile and device.type == "cpu":
            for name, model in models.items():
                if VARIANTS[name].attn == "sdpa":
                    breakdown = profile_breakdown(lambda m=model: m(input_ids=input_ids, attention_mask=ones))
                    payload["profiles"].append(
                        {"batch": batch, "seq": seq, "dtype": dtype_name, "variant": name, **breakdown}
                    )


# Which operators count as what in a profile (self CPU time on the calling thread, i.e. wall time).
# "gemm" is the linear layers' matrix products; "copies" includes the bias broadcast F.linear does
# before its addmm; "adds" the residual additions.
PROFILE_CATEGORIES = {
    "gemm": ("aten::addmm", "aten::mm", "quantized::linear_dynamic", "mkl::_mkl_linear", "mkldnn::_linear_pointwise"),
    "attention": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::bmm",
        "aten::_softmax",
        "aten::masked_fill",
        "aten::baddbmm",
        "aten::_safe_softmax",
    ),
    "LayerNorm": ("aten::native_layer_norm",),
    "GELU": ("aten::gelu", "aten::gelu_"),
    "adds": ("aten::add", "aten::add_"),
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous"),
}


def profile_breakdown(call: Callable[[], object], repeats: int = 2) -> dict[str, Any]:
    """Where one forward's time goes: torch.profiler self CPU time per operator (per forward) and
    grouped by PROFILE_CATEGORIES (what is left is "other")."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(repeats):
            call()
    events = [(e.key, e.self_cpu_time_total / 1000 / repeats) for e in profiler.key_averages()]
    total = sum(ms for _, ms in events)
    categories = {category: 0.0 for category in [*PROFILE_CATEGORIES, "other"]}
    for key, ms in events:
        category = next((c for c, ops in PROFILE_CATEGORIES.items() if key in ops), "other")
        categories[category] += ms
    events.sort(key=lambda item: -item[1])
    return {
        "profiled_ms_per_forward": total,
        "categories": {c: {"ms": ms, "share": ms / total} for c, ms in categories.items()},
        "top_ops": [{"op": key, "ms": ms, "share": ms / total} for key, ms in events[:10]],
    }


# ---------------------------------------------------------------------------- reporting


def _load_note(timing: dict[str, Any]) -> str:
    if timing.get("other_load") is None:
        return ""
    return f"(other processes: {100 * timing['other_load']:.0f}% of the CPUs; attempt {timing['attempts']})"


def report(payload: dict[str, Any]) -> str:
    machine, settings = payload["machine"], payload["settings"]
    lines = [
        f"distilqa vs transformers forward, {machine['device_name']} ({machine['device']}), "
        f"{settings['threads']} threads, torch {machine['torch']}, transformers {machine['transformers']}; "
        f"median of {settings['repeats']} after {settings['warmup']} warm-up; load average "
        f"{machine['load_average_at_start']} -> {machine.get('load_average_at_end')}",
    ]
    speedups = {(r["batch"], r["seq"], r["dtype"], r["mask"], r["distilqa"]): r for r in payload["ratios"]}
    rows = []
    for m in payload["matmul"]:  # one block per (shape, dtype, mask), ending with its matmul reference
        key = (m["batch"], m["seq"], m["dtype"], m["mask"])
        shape = f"{m['batch']}x{m['seq']}"
        for r in payload["results"]:
            if (r["batch"], r["seq"], r["dtype"], r["mask"]) != key:
                continue
            t, ratio = r["timing"], speedups.get((*key, r["variant"]))
            rows.append(
                [
                    shape,
                    r["dtype"],
                    r["mask"],
                    r["variant"],
                    t["median_ms"],
                    t["min_ms"],
                    t["max_ms"],
                    t["iqr_ms"],
                    r["gflop_per_s"],
                    f"{100 * r['fraction_of_matmul']:.1f}%",
                    f"{100 * r['fraction_of_matmul_paired']:.1f}%",
                    f"{ratio['speedup']:.3f}x" if ratio else "",
                    f"{ratio['speedup_paired']:.3f}x" if ratio else "",
                    ratio["transformers"] if ratio else "",
                    f"{ratio['speedup_vs_strongest_peer']:.3f}x {ratio['strongest_peer']}" if ratio else "",
                    f"{r['max_abs_logit_diff']:.1e}",
                ]
            )
        t = m["timing"]
        rows.append(
            [
                shape,
                m["dtype"],
                m["mask"],
                "matmul reference",
                t["median_ms"],
                t["min_ms"],
                t["max_ms"],
                t["iqr_ms"],
                m["gflop_per_s"],
                "100%",
                "100%",
                "",
                "",
                m["best_library"],
                "",
                _load_note(t),
            ]
        )
    headers = [
        "shape",
        "dtype",
        "mask",
        "variant",
        "median ms",
        "min ms",
        "max ms",
        "IQR ms",
        "GFLOP/s",
        "of matmul",
        "(paired)",
        "speedup",
        "(paired)",
        "speedup = time of",
        "vs fastest peer",
        "logit diff",
    ]
    lines.append(format_table(headers, rows))
    lines.append(
        "GFLOP/s counts linear layers and attention matmuls; 'of matmul' divides by the throughput of the "
        "fastest GEMM library (F.linear or oneDNN) at "
        "the model's own GEMM shapes, measured interleaved in the same run (matmul reference rows).\n"
        "speedup = transformers' median / distilqa's median (> 1: distilqa faster); '(paired)' columns: the "
        "median over rounds of the same ratio taken within each round (robust to load that comes and goes)."
    )
    if any(r["variant"] == "distilqa-int8" for r in payload["results"]):
        lines.append("distilqa-int8 computes in int8: its 'of matmul' is relative to the fp32 reference, not a limit.")
    if payload["profiles"]:
        lines.append("\nwhere the time goes (torch.profiler, self time per forward, mask of ones):")
        names = list(payload["profiles"][0]["categories"])
        rows = [
            [
                f"{p['batch']}x{p['seq']}",
                p["variant"],
                p["profiled_ms_per_forward"],
                *(f"{100 * p['categories'][n]['share']:.1f}%" for n in names),
            ]
            for p in payload["profiles"]
        ]
        lines.append(format_table(["shape", "variant", "ms", *names], rows))
    if payload["skipped"]:
        lines.append("skipped: " + "; ".join(f"{s['variant']} {s['dtype']}: {s['why']}" for s in payload["skipped"]))
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Per dtype and mask: achieved GFLOP/s of the fp32-exact variants beside the matmul reference,
    and every distilqa variant's speedup over its transformers counterpart."""

    def by_shape(rows: list[dict], shapes: list[tuple[int, int]], value: Callable[[dict], float]) -> list:
        found = {(r["batch"], r["seq"]): r for r in rows}
        return [value(found[s]) if s in found else None for s in shapes]

    panels = []
    for dtype, mask in dict.fromkeys((r["dtype"], r["mask"]) for r in payload["results"]):
        results = [r for r in payload["results"] if (r["dtype"], r["mask"]) == (dtype, mask)]
        shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in results))
        categories = [f"{b}x{s}" for b, s in shapes]
        series: dict[str, tuple[list, list | None, list | None]] = {}
        for name in dict.fromkeys(r["variant"] for r in results):
            if name == "distilqa-int8":  # different arithmetic: only in the speedup panel
                continue
            rows = [r for r in results if r["variant"] == name]
            series[name] = (
                by_shape(rows, shapes, lambda r: r["gflop_per_s"]),
                by_shape(rows, shapes, lambda r: r["gflop"] / (r["timing"]["q3_ms"] / 1000)),
                by_shape(rows, shapes, lambda r: r["gflop"] / (r["timing"]["q1_ms"] / 1000)),
            )
        matmul = [m for m in payload["matmul"] if (m["dtype"], m["mask"]) == (dtype, mask)]
        series["matmul reference (fastest GEMM library)"] = (
            by_shape(matmul, shapes, lambda m: m["gflop_per_s"]),
            by_shape(matmul, shapes, lambda m: m["gflop"] / (m["timing"]["q3_ms"] / 1000)),
            by_shape(matmul, shapes, lambda m: m["gflop"] / (m["timing"]["q1_ms"] / 1000)),
        )
        panels.append(
            {
                "title": f"{dtype}, attention_mask={mask}: achieved GFLOP/s (whiskers: IQR)",
                "categories": categories,
                "series": series,
            }
        )
        ratios = [r for r in payload["ratios"] if (r["dtype"], r["mask"]) == (dtype, mask)]
        speedups = {
            f"{name} / {next(r['transformers'] for r in ratios if r['distilqa'] == name)}": (
                by_shape([r for r in ratios if r["distilqa"] == name], shapes, lambda r: r["speedup"]),
                None,
                None,
            )
            for name in dict.fromkeys(r["distilqa"] for r in ratios)
        }
        panels.append(
            {
                "title": f"{dtype}, attention_mask={mask}: speedup over transformers (medians)",
                "categories": categories,
                "series": speedups,
                "ylabel": "speedup (x)",
                "hline": 1.0,
            }
        )
    machine = payload["machine"]
    title = f"DistilBERT QA forward, {machine['device_name']}, {payload['settings']['threads']} threads"
    return plot_panels(path, panels, "achieved GFLOP/s", title)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, default_repeats=10, default_warmup=2, load_control=True)
    parser.add_argument(
        "--shapes", default=None, help=f"batch x seq list (default {DEFAULT_SHAPES}; --small {SMALL_SHAPES})"
    )
    parser.add_argument(
        "--masks",
        choices=["ones", "none", "both"],
        default="both",
        help="attention_mask given to every model: a tensor of ones, None, or both in turn",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma list of {', '.join(VARIANTS)} (default: {', '.join(n for n, v in VARIANTS.items() if v.default)})",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="CPU: also record where each sdpa variant's time goes (torch.profiler), per shape",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    payload = run(args)
    output = args.output or default_output("forward", torch.device(args.device))
    write_json(output, payload)
    print(report(payload))
    print(f"wrote {output}")
    if args.plot:
        print(f"wrote {plot(payload, args.plot)}")
    return payload


if __name__ == "__main__":
    main()
