"""Speed of the attention core alone: softmax(Q Kᵀ / √d) V with DistilBERT's 12 heads of 64.

Implementations (each maps query, key, value (batch, heads, seq, head_dim), laid out as the model
makes them, i.e. transposed views of (batch, seq, heads, head_dim), to the merged context
(batch, seq, heads * head_dim) that the output projection reads, so that all do the same work):

    distilqa-eager       distilqa.attention.eager_attention (written-out matmul, mask, softmax, matmul)
    distilqa-sdpa        distilqa.attention.sdpa_attention (F.scaled_dot_product_attention, default dispatch)
    sdpa-math, sdpa-flash, sdpa-efficient, sdpa-cudnn
                         F.scaled_dot_product_attention forced to one backend with
                         torch.nn.attention.sdpa_kernel; a backend that is unavailable or rejects
                         the inputs is skipped, with the reason, in the JSON's "skipped"
    transformers-eager   transformers' eager_attention_forward (DistilBERT's), with its additive float mask
    transformers-sdpa    transformers' sdpa_attention_forward, with its boolean mask

Masks: ``none``, or ``padding``: sequence i of the batch keeps its first
seq - (seq // 2) * (i + 1) // batch keys (from 7/8 down to 1/2 of them for batch 4; 1/2 for batch 1).
Each library gets the mask in its own format (distilqa: (batch, 1, 1, seq) bool; transformers: the
(batch, 1, seq, seq) mask its create_bidirectional_mask builds). FLOPs are the dense count:
forward 2 * 2*batch*heads*seq*seq*head_dim; forward plus backward 3x that (a kernel that recomputes
the scores in the backward pass does more work than counted).

CUDA (defaults): batch 1, 16, 128 x seq 128, 384, 512; fp32, fp16, bf16; CUDA events, median of 20.
CPU (defaults): batch 1, 4 x seq 128, 384; fp32; time.perf_counter, median of 20.

    python benchmarks/attention.py --plot benchmarks/results/attention-cpu.png
    python benchmarks/attention.py --device cuda --plot benchmarks/results/attention-cuda.png
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

from benchmarks.common import (
    DTYPES,
    add_common_arguments,
    default_output,
    format_table,
    load_average,
    machine_info,
    parse_pairs,
    plot_panels,
    setup,
    time_callables,
    write_json,
)
from distilqa.attention import eager_attention, sdpa_attention

HEADS, HEAD_DIM = 12, 64
CUDA_SHAPES = "1x128,1x384,1x512,16x128,16x384,16x512,128x128,128x384,128x512"
CPU_SHAPES = "1x128,1x384,4x128,4x384"
SMALL_SHAPES = "1x32,2x64"
SMALL_HEADS = 2
MASKS = ("none", "padding")
MODES = ("forward", "forward+backward")
SDPA_BACKENDS = {
    "sdpa-math": "MATH",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}
IMPLEMENTATIONS = ("distilqa-eager", "distilqa-sdpa", *SDPA_BACKENDS, "transformers-eager", "transformers-sdpa")


class _AttentionHost(nn.Module):
    """What transformers' attention functions read from the module they are given."""

    is_causal = False

    def __init__(self) -> None:
        super().__init__()
        self.eval()


def padding_lengths(batch: int, seq: int) -> list[int]:
    return [seq - (seq // 2) * (i + 1) // batch for i in range(batch)]


def make_masks(batch: int, seq: int, mask: str, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor | None]:
    """The mask for each library's format: distilqa's (batch, 1, 1, seq) bool; transformers' eager
    (float, additive) and sdpa (bool) (batch, 1, seq, seq), as its create_bidirectional_mask builds them."""
    if mask == "none":
        return {"distilqa": None, "transformers-eager": None, "transformers-sdpa": None}
    import transformers
    from transformers.masking_utils import create_bidirectional_mask

    lengths = torch.tensor(padding_lengths(batch, seq), device=device)
    attention_mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None]).long()  # (batch, seq)
    masks: dict[str, Tensor | None] = {"distilqa": attention_mask.bool()[:, None, None, :]}
    embeds = torch.zeros(batch, seq, 1, device=device, dtype=dtype)  # only its shape, dtype, device are read
    for implementation in ("eager", "sdpa"):
        config = transformers.DistilBertConfig()
        config._attn_implementation = implementation
        masks[f"transformers-{implementation}"] = create_bidirectional_mask(
            config=config, inputs_embeds=embeds, attention_mask=attention_mask
        )
    return masks


def make_implementations(masks: dict[str, Tensor | None]) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """Each implementation as a function (query, key, value) -> context (batch, seq, heads * head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.distilbert.modeling_distilbert import eager_attention_forward

    host = _AttentionHost()
    key_mask = masks["distilqa"]

    def merge(context: Tensor) -> Tensor:  # (batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)
        batch, heads, seq, head_dim = context.shape
        return context.transpose(1, 2).reshape(batch, seq, heads * head_dim)

    def backend(name: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        chosen = getattr(SDPBackend, SDPA_BACKENDS[name])

        def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            with sdpa_kernel(chosen):
                return merge(F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask))

        return run

    def transformers_function(function: Callable, mask: Tensor | None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            context, _ = function(host, q, k, v, mask, dropout=0.0, scaling=q.size(-1) ** -0.5)
            return context.reshape(q.size(0), q.size(2), -1)  # it returns (batch, seq, heads, head_dim)

        return run

    return {
        "distilqa-eager": lambda q, k, v: merge(eager_attention(q, k, v, key_mask)[0]),
        "distilqa-sdpa": lambda q, k, v: merge(sdpa_attention(q, k, v, key_mask)[0]),
        **{name: backend(name) for name in SDPA_BACKENDS},
        "transformers-eager": transformers_function(eager_attention_forward, masks["transformers-eager"]),
        "transformers-sdpa": transformers_function(sdpa_attention_forward, masks["transformers-sdpa"]),
    }


def attention_flops(batch: int, seq: int, heads: int, head_dim: int, mode: str) -> int:
    forward = 2 * 2 * batch * heads * seq * seq * head_dim
    return forward if mode == "forward" else 3 * forward


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype_names = setup(args)
    default_shapes = SMALL_SHAPES if args.small else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    shapes = parse_pairs(args.shapes or default_shapes)
    heads = SMALL_HEADS if args.small else HEADS
    masks = list(MASKS) if args.masks == "both" else [args.masks]
    modes = list(MODES) if args.modes == "both" else [args.modes]
    names = args.implementations.split(",") if args.implementations else list(IMPLEMENTATIONS)
    if unknown := [n for n in names if n not in IMPLEMENTATIONS]:
        raise SystemExit(
            f"unknown implementation(s) {', '.join(unknown)}; expected some of {', '.join(IMPLEMENTATIONS)}"
        )
    payload: dict[str, Any] = {
        "benchmark": "attention",
        "machine": machine_info(device),
        "settings": {
            "shapes": [list(s) for s in shapes],
            "heads": heads,
            "head_dim": HEAD_DIM,
            "dtypes": dtype_names,
            "masks": masks,
            "modes": modes,
            "implementations": names,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "retries": args.retries,
            "max_other_load": args.max_other_load,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "timing": "interleaved round-robin over the implementations; "
            + ("CUDA events" if device.type == "cuda" else "time.perf_counter"),
            "inputs": "query, key, value: transposed views of random (batch, seq, heads, head_dim) tensors; "
            "output: merged (batch, seq, heads*head_dim) context; backward: autograd.grad of a random "
            "output gradient w.r.t. query, key, value",
            "padding": "sequence i keeps its first seq - (seq//2)*(i+1)//batch keys",
            "flops": "dense: forward 4*batch*heads*seq^2*head_dim, forward+backward 3x forward",
        },
        "results": [],
        "skipped": [],
    }
    for dtype_name in dtype_names:
        for batch, seq in shapes:
            for mask in masks:
                for mode in modes:
                    run_case(payload, names, device, dtype_name, batch, seq, heads, mask, mode, args)
    payload["machine"]["load_average_at_end"] = load_average()
    return payload


def run_case(
    payload: dict[str, Any],
    names: list[str],
    device: torch.device,
    dtype_name: str,
    batch: int,
    seq: int,
    heads: int,
    mask: str,
    mode: str,
    args: argparse.Namespace,
) -> None:
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(batch * 1009 + seq)
    backward = mode == "forward+backward"

    def tensor(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    # (batch, heads, seq, head_dim) views of (batch, seq, heads, head_dim), as split_heads makes them
    q, k, v = (tensor(batch, seq, heads, HEAD_DIM).transpose(1, 2).requires_grad_(backward) for _ in range(3))
    grad_output = tensor(batch, seq, heads * HEAD_DIM)
    implementations = make_implementations(make_masks(batch, seq, mask, device, dtype))
    reference = implementations["sdpa-math"]

    def timed(function: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[], object]:
        if not backward:

            def forward_only() -> object:
                with torch.inference_mode():
                    return function(q, k, v)

            return forward_only
        return lambda: torch.autograd.grad(function(q, k, v), (q, k, v), grad_output)

    with torch.inference_mode():
        expected = reference(q, k, v).float()
    functions, deviations = {}, {}
    for name in names:
        try:  # a backend that is unavailable or rejects these inputs raises: note why and skip it
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                timed(implementations[name])()
                with torch.inference_mode():
                    deviations[name] = (implementations[name](q, k, v).float() - expected).abs().max().item()
        except RuntimeError as error:
            reasons = [str(w.message).splitlines()[0] for w in caught] + [str(error).splitlines()[0]]
            payload["skipped"].append(
                {
                    "implementation": name,
                    "dtype": dtype_name,
                    "batch": batch,
                    "seq": seq,
                    "mask": mask,
                    "mode": mode,
                    "why": " | ".join(dict.fromkeys(reasons))[:500],
                }
            )
            continue
        functions[name] = timed(implementations[name])
    print(f"[attention] {dtype_name} batch={batch} seq={seq} mask={mask} {mode}: timing {len(functions)}", flush=True)
    timings = (
        time_callables(functions, args.warmup, args.repeats, device, args.retries, args.max_other_load)
        if functions
        else {}
    )
    flops = attention_flops(batch, seq, heads, HEAD_DIM, mode)
    for name, timing in timings.items():
        payload["results"].append(
            {
                "implementation": name,
                "batch": batch,
                "seq": seq,
                "heads": heads,
                "head_dim": HEAD_DIM,
                "dtype": dtype_name,
                "mask": mask,
                "mode": mode,
                "timing": timing,
                "tflop": flops / 1e12,
                "tflop_per_s": flops / (timing["median_ms"] / 1000) / 1e12,
                "max_abs_diff_vs_sdpa_math": deviations[name],
            }
        )


def report(payload: dict[str, Any]) -> str:
    machine, settings = payload["machine"], payload["settings"]
    lines = [
        f"attention core, {machine['device_name']} ({machine['device']}), {settings['threads']} threads, "
        f"{settings['heads']} heads x {settings['head_dim']}; median of {settings['repeats']} after "
        f"{settings['warmup']} warm-up; load average {machine['load_average_at_start']} -> "
        f"{machine.get('load_average_at_end')}"
    ]
    rows = [
        [
            f"{r['batch']}x{r['seq']}",
            r["dtype"],
            r["mask"],
            r["mode"],
            r["implementation"],
            r["timing"]["median_ms"],
            r["timing"]["min_ms"],
            r["timing"]["max_ms"],
            r["tflop_per_s"],
            f"{r['max_abs_diff_vs_sdpa_math']:.1e}",
        ]
        for r in payload["results"]
    ]
    headers = [
        "shape",
        "dtype",
        "mask",
        "mode",
        "implementation",
        "median ms",
        "min ms",
        "max ms",
        "TFLOP/s",
        "|diff| vs math",
    ]
    lines.append(format_table(headers, rows))
    reasons: dict[tuple[str, str], list[str]] = {}
    for s in payload["skipped"]:
        reasons.setdefault((s["implementation"], s["why"]), []).append(
            f"{s['dtype']} {s['batch']}x{s['seq']} {s['mask']}"
        )
    for (name, why), cases in reasons.items():
        lines.append(f"skipped {name} ({len(cases)} cases, e.g. {cases[0]}): {why}")
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> Path:
    panels = []
    results = payload["results"]
    for dtype in payload["settings"]["dtypes"]:
        for mode in payload["settings"]["modes"]:
            for mask in payload["settings"]["masks"]:
                chosen = [r for r in results if (r["dtype"], r["mode"], r["mask"]) == (dtype, mode, mask)]
                if not chosen:
                    continue
                shapes = [tuple(s) for s in payload["settings"]["shapes"]]
                series = {}
                for name in dict.fromkeys(r["implementation"] for r in chosen):
                    by_shape = {(r["batch"], r["seq"]): r for r in chosen if r["implementation"] == name}
                    series[name] = (
                        [by_shape[s]["tflop_per_s"] if s in by_shape else None for s in shapes],
                        [
                            by_shape[s]["tflop"] / (by_shape[s]["timing"]["q3_ms"] / 1000) if s in by_shape else None
                            for s in shapes
                        ],
                        [
                            by_shape[s]["tflop"] / (by_shape[s]["timing"]["q1_ms"] / 1000) if s in by_shape else None
                            for s in shapes
                        ],
                    )
                panels.append(
                    {
                        "title": f"{dtype}, {mode}, mask={mask}",
                        "categories": [f"{b}x{s}" for b, s in shapes],
                        "series": series,
                    }
                )
    machine = payload["machine"]
    title = (
        f"attention core ({payload['settings']['heads']} heads x {HEAD_DIM}), {machine['device_name']}, "
        f"{payload['settings']['threads']} threads (bars: median; whiskers: interquartile range)"
    )
    return plot_panels(path, panels, "achieved TFLOP/s", title)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(
        parser, default_repeats=20, default_warmup=3, plot_default="beside the JSON, .png", load_control=True
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"batch x seq list (default CUDA {CUDA_SHAPES}; CPU {CPU_SHAPES}; --small {SMALL_SHAPES})",
    )
    parser.add_argument("--masks", choices=["none", "padding", "both"], default="both")
    parser.add_argument("--modes", choices=["forward", "forward+backward", "both"], default="both")
    parser.add_argument(
        "--implementations", default=None, help=f"comma list of {', '.join(IMPLEMENTATIONS)} (default all)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    payload = run(args)
    output = args.output or default_output("attention", torch.device(args.device))
    write_json(output, payload)
    print(report(payload))
    print(f"wrote {output}")
    print(f"wrote {plot(payload, args.plot or output.with_suffix('.png'))}")
    return payload


if __name__ == "__main__":
    main()
