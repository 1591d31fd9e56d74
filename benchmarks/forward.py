"""Forward-pass speed of distilqa's model in each mode of VARIANTS beside transformers and the peers (one
random-weight checkpoint), timed round-robin with one encoder layer's GEMMs at M = batch * seq through each
library, the faster being the practical limit. Logits are compared with transformers' eager model."""

import argparse
import dataclasses
import functools
import itertools
import operator
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: `benchmarks` importable

import torch

from benchmarks import common
from distilqa import DistilBertConfig, DistilBertForQuestionAnswering
from distilqa.linear import fastest_linear_backend, quantize_int8, set_linear_backend
from distilqa.testing import random_inputs, save_reference_checkpoint

SHAPES, SMALL_SHAPES = "1x128,1x384,8x384,32x128", "1x16,2x32"
SMALL_CONFIG = DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=256)
case_of = operator.itemgetter("batch", "seq", "dtype", "mask")  # a result's case


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: transformers' model, a peer runtime, or distilqa's with these switches, then ``change``."""

    library: str = "distilqa"  # or "transformers", or one of common.PEERS
    attn: str = "sdpa"
    backend: str = "aten"
    change: Callable | None = None
    only: str = ""  # "cpu", "cuda": the only device it runs on
    fp32_only: bool = False
    default: bool = True  # timed unless --variants names others

    def build(self, folder: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        if self.library in common.PEERS:
            return common.load_peer(self.library, folder, folder / "reference.onnx")
        if self.library == "transformers":
            from transformers import DistilBertForQuestionAnswering as Reference

            return Reference.from_pretrained(folder, attn_implementation=self.attn, dtype=dtype).to(device).eval()
        model = DistilBertForQuestionAnswering.from_pretrained(
            folder, device=device, dtype=dtype, attn_implementation=self.attn, linear_backend=self.backend
        )
        if self.change is not None:
            self.change(model)
        return model


# name -> how to build it. A new mode is one more row.
VARIANTS: dict[str, Variant] = {
    "transformers-eager": Variant("transformers", "eager"),
    "transformers-sdpa": Variant("transformers", "sdpa"),
    "onnxruntime": Variant("onnxruntime", only="cpu", fp32_only=True),
    "openvino": Variant("openvino", only="cpu", fp32_only=True),
    "distilqa-eager": Variant(attn="eager"),
    "distilqa-sdpa": Variant(),
    # oneDNN GEMMs without, then with, their post-ops fused (the backend's default: GELU into lin1, the residual
    # adds into out_lin and lin2), then the oneDNN attention core
    "distilqa-onednn-unfused": Variant(
        change=lambda m: set_linear_backend(m, "onednn", fuse_post_ops=False), only="cpu"
    ),
    "distilqa-onednn": Variant(backend="onednn", only="cpu"),
    "distilqa-onednn-attn": Variant(attn="onednn", backend="onednn", only="cpu"),
    # what QuestionAnswerer runs by default: each switch on "auto", the faster choice measured here
    "distilqa-auto": Variant(attn="auto", backend="auto", only="cpu"),
    # the encoder's linear layers quantised; the span head stays fp32
    "distilqa-int8": Variant(
        change=lambda m: quantize_int8(m.distilbert.transformer), only="cpu", fp32_only=True, default=False
    ),
    # oneDNN's int8 GEMM with the post-ops (what QuestionAnswerer's quantize="int8" runs on oneDNN)
    "distilqa-int8-onednn": Variant(
        change=lambda m: set_linear_backend(m.distilbert.transformer, "onednn-int8"),
        only="cpu",
        fp32_only=True,
        default=False,
    ),
    "distilqa-compile": Variant(change=lambda m: m.compile_blocks(), default=False),
    "distilqa-triton": Variant(attn="triton", only="cuda", default=False),
}


def run(args: argparse.Namespace, device: torch.device, dtype_names: list[str]) -> dict[str, Any]:
    config = SMALL_CONFIG if args.small else DistilBertConfig()
    shapes = common.parse_pairs(args.shapes or (SMALL_SHAPES if args.small else SHAPES))
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    names = [n for n in VARIANTS if n in {*names, "transformers-eager", "transformers-sdpa"}]  # the references
    settings = {"config": dataclasses.asdict(config), "small": args.small, "shapes": [list(s) for s in shapes],
                "dtypes": dtype_names, "masks": args.masks.split(","), "repeats": args.repeats,
                "warmup": args.warmup, "threads": torch.get_num_threads(), "variants": names,
                "linear_backend_auto": fastest_linear_backend() if device.type == "cpu" else "aten"}  # fmt: skip
    payload = {"settings": settings, "results": [], "matmul": [], "profiles": [], "skipped": []}
    with tempfile.TemporaryDirectory(prefix="distilqa-bench-") as folder:
        save_reference_checkpoint(folder, config)
        for dtype in dtype_names:
            models = {}
            for name, variant in ((n, VARIANTS[n]) for n in names):
                if variant.only not in ("", device.type) or (variant.fp32_only and dtype != "fp32"):
                    continue
                try:
                    models[name] = variant.build(Path(folder), device, common.DTYPES[dtype])
                except (ImportError, RuntimeError, ValueError) as error:  # a runtime missing, a core off its device
                    payload["skipped"].append({"variant": name, "dtype": dtype, "why": str(error)[:300]})
            for (batch, seq), mask in itertools.product(shapes, settings["masks"]):
                case = {"batch": batch, "seq": seq, "dtype": dtype, "mask": mask}
                run_case(payload, config, models, device, case, args)
    return payload


def run_case(payload: dict, config: DistilBertConfig, models: dict, device: torch.device, case: dict, args) -> None:
    batch, seq = case["batch"], case["seq"]
    ids, ones = random_inputs(config.vocab_size, [seq] * batch, seed=batch * 100003 + seq)
    ids, attention_mask = ids.to(device), ones.to(device) if case["mask"] == "ones" else None
    calls = {name: (lambda m=model: m(input_ids=ids, attention_mask=attention_mask)) for name, model in models.items()}
    logits, first_call_ms = {}, {}
    with torch.inference_mode():
        for name, call in calls.items():  # the first call (torch.compile compiles here)
            began = time.perf_counter()
            output = call()
            first_call_ms[name] = 1000 * (time.perf_counter() - began)
            logits[name] = torch.stack([output.start_logits.float(), output.end_logits.float()])
        gemms = common.gemm_reference(config, batch * seq, device, common.DTYPES[case["dtype"]])
        print(f"[forward] {case}: timing {len(calls) + len(gemms)}", flush=True)
        timings = common.time_round_robin({**calls, **gemms}, args.warmup, args.repeats, device)
    layer_flops = sum(2 * batch * seq * k * n * c for k, n, c in common.layer_gemms(config))
    by_library = {g.removeprefix("gemm "): layer_flops / timings[g]["median_ms"] / 1e6 for g in gemms}
    best = max(by_library, key=by_library.get)
    payload["matmul"].append({**case, "gflop": layer_flops / 1e9, "timing": timings[f"gemm {best}"],
                              "gflop_per_s": by_library[best], "best_library": best,
                              "gflop_per_s_by_library": by_library})  # fmt: skip
    flops = {k: batch * v for k, v in common.window_flops(config, seq).items()}
    for name in calls:
        gflop_per_s = flops["total"] / timings[name]["median_ms"] / 1e6
        payload["results"].append({**case, "variant": name, "library": common.kind(name), "timing": timings[name],
            "gflop": flops["total"] / 1e9, "gflop_linear": flops["linear"] / 1e9,
            "gflop_attention": flops["attention"] / 1e9, "gflop_per_s": gflop_per_s,
            "fraction_of_matmul": gflop_per_s / by_library[best], "first_call_ms": first_call_ms[name],
            "max_abs_logit_diff": (logits[name] - logits["transformers-eager"]).abs().max().item()})  # fmt: skip
    if args.profile and device.type == "cpu":
        for name in (n for n in calls if n.endswith(("sdpa", "onednn", "auto", "unfused", "attn"))):
            payload["profiles"].append({**case, "variant": name, **profile(calls[name], models[name])})


# Which operators count as what in a profile (self CPU time: wall time on the calling thread). Everything
# run inside an attention core (ATTENTION_SCOPES: the oneDNN core's own GEMMs, sdpa's copies) is attention.
PROFILE_CATEGORIES = {
    "gemm": ("aten::addmm", "aten::mm", "quantized::linear_dynamic", "mkldnn::_linear_pointwise",
             "onednn::qlinear_pointwise"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::_softmax",
                  "aten::masked_fill", "aten::baddbmm"),
    "LayerNorm": ("aten::native_layer_norm",),
    "GELU": ("aten::gelu",),
    "adds": ("aten::add", "aten::add_"),
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous"),
    "int8 inputs": ("aten::quantize_per_tensor_dynamic", "aten::min", "aten::max"),  # the input's range, then uint8
}  # fmt: skip
ATTENTION_SCOPES = ("distilqa attention core", "aten::scaled_dot_product_attention")


def profile(call: Callable[[], object], model: torch.nn.Module, repeats: int = 2) -> dict[str, Any]:
    """Where one forward's time goes: torch.profiler self time, grouped by PROFILE_CATEGORIES."""
    cores = {m: m.attention_function for m in model.modules() if hasattr(m, "attention_function")}
    for module, core in cores.items():  # each distilqa core call inside a labelled range
        module.attention_function = functools.wraps(core)(lambda *a, core=core: labelled(core, *a))
    try:
        with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            for _ in range(repeats):
                call()
    finally:
        for module, core in cores.items():
            module.attention_function = core
    shares = dict.fromkeys([*PROFILE_CATEGORIES, "other"], 0.0)
    for event in p.events():
        shares[category(event)] += event.self_cpu_time_total
    total = sum(shares.values())
    return {"profiled_ms_per_forward": total / 1000 / repeats, "shares": {c: t / total for c, t in shares.items()}}


def category(event: Any) -> str:
    """A profiler event's key of PROFILE_CATEGORIES, "attention" for anything inside an attention core."""
    scope = event
    while scope is not None:
        if scope.name in ATTENTION_SCOPES:
            return "attention"
        scope = scope.cpu_parent
    return next((c for c, ops in PROFILE_CATEGORIES.items() if event.name in ops), "other")


def labelled(core: Callable, *args: Any) -> Any:
    with torch.profiler.record_function(ATTENTION_SCOPES[0]):
        return core(*args)


def table(payload: dict[str, Any]) -> str:
    """Median ms per shape and variant, distilqa's best against transformers-sdpa and the fastest peer."""
    results = payload["results"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    rows = []
    for m in payload["matmul"]:
        ms = {r["variant"]: r["timing"]["median_ms"] for r in results if case_of(r) == case_of(m)}
        ours = min((v for v in ms if common.kind(v) == "distilqa" and "int8" not in v), key=ms.get)
        fastest_peer = min((v for v in ms if common.kind(v) == "peer"), key=ms.get, default=None)
        versus_peer = f"{ms[fastest_peer] / ms[ours]:.2f}x ({fastest_peer})" if fastest_peer else ""
        gemm = " / ".join(f"{g:.0f}" for g in m["gflop_per_s_by_library"].values())
        speedup = f"{ours}: {ms['transformers-sdpa'] / ms[ours]:.2f}x"
        mask = "" if payload["settings"]["masks"] == ["ones"] else f", mask {m['mask']}"
        dtype = "" if len(payload["settings"]["dtypes"]) == 1 else f", {m['dtype']}"
        rows.append(
            [f"{m['batch']} x {m['seq']}{dtype}{mask}", *(ms.get(v) for v in variants), speedup, versus_peer, gemm]
        )
    libraries = " / ".join(payload["matmul"][0]["gflop_per_s_by_library"]) if payload["matmul"] else ""
    headers = ["batch x seq", *(f"{v} ms" for v in variants), "fastest distilqa vs transformers-sdpa",
               "vs fastest peer", f"GEMM GFLOP/s ({libraries})"]  # fmt: skip
    return common.markdown_table(headers, rows)


def profile_table(payload: dict[str, Any]) -> str:
    """Where the forward's time goes, per profiled shape and variant: shares of the profiled time."""
    rows = [[f"{p['batch']} x {p['seq']}", p["dtype"], p["variant"], *(f"{100 * v:.0f}%" for v in p["shares"].values())]
            for p in payload["profiles"]]  # fmt: skip
    return common.markdown_table(["batch x seq", "dtype", "variant", *PROFILE_CATEGORIES, "other"], rows)


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Per shape: each variant's achieved GFLOP/s, the best GEMM library's rate as a dashed line."""
    panels = [{"title": f"batch {m['batch']} x seq {m['seq']}, {m['dtype']}, attention_mask {m['mask']}",
               "xlabel": "achieved GFLOP/s (higher is faster)",
               "bars": [(r["variant"], r["gflop_per_s"]) for r in payload["results"] if case_of(r) == case_of(m)],
               "line": (m["gflop_per_s"], f"{m['dtype']} GEMM limit ({m['best_library']})")}
              for m in payload["matmul"]]  # fmt: skip
    size = "a tiny random model" if payload["settings"]["small"] else "random weights at the published size"
    return common.figure(path, panels, f"DistilBERT QA forward pass, {size}", payload)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=None, help=f"batch x seq list (default {SHAPES}; --small {SMALL_SHAPES})")
    parser.add_argument("--masks", default="ones", help="comma list: ones (an attention_mask of ones), none")
    default = ",".join(name for name, variant in VARIANTS.items() if variant.default)
    parser.add_argument("--variants", default=default, help=f"'all' or a comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--profile", action="store_true", help="CPU: also record where the time goes")


if __name__ == "__main__":
    common.main("forward", __doc__, options, run, table, plot, repeats=10, warmup=2)
