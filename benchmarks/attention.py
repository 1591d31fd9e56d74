"""Speed of the attention core alone: softmax(Q Kᵀ / √d) V with DistilBERT's 12 heads of 64.

Each row of IMPLEMENTATIONS maps query, key, value (batch, heads, seq, head_dim), laid out as the model
makes them, to the merged context (batch, seq, heads * head_dim): distilqa's cores by name,
F.scaled_dot_product_attention forced to each backend, transformers' eager and sdpa functions with
the masks transformers builds. One that cannot run a case is skipped, with the reason.
Masks: none; padding (sequence i keeps seq - (seq // 2) * (i + 1) // batch keys); squad-padded
(SQuAD-like window lengths padded to seq); squad-packed (the same windows end to end in one row;
the sdpa-* backends get a jagged nested tensor). FLOPs: 4 * heads * head_dim per (query, key) pair
of the layout, 3x with the backward pass; ``useful_tflop``: pairs of real tokens only.

    python benchmarks/attention.py                      # CPU: batch 1, 4 x seq 128, 384; fp32; none, padding
    python benchmarks/attention.py --device cuda        # batch 1, 16, 128 x seq 128, 384, 512; every mask
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/attention.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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
HOPPER_PEAKS = {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}
DENSE_PEAK_TFLOPS = {"H200": HOPPER_PEAKS, "H100": HOPPER_PEAKS}
Core = Callable[[Tensor, Tensor, Tensor], Tensor]


def merge(context: Tensor) -> Tensor:  # (batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)
    return context.transpose(1, 2).flatten(2)


def distilqa_core(name: str) -> Callable[[dict], Core | str]:
    def make(masks: dict) -> Core:
        core = eager_attention if name == "eager" else resolve_attention(name)  # as the model resolves it
        return lambda q, k, v: merge(attend(core, q, k, v, masks["distilqa"])[0])

    return make


def sdpa_backend(backend: SDPBackend) -> Callable[[dict], Core | str]:
    def make(masks: dict) -> Core:
        key_mask = masks["distilqa"]
        if not isinstance(key_mask, PackedWindows):
            return lambda q, k, v: _with(backend, lambda: merge(F.scaled_dot_product_attention(q, k, v, key_mask)))

        def nested(t: Tensor) -> Tensor:  # (1, heads, total, head_dim) -> jagged (windows, heads, j, head_dim)
            return torch.nested.nested_tensor_from_jagged(t[0].transpose(0, 1), masks["offsets"]).transpose(1, 2)

        def jagged(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            with torch.inference_mode(False):  # nested tensors cannot be made in inference mode
                out = _with(backend, lambda: F.scaled_dot_product_attention(nested(q), nested(k), nested(v)))
                return out.transpose(1, 2).values().reshape(1, q.size(2), -1)

        return jagged

    return make


def _with(backend: SDPBackend, call: Callable[[], Tensor]) -> Tensor:
    with sdpa_kernel(backend):
        return call()


def transformers_function(implementation: str) -> Callable[[dict], Core | str]:
    """transformers' eager or sdpa attention function, with the mask its create_bidirectional_mask builds."""

    def make(masks: dict) -> Core | str:
        if isinstance(masks["distilqa"], PackedWindows):
            return "takes no packed windows"
        try:
            import transformers
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            from transformers.masking_utils import create_bidirectional_mask
            from transformers.models.distilbert.modeling_distilbert import eager_attention_forward
        except ImportError as error:
            return f"transformers' attention functions are not importable here: {error}"
        function = eager_attention_forward if implementation == "eager" else sdpa_attention_forward
        config, host, mask = transformers.DistilBertConfig(), nn.Module().eval(), masks["attention_mask"]
        config._attn_implementation, host.is_causal = implementation, False
        if mask is not None:  # (batch, 1, seq, seq); only the shape, dtype and device of the embeddings are read
            embeds = torch.zeros(*mask.shape, 1, device=mask.device, dtype=masks["dtype"])
            mask = create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=mask)
        return lambda q, k, v: function(host, q, k, v, mask, dropout=0.0, scaling=q.size(-1) ** -0.5)[0].flatten(2)

    return make


# name -> how to make the core for a case's masks (or a string saying why it cannot run). One row each.
IMPLEMENTATIONS: dict[str, Callable[[dict], Core | str]] = {
    "distilqa-eager": distilqa_core("eager"),
    "distilqa-sdpa": distilqa_core("sdpa"),
    "distilqa-onednn": distilqa_core("onednn"),  # CPU inference; elsewhere it runs the sdpa core
    "sdpa-math": sdpa_backend(SDPBackend.MATH),
    "sdpa-flash": sdpa_backend(SDPBackend.FLASH_ATTENTION),
    "sdpa-efficient": sdpa_backend(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa-cudnn": sdpa_backend(SDPBackend.CUDNN_ATTENTION),
    "transformers-eager": transformers_function("eager"),
    "transformers-sdpa": transformers_function("sdpa"),
    "distilqa-triton": distilqa_core("triton"),  # CUDA, or the CPU under TRITON_INTERPRET=1
}
CPU_DEFAULT = [name for name in IMPLEMENTATIONS if name != "distilqa-triton"]


def lengths_of(batch: int, seq: int, mask: str) -> list[int]:
    """The real tokens of each sequence of the case."""
    if mask == "padding":
        return [seq - (seq // 2) * (i + 1) // batch for i in range(batch)]
    if mask.startswith("squad"):  # a fixed order that visits all ten lengths (3 and 10 are coprime)
        chosen = [SQUAD_WINDOW_LENGTHS[(3 * i + 6) % 10] for i in range(batch)]
        return [max(1, min(seq, round(n * seq / 384))) for n in chosen]
    return [seq] * batch


def make_masks(batch: int, seq: int, mask: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The case's mask for distilqa (a (batch, 1, 1, seq) bool key mask or PackedWindows) and as an
    attention_mask (batch, seq) of ones and zeros for transformers (None for none or packed)."""
    if mask == "squad-packed":
        windows = PackedWindows(tuple(lengths_of(batch, seq, mask)))
        return {"distilqa": windows, "offsets": torch.tensor(windows.offsets, device=device), "attention_mask": None}
    lengths = torch.tensor(lengths_of(batch, seq, mask), device=device)
    attention_mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None]).long() if mask != "none" else None
    key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    return {"distilqa": key_mask, "attention_mask": attention_mask, "dtype": dtype}


def matmul_ceiling(device: torch.device, dtype_names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """CUDA: TFLOP/s of an n^3 matmul per 16-bit dtype, the practical ceiling. Nothing on the CPU."""
    ceilings = {}
    for name in [n for n in dtype_names if n != "fp32"] if device.type == "cuda" else []:
        n = 1024 if args.small else 8192
        a, b = (torch.randn(n, n, device=device, dtype=common.DTYPES[name]) for _ in range(2))
        matmul = {"matmul": lambda a=a, b=b: a @ b}
        timing = common.time_round_robin(matmul, args.warmup, args.repeats, device)["matmul"]
        ceilings[name] = {"n": n, "timing": timing, "tflop_per_s": 2 * n**3 / timing["median_ms"] / 1e9}
    return ceilings


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype_names = common.setup(args)
    shapes = common.parse_pairs(args.shapes or (SMALL_SHAPES if args.small else SHAPES[device.type]))
    heads = 2 if args.small else 12
    masks = (args.masks or MASKS[device.type]).split(",")
    modes = ["forward", "forward+backward"] if args.modes == "both" else [args.modes]
    names = args.implementations.split(",") if args.implementations else CPU_DEFAULT
    names = names if args.implementations or device.type == "cpu" else list(IMPLEMENTATIONS)
    if unknown := [n for n in names if n not in IMPLEMENTATIONS]:
        raise SystemExit(f"unknown implementation(s) {', '.join(unknown)}; expected some of {list(IMPLEMENTATIONS)}")
    settings = {"shapes": [list(s) for s in shapes], "heads": heads, "head_dim": HEAD_DIM, "dtypes": dtype_names,
                "masks": masks, "modes": modes, "implementations": names, "repeats": args.repeats,
                "warmup": args.warmup, "threads": torch.get_num_threads()}  # fmt: skip
    payload = {"benchmark": "attention", "machine": common.machine_info(device), "settings": settings}
    payload |= {"matmul": matmul_ceiling(device, dtype_names, args), "results": [], "skipped": []}
    for dtype_name in dtype_names:
        for batch, seq in shapes:
            for mask in masks:
                for mode in modes:
                    run_case(payload, names, device, dtype_name, batch, seq, heads, mask, mode, args)
    payload["machine"]["load_average_at_end"] = common.load_average()
    return payload


def run_case(payload, names, device, dtype_name, batch, seq, heads, mask, mode, args) -> None:
    generator = torch.Generator().manual_seed(batch * 1009 + seq)
    backward = mode == "forward+backward"
    case = {"dtype": dtype_name, "batch": batch, "seq": seq, "mask": mask, "mode": mode}

    def tensor(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=common.DTYPES[dtype_name])

    lengths = lengths_of(batch, seq, mask)
    rows, tokens = (1, sum(lengths)) if mask == "squad-packed" else (batch, seq)
    q, k, v = (tensor(rows, tokens, heads, HEAD_DIM).transpose(1, 2).requires_grad_(backward) for _ in range(3))
    grad_output = tensor(rows, tokens, heads * HEAD_DIM)
    masks = make_masks(batch, seq, mask, device, common.DTYPES[dtype_name])
    with torch.inference_mode():  # the reference: PyTorch's math backend (window by window when packed)
        sdpa = resolve_attention("sdpa")
        expected = _with(SDPBackend.MATH, lambda: merge(attend(sdpa, q, k, v, masks["distilqa"])[0]))

    def timed(core: Core) -> Callable[[], object]:
        if backward:
            return lambda: torch.autograd.grad(core(q, k, v), (q, k, v), grad_output)

        def forward() -> object:
            with torch.inference_mode():
                return core(q, k, v)

        return forward

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
                    deviations[name] = (core(q, k, v).float() - expected.float()).abs().max().item()
        except (RuntimeError, ImportError, ValueError, KeyError) as error:
            reasons = [str(w.message).splitlines()[0] for w in caught] + [str(error).splitlines()[0]]
            payload["skipped"].append({"implementation": name, **case, "why": " | ".join(dict.fromkeys(reasons))[:500]})
            continue
        functions[name] = timed(core)
    print(f"[attention] {dtype_name} {batch}x{seq} mask={mask} {mode}: timing {len(functions)}", flush=True)
    timings = common.time_round_robin(functions, args.warmup, args.repeats, device) if functions else {}
    per_pair = 4 * heads * HEAD_DIM * (3 if backward else 1)
    flops = per_pair * (sum(n * n for n in lengths) if mask == "squad-packed" else batch * seq * seq)
    useful = per_pair * sum(n * n for n in lengths)
    device_name = payload["machine"]["device_name"]
    peak = next((p.get(dtype_name) for gpu, p in DENSE_PEAK_TFLOPS.items() if gpu in device_name), None)
    ceiling = payload["matmul"].get(dtype_name, {}).get("tflop_per_s")
    for name, timing in timings.items():
        tflop_per_s = flops / timing["median_ms"] / 1e9
        payload["results"].append(
            {"implementation": name, **case, "heads": heads, "head_dim": HEAD_DIM, "lengths": lengths,
             "timing": timing, "tflop": flops / 1e12, "tflop_per_s": tflop_per_s, "useful_tflop": useful / 1e12,
             "useful_tflop_per_s": useful / timing["median_ms"] / 1e9,
             "fraction_of_peak": tflop_per_s / peak if peak and device.type == "cuda" else None,
             "fraction_of_matmul": tflop_per_s / ceiling if ceiling else None,
             "max_abs_diff_vs_sdpa_math": deviations[name]}
        )  # fmt: skip


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
    """One panel per dtype, mode and mask: achieved TFLOP/s (of real tokens for SQuAD-like windows)."""
    panels = []
    shapes = [tuple(s) for s in payload["settings"]["shapes"]]
    for dtype in payload["settings"]["dtypes"]:
        for mode in payload["settings"]["modes"]:
            for mask in payload["settings"]["masks"]:
                chosen = [r for r in payload["results"] if (r["dtype"], r["mode"], r["mask"]) == (dtype, mode, mask)]
                work = "useful_tflop_per_s" if mask.startswith("squad") else "tflop_per_s"
                series = {}
                for r in chosen:
                    series.setdefault(r["implementation"], [None] * len(shapes))
                    series[r["implementation"]][shapes.index((r["batch"], r["seq"]))] = r[work] * 1000
                ylabel = "GFLOP/s" + (" of real tokens" if "useful" in work else "")
                categories = [f"{b} x {s}" for b, s in shapes]
                panel = {"title": f"{dtype} {mode}, mask {mask}", "ylabel": ylabel, "categories": categories}
                panels += [{**panel, "series": series}] if series else []
    heads = payload["settings"]["heads"]
    title = f"Attention core alone, {heads} heads x {HEAD_DIM}: achieved GFLOP/s (higher is faster)"
    return common.figure(path, panels, title, payload)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=None, help=f"batch x seq list (default {SHAPES})")
    parser.add_argument("--masks", default=None, help="comma list of none, padding, squad-padded, squad-packed")
    parser.add_argument("--modes", choices=["forward", "forward+backward", "both"], default="both")
    parser.add_argument("--implementations", default=None, help=f"comma list of {', '.join(IMPLEMENTATIONS)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.script("attention", __doc__, options, run, table, plot, repeats=20, warmup=3, argv=argv)


if __name__ == "__main__":
    main()
