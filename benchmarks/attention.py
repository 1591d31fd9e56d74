"""Speed of the attention core alone, softmax(Q Kᵀ / √d) V with DistilBERT's 12 heads of 64, per row of
IMPLEMENTATIONS: distilqa's cores, F.scaled_dot_product_attention forced to each backend, transformers'
functions with the masks transformers builds (one that cannot run a case is skipped, with the reason).
Masks: none; padding (sequence i keeps seq - (seq // 2) * (i + 1) // batch keys); squad-padded
(SQuAD-like window lengths padded to seq); squad-packed (the same windows end to end in one row; the
sdpa-* backends get a jagged nested tensor). FLOPs: 4 * heads * head_dim per (query, key) pair of the
layout, 3x with the backward pass; ``useful_tflop``: pairs of real tokens only."""

import argparse
import itertools
import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: `benchmarks` importable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import common
from distilqa.attention import PackedWindows, attend, resolve_attention
from distilqa.model import eager_attention

HEAD_DIM = 64
SHAPES = {"cuda": "1x128,1x384,1x512,16x128,16x384,16x512,128x128,128x384,128x512", "cpu": "1x128,1x384,4x128,4x384"}
SMALL_SHAPES = "1x32,2x64"
MASKS = {"cuda": "none,padding,squad-padded,squad-packed", "cpu": "none,padding"}
# Window lengths of SQuAD v1.1 dev as distilqa's tokenizer cuts them (cased vocabulary, max_seq_len 384,
# doc_stride 128): the 5th, 15th, ..., 95th percentiles of its 10822 windows; written here so that a
# GPU machine without the data runs the same mix.
SQUAD_WINDOW_LENGTHS = (91, 123, 137, 149, 161, 175, 192, 212, 245, 314)
# Dense tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets; fp32 means TF32.
DENSE_PEAK_TFLOPS = {gpu: {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0} for gpu in ("H200", "H100")}
Core = Callable[[Tensor, Tensor, Tensor], Tensor]


def merge(context: Tensor) -> Tensor:  # (batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)
    return context.transpose(1, 2).flatten(2)


def distilqa_core(name: str, masks: dict) -> Core:
    core = eager_attention if name == "eager" else resolve_attention(name)  # as the model resolves it
    return lambda q, k, v: merge(attend(core, q, k, v, masks["distilqa"])[0])


def sdpa_backend(backend: SDPBackend, masks: dict) -> Core:
    key_mask = masks["distilqa"]
    if not isinstance(key_mask, PackedWindows):
        return sdpa_kernel(backend)(lambda q, k, v: merge(F.scaled_dot_product_attention(q, k, v, key_mask)))

    def nested(t: Tensor) -> Tensor:  # (1, heads, total, head_dim) -> jagged (windows, heads, j, head_dim)
        return torch.nested.nested_tensor_from_jagged(t[0].transpose(0, 1), masks["offsets"]).transpose(1, 2)

    @sdpa_kernel(backend)
    def jagged(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with torch.inference_mode(False):  # nested tensors cannot be made in inference mode
            out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v))
            return out.transpose(1, 2).values().reshape(1, q.size(2), -1)

    return jagged


def transformers_function(implementation: str, masks: dict) -> Core | str:
    """transformers' eager or sdpa attention function, with the mask its create_bidirectional_mask builds."""
    if isinstance(masks["distilqa"], PackedWindows):
        return "takes no packed windows"
    import transformers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.models.distilbert.modeling_distilbert import eager_attention_forward

    function = eager_attention_forward if implementation == "eager" else sdpa_attention_forward
    config, host, mask = transformers.DistilBertConfig(), nn.Module().eval(), masks["attention_mask"]
    config._attn_implementation, host.is_causal = implementation, False
    if mask is not None:  # (batch, 1, seq, seq); only the shape, dtype and device of the embeddings are read
        embeds = torch.zeros(*mask.shape, 1, device=mask.device, dtype=masks["dtype"])
        mask = create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=mask)
    return lambda q, k, v: function(host, q, k, v, mask, dropout=0.0, scaling=q.size(-1) ** -0.5)[0].flatten(2)


# name -> how to make the core for a case's masks (or a string saying why it cannot run). One row each.
IMPLEMENTATIONS: dict[str, Callable[[dict], Core | str]] = {
    "distilqa-eager": partial(distilqa_core, "eager"),
    "distilqa-sdpa": partial(distilqa_core, "sdpa"),
    "distilqa-onednn": partial(distilqa_core, "onednn"),  # CPU inference; elsewhere it runs the sdpa core
    "sdpa-math": partial(sdpa_backend, SDPBackend.MATH),
    "sdpa-flash": partial(sdpa_backend, SDPBackend.FLASH_ATTENTION),
    "sdpa-efficient": partial(sdpa_backend, SDPBackend.EFFICIENT_ATTENTION),
    "sdpa-cudnn": partial(sdpa_backend, SDPBackend.CUDNN_ATTENTION),
    "transformers-eager": partial(transformers_function, "eager"),
    "transformers-sdpa": partial(transformers_function, "sdpa"),
    "distilqa-triton": partial(distilqa_core, "triton"),  # CUDA, or the CPU under TRITON_INTERPRET=1
}


def lengths_of(batch: int, seq: int, mask: str) -> list[int]:
    """The real tokens of each sequence of the case."""
    if mask == "padding":
        return [seq - (seq // 2) * (i + 1) // batch for i in range(batch)]
    if mask.startswith("squad"):  # a fixed order that visits all ten lengths (3 and 10 are coprime)
        return [max(1, min(seq, round(SQUAD_WINDOW_LENGTHS[(3 * i + 6) % 10] * seq / 384))) for i in range(batch)]
    return [seq] * batch


def make_masks(lengths: list[int], seq: int, mask: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """distilqa's mask (a bool key mask or PackedWindows) and transformers' attention_mask (or None)."""
    if mask == "squad-packed":
        windows = PackedWindows(tuple(lengths))
        return {"distilqa": windows, "offsets": torch.tensor(windows.offsets, device=device), "attention_mask": None}
    attention_mask = (torch.arange(seq, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]).long()
    attention_mask = None if mask == "none" else attention_mask
    key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    return {"distilqa": key_mask, "attention_mask": attention_mask, "dtype": dtype}


def run(args: argparse.Namespace, device: torch.device, dtype_names: list[str]) -> dict[str, Any]:
    shapes = common.parse_pairs(args.shapes or (SMALL_SHAPES if args.small else SHAPES[device.type]))
    heads = 2 if args.small else 12
    masks = (args.masks or MASKS[device.type]).split(",")
    modes = ["forward", "forward+backward"] if args.modes == "both" else [args.modes]
    names = [n for n in IMPLEMENTATIONS if device.type == "cuda" or n != "distilqa-triton"]  # Triton: CUDA
    names = args.implementations.split(",") if args.implementations else names
    if unknown := [n for n in names if n not in IMPLEMENTATIONS]:
        raise SystemExit(f"unknown implementation(s) {', '.join(unknown)}; expected some of {list(IMPLEMENTATIONS)}")
    settings = {"shapes": [list(s) for s in shapes], "heads": heads, "head_dim": HEAD_DIM, "dtypes": dtype_names,
                "masks": masks, "modes": modes, "implementations": names, "repeats": args.repeats,
                "warmup": args.warmup, "threads": torch.get_num_threads()}  # fmt: skip
    ceilings = {}  # CUDA: TFLOP/s of an n^3 matmul per 16-bit dtype, the practical ceiling
    for name in [n for n in dtype_names if n != "fp32"] if device.type == "cuda" else []:
        n = 1024 if args.small else 8192
        a, b = (torch.randn(n, n, device=device, dtype=common.DTYPES[name]) for _ in range(2))
        timing = common.time_round_robin({"a @ b": lambda a=a, b=b: a @ b}, args.warmup, args.repeats, device)["a @ b"]
        ceilings[name] = {"n": n, "timing": timing, "tflop_per_s": 2 * n**3 / timing["median_ms"] / 1e9}
    payload = {"settings": settings, "matmul": ceilings, "results": [], "skipped": []}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peaks = next((p for gpu, p in DENSE_PEAK_TFLOPS.items() if gpu in device_name), {})
    for dtype, (batch, seq), mask, mode in itertools.product(dtype_names, shapes, masks, modes):
        case = {"dtype": dtype, "batch": batch, "seq": seq, "mask": mask, "mode": mode}
        run_case(payload, names, device, heads, case, peaks.get(dtype), args)
    return payload


def run_case(payload: dict, names: list[str], device: torch.device, heads: int, case: dict, peak, args) -> None:
    batch, seq, mask, backward = case["batch"], case["seq"], case["mask"], case["mode"] == "forward+backward"
    dtype, generator = common.DTYPES[case["dtype"]], torch.Generator().manual_seed(batch * 1009 + seq)
    lengths = lengths_of(batch, seq, mask)
    shape = (1, sum(lengths), heads * HEAD_DIM) if mask == "squad-packed" else (batch, seq, heads * HEAD_DIM)
    q, k, v, grad_output = (torch.randn(shape, generator=generator).to(device, dtype) for _ in range(4))
    q, k, v = (t.unflatten(2, (heads, HEAD_DIM)).transpose(1, 2).requires_grad_(backward) for t in (q, k, v))
    masks = make_masks(lengths, seq, mask, device, dtype)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):  # the reference (window by window when packed)
        expected = merge(attend(resolve_attention("sdpa"), q, k, v, masks["distilqa"])[0]).float()

    def timed(core: Core) -> Callable[[], object]:
        if backward:
            return lambda: torch.autograd.grad(core(q, k, v), (q, k, v), grad_output)
        return torch.inference_mode()(lambda: core(q, k, v))

    functions, deviations = {}, {}
    for name in names:
        caught: list = []
        try:  # a backend that is unavailable or rejects these inputs raises: note why and skip it
            core = IMPLEMENTATIONS[name](masks)
            if isinstance(core, str):
                raise ValueError(core)
            if name == "distilqa-triton" and backward:
                raise ValueError("forward only: the Triton kernel has no backward pass")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                timed(core)()
                with torch.inference_mode():
                    deviations[name] = (core(q, k, v).float() - expected).abs().max().item()
        except (RuntimeError, ImportError, ValueError, KeyError) as error:
            reasons = [str(w.message).splitlines()[0] for w in caught] + [str(error).splitlines()[0]]
            payload["skipped"].append({"implementation": name, **case, "why": " | ".join(dict.fromkeys(reasons))[:500]})
            continue
        functions[name] = timed(core)
    print(f"[attention] {case['dtype']} {batch}x{seq} mask={mask} {case['mode']}: timing {len(functions)}", flush=True)
    timings = common.time_round_robin(functions, args.warmup, args.repeats, device) if functions else {}
    per_pair = 4 * heads * HEAD_DIM * (3 if backward else 1)
    flops = per_pair * (sum(n * n for n in lengths) if mask == "squad-packed" else batch * seq * seq)
    useful = per_pair * sum(n * n for n in lengths)
    ceiling = payload["matmul"].get(case["dtype"], {}).get("tflop_per_s")
    for name, timing in timings.items():
        tflop_per_s = flops / timing["median_ms"] / 1e9
        payload["results"].append({"implementation": name, **case, "heads": heads, "head_dim": HEAD_DIM,
            "lengths": lengths, "timing": timing, "tflop": flops / 1e12, "tflop_per_s": tflop_per_s,
            "useful_tflop": useful / 1e12, "useful_tflop_per_s": useful / timing["median_ms"] / 1e9,
            "fraction_of_peak": tflop_per_s / peak if peak else None,
            "fraction_of_matmul": tflop_per_s / ceiling if ceiling else None,
            "max_abs_diff_vs_sdpa_math": deviations[name]})  # fmt: skip


def table(payload: dict[str, Any]) -> str:
    """Median milliseconds per case and implementation."""
    names = list(dict.fromkeys(r["implementation"] for r in payload["results"]))
    cases: dict[tuple, dict[str, float]] = {}
    for r in payload["results"]:
        key = (f"{r['batch']} x {r['seq']}", r["dtype"], r["mask"], r["mode"])
        cases.setdefault(key, {})[r["implementation"]] = r["timing"]["median_ms"]
    rows = [[*key, *(ms.get(name) for name in names)] for key, ms in cases.items()]
    return common.markdown_table(["batch x seq", "dtype", "mask", "mode", *(f"{n} ms" for n in names)], rows)


def plot(payload: dict[str, Any], path: Path) -> Path:
    """One panel per dtype, mode and mask: achieved GFLOP/s (of real tokens for SQuAD-like windows)."""
    settings, panels = payload["settings"], []
    shapes = [tuple(s) for s in settings["shapes"]]
    for dtype, mode, mask in itertools.product(settings["dtypes"], settings["modes"], settings["masks"]):
        real = mask.startswith("squad")
        series: dict[str, list] = {}
        for r in payload["results"]:
            if (r["dtype"], r["mode"], r["mask"]) == (dtype, mode, mask):
                values = series.setdefault(r["implementation"], [None] * len(shapes))
                values[shapes.index((r["batch"], r["seq"]))] = r["useful_tflop_per_s" if real else "tflop_per_s"] * 1000
        panel = {"title": f"{dtype} {mode}, mask {mask}", "ylabel": "GFLOP/s" + (" of real tokens" if real else "")}
        panels += [{**panel, "categories": [f"{b} x {s}" for b, s in shapes], "series": series}] if series else []
    title = f"Attention core alone, {settings['heads']} heads x {HEAD_DIM}: achieved GFLOP/s (higher is faster)"
    return common.figure(path, panels, title, payload)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=None, help=f"batch x seq list (default {SHAPES})")
    parser.add_argument("--masks", default=None, help="comma list of none, padding, squad-padded, squad-packed")
    parser.add_argument("--modes", choices=["forward", "forward+backward", "both"], default="both")
    parser.add_argument("--implementations", default=None, help=f"comma list of {', '.join(IMPLEMENTATIONS)}")


if __name__ == "__main__":
    common.main("attention", __doc__, options, run, table, plot, repeats=20, warmup=3)
