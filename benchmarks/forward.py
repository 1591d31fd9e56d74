"""Forward-pass speed of distilqa's model in each mode beside transformers, ONNX Runtime and OpenVINO.

Every variant (one row of VARIANTS: a name and how to build it) loads the same checkpoint, random
weights at the published configuration; the peers run it exported to ONNX. The variants of a shape
are timed round-robin with one encoder layer's GEMMs at M = batch * seq through each library
(``F.linear``, i.e. MKL for fp32 on the CPU, and oneDNN): the faster is the practical limit, and
each variant's GFLOP/s (``common.window_flops``) is also given as a fraction of it. Logits are
compared with transformers' eager model.

    python benchmarks/forward.py                    # writes benchmarks/results/forward-cpu.{json,png}
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

import torch

from benchmarks import common
from benchmarks.peers import load_peer
from distilqa import DistilBertConfig, DistilBertForQuestionAnswering
from distilqa.linear import fastest_linear_backend, quantize_int8, set_linear_backend
from distilqa.testing import save_reference_checkpoint

SHAPES, SMALL_SHAPES = "1x128,1x384,8x384,32x128", "1x16,2x32"
SMALL_CONFIG = DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=256)
Build = Callable[[Path, torch.device, torch.dtype], torch.nn.Module]


def transformers_model(attn: str) -> Build:
    def build(folder: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        import transformers

        model = transformers.DistilBertForQuestionAnswering.from_pretrained(
            folder, attn_implementation=attn, dtype=dtype
        )
        return model.to(device).eval()

    return build


def distilqa_model(attn: str = "sdpa", change: Callable[[torch.nn.Module], object] | None = None) -> Build:
    """distilqa's model with the ``attn`` core, then ``change`` applied to it (a switch of the one model)."""

    def build(folder: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        model = DistilBertForQuestionAnswering.from_pretrained(
            folder, attn_implementation=attn, device=device, dtype=dtype
        )
        if change is not None:
            change(model)
        return model

    return build


@dataclasses.dataclass(frozen=True)
class Variant:
    build: Build
    only: str = ""  # "cpu", "cuda": the only device it runs on
    fp32_only: bool = False
    default: bool = True  # timed unless --variants names others


def int8(model: DistilBertForQuestionAnswering) -> None:
    quantize_int8(model.distilbert.transformer)  # the encoder's linear layers; the span head stays fp32


# name -> how to build it. A new mode is one more row.
VARIANTS: dict[str, Variant] = {
    "transformers-eager": Variant(transformers_model("eager")),
    "transformers-sdpa": Variant(transformers_model("sdpa")),
    "onnxruntime": Variant(load_peer("onnxruntime"), only="cpu", fp32_only=True),
    "openvino": Variant(load_peer("openvino"), only="cpu", fp32_only=True),
    "distilqa-eager": Variant(distilqa_model("eager")),
    "distilqa-sdpa": Variant(distilqa_model("sdpa")),
    # oneDNN GEMMs without, then with, GELU fused into lin1 (the backend's default), then the oneDNN attention core
    "distilqa-onednn-unfused": Variant(
        distilqa_model("sdpa", lambda m: set_linear_backend(m, "onednn", fuse_activations=False)), only="cpu"
    ),
    "distilqa-onednn": Variant(distilqa_model("sdpa", lambda m: m.set_linear_backend("onednn")), only="cpu"),
    "distilqa-onednn-attn": Variant(distilqa_model("onednn", lambda m: m.set_linear_backend("onednn")), only="cpu"),
    # what QuestionAnswerer runs by default: each switch on "auto", the faster choice measured here
    "distilqa-auto": Variant(distilqa_model("auto", lambda m: m.set_linear_backend("auto")), only="cpu"),
    "distilqa-int8": Variant(distilqa_model("sdpa", int8), only="cpu", fp32_only=True, default=False),
    "distilqa-compile": Variant(distilqa_model("sdpa", lambda m: m.compile_blocks()), default=False),
    "distilqa-triton": Variant(distilqa_model("triton"), only="cuda", default=False),
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype_names = common.setup(args)
    config = SMALL_CONFIG if args.small else DistilBertConfig()
    shapes = common.parse_pairs(args.shapes or (SMALL_SHAPES if args.small else SHAPES))
    names = {None: [n for n, v in VARIANTS.items() if v.default], "all": list(VARIANTS)}.get(args.variants)
    names = names or args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    names = [n for n in VARIANTS if n in {*names, "transformers-eager", "transformers-sdpa"}]  # the references
    masks = args.masks.split(",")
    settings = {"config": dataclasses.asdict(config), "small": args.small, "shapes": [list(s) for s in shapes],
                "dtypes": dtype_names, "masks": masks, "repeats": args.repeats, "warmup": args.warmup,
                "threads": torch.get_num_threads(), "variants": names,
                "linear_backend_auto": fastest_linear_backend() if device.type == "cpu" else "aten"}  # fmt: skip
    machine = common.machine_info(device)
    payload = {"benchmark": "forward", "machine": machine, "settings": settings}
    payload |= {"results": [], "matmul": [], "profiles": [], "skipped": []}
    with tempfile.TemporaryDirectory(prefix="distilqa-bench-") as folder:
        save_reference_checkpoint(folder, config)
        for dtype_name in dtype_names:
            models = {}
            for name in names:
                variant = VARIANTS[name]
                if variant.only not in ("", device.type) or (variant.fp32_only and dtype_name != "fp32"):
                    continue
                try:
                    models[name] = variant.build(Path(folder), device, common.DTYPES[dtype_name])
                except (ImportError, RuntimeError, ValueError) as error:  # a runtime missing, a core off its device
                    payload["skipped"].append({"variant": name, "dtype": dtype_name, "why": str(error)[:300]})
            for batch, seq in shapes:
                for mask in masks:
                    run_shape(payload, config, models, device, dtype_name, batch, seq, mask, args)
    payload["machine"]["load_average_at_end"] = common.load_average()
    return payload


def run_shape(payload, config, models, device, dtype_name, batch, seq, mask, args) -> None:
    generator = torch.Generator().manual_seed(batch * 100003 + seq)
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=generator).to(device)
    attention_mask = torch.ones_like(ids) if mask == "ones" else None
    calls = {name: (lambda m=model: m(input_ids=ids, attention_mask=attention_mask)) for name, model in models.items()}
    logits, first_call_ms = {}, {}
    with torch.inference_mode():
        for name, call in calls.items():  # the first call (torch.compile compiles here)
            began = time.perf_counter()
            output = call()
            first_call_ms[name] = 1000 * (time.perf_counter() - began)
            logits[name] = torch.stack([output.start_logits.float(), output.end_logits.float()])
        gemms = common.gemm_reference(config, batch * seq, device, common.DTYPES[dtype_name])
        print(f"[forward] {dtype_name} {batch}x{seq} mask={mask}: timing {len(calls) + len(gemms)}", flush=True)
        timings = common.time_round_robin({**calls, **gemms}, args.warmup, args.repeats, device)
    layer_flops = sum(2 * batch * seq * k * n * c for k, n, c in common.layer_gemms(config))
    by_library = {g.removeprefix("gemm "): layer_flops / timings[g]["median_ms"] / 1e6 for g in gemms}
    best = max(by_library, key=by_library.get)
    case = {"batch": batch, "seq": seq, "dtype": dtype_name, "mask": mask}
    payload["matmul"].append(
        {**case, "gflop": layer_flops / 1e9, "timing": timings[f"gemm {best}"], "gflop_per_s": by_library[best],
         "best_library": best, "gflop_per_s_by_library": by_library}
    )  # fmt: skip
    flops = {k: batch * v for k, v in common.window_flops(config, seq).items()}
    for name in calls:
        gflop_per_s = flops["total"] / timings[name]["median_ms"] / 1e6
        payload["results"].append(
            {**case, "variant": name, "library": common.kind(name), "timing": timings[name],
             "gflop": flops["total"] / 1e9, "gflop_linear": flops["linear"] / 1e9,
             "gflop_attention": flops["attention"] / 1e9, "gflop_per_s": gflop_per_s,
             "fraction_of_matmul": gflop_per_s / by_library[best], "first_call_ms": first_call_ms[name],
             "max_abs_logit_diff": (logits[name] - logits["transformers-eager"]).abs().max().item()}
        )  # fmt: skip
    if args.profile and device.type == "cpu":
        for name in (n for n in calls if n.endswith(("sdpa", "onednn", "auto", "unfused", "attn"))):
            payload["profiles"].append({**case, "variant": name, **profile(calls[name])})


# Which operators count as what in a profile (self CPU time: wall time on the calling thread).
PROFILE_CATEGORIES = {
    "gemm": ("aten::addmm", "aten::mm", "quantized::linear_dynamic", "mkldnn::_linear_pointwise"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::_softmax",
                  "aten::masked_fill", "aten::baddbmm"),
    "LayerNorm": ("aten::native_layer_norm",),
    "GELU": ("aten::gelu",),
    "adds": ("aten::add", "aten::add_"),
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous"),
}  # fmt: skip


def profile(call: Callable[[], object], repeats: int = 2) -> dict[str, Any]:
    """Where one forward's time goes: torch.profiler self time, grouped by PROFILE_CATEGORIES."""
    from torch.profiler import ProfilerActivity

    with torch.inference_mode(), torch.profiler.profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(repeats):
            call()
    events = [(e.key, e.self_cpu_time_total / 1000 / repeats) for e in profiler.key_averages()]
    total = sum(ms for _, ms in events)
    shares = dict.fromkeys([*PROFILE_CATEGORIES, "other"], 0.0)
    for key, ms in events:
        shares[next((c for c, ops in PROFILE_CATEGORIES.items() if key in ops), "other")] += ms / total
    return {"profiled_ms_per_forward": total, "shares": shares}


def case_of(row: dict[str, Any]) -> tuple:
    return row["batch"], row["seq"], row["dtype"], row["mask"]


def table(payload: dict[str, Any]) -> str:
    """Median milliseconds per shape and variant, distilqa's best against transformers sdpa and the
    fastest peer, and the GEMM reference of each library."""
    results = payload["results"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    rows = []
    for m in payload["matmul"]:
        case = case_of(m)
        ms = {r["variant"]: r["timing"]["median_ms"] for r in results if case_of(r) == case}
        ours = min((v for v in ms if common.kind(v) == "distilqa" and v != "distilqa-int8"), key=ms.get)
        peers = [v for v in ms if common.kind(v) == "peer"]
        fastest_peer = min(peers, key=ms.get) if peers else None
        versus_peer = f"{ms[fastest_peer] / ms[ours]:.2f}x ({fastest_peer})" if fastest_peer else ""
        gemm = " / ".join(f"{g:.0f}" for g in m["gflop_per_s_by_library"].values())
        speedup = f"{ours}: {ms['transformers-sdpa'] / ms[ours]:.2f}x"
        mask = "" if payload["settings"]["masks"] == ["ones"] else f", mask {m['mask']}"
        shape = f"{m['batch']} x {m['seq']}{mask}"
        rows.append([shape, *(ms.get(v) for v in variants), speedup, versus_peer, gemm])
    libraries = " / ".join(payload["matmul"][0]["gflop_per_s_by_library"]) if payload["matmul"] else ""
    headers = ["batch x seq", *(f"{v} ms" for v in variants), "fastest fp32 distilqa vs transformers-sdpa",
               "vs fastest peer", f"GEMM GFLOP/s ({libraries})"]  # fmt: skip
    return common.markdown_table(headers, rows)


def profile_table(payload: dict[str, Any]) -> str:
    """Where the forward's time goes, per profiled shape and variant: shares of the profiled time."""
    rows = []
    for p in payload["profiles"]:
        shares = p.get("shares") or {c: v["share"] for c, v in p["categories"].items()}  # (older files)
        rows.append([f"{p['batch']} x {p['seq']}", p["variant"], *(f"{100 * v:.0f}%" for v in shares.values())])
    return common.markdown_table(["batch x seq", "variant", *shares], rows)


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Per shape: each variant's achieved GFLOP/s, the best GEMM library's rate as a dashed line."""
    panels = []
    for m in payload["matmul"]:
        case = case_of(m)
        rows = [r for r in payload["results"] if case_of(r) == case]
        panels.append(
            {"title": f"batch {m['batch']} x seq {m['seq']}, {m['dtype']}, attention_mask {m['mask']}",
             "xlabel": "achieved GFLOP/s (higher is faster)",
             "bars": [(r["variant"], r["gflop_per_s"]) for r in rows],
             "line": (m["gflop_per_s"], f"{m['dtype']} GEMM limit ({m['best_library']})")}
        )  # fmt: skip
    size = "a tiny random model" if payload["settings"]["small"] else "random weights at the published size"
    return common.figure(path, panels, f"DistilBERT QA forward pass, {size}", payload)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=None, help=f"batch x seq list (default {SHAPES}; --small {SMALL_SHAPES})")
    parser.add_argument("--masks", default="ones", help="comma list: ones (an attention_mask of ones), none")
    parser.add_argument("--variants", default=None, help=f"'all' or a comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--profile", action="store_true", help="CPU: also record where the time goes")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.script("forward", __doc__, options, run, table, plot, repeats=10, warmup=2, argv=argv)


if __name__ == "__main__":
    main()
