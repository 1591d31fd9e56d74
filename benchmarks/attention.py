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
    distilqa-triton      distilqa.attention.triton_attention: the hand-written Triton FlashAttention-2
                         kernel (distilqa/kernels); forward only; CUDA, or CPU under TRITON_INTERPRET=1
                         (default only on CUDA)

Masks: ``none``; ``padding``: sequence i of the batch keeps its first
seq - (seq // 2) * (i + 1) // batch keys (from 7/8 down to 1/2 of them for batch 4; 1/2 for batch 1);
``squad-padded``: the batch's windows have SQuAD-like lengths (SQUAD_WINDOW_LENGTHS scaled to seq)
and are padded to seq; ``squad-packed``: the same windows laid end to end in one row with no padding
(distilqa's PackedWindows; batch 1 x sum of the lengths). Each library gets the mask in its own format
(distilqa: (batch, 1, 1, seq) bool; transformers: the (batch, 1, seq, seq) mask its
create_bidirectional_mask builds). Packed windows: the distilqa cores take PackedWindows (eager and
sdpa loop over the windows, triton reads them as cu_seqlens); the sdpa-* backends get a jagged nested
tensor (torch.nested, layout=torch.jagged: the varlen kernels); transformers has no packed input here.

FLOPs are the dense count of the work the layout asks for: forward 2 * 2*heads*head_dim per (query,
key) pair, batch*seq*seq pairs (padded or not) or sum(length^2) (packed); forward plus backward 3x
that (a kernel that recomputes the scores in the backward pass does more work than counted).
``useful_tflop`` counts only pairs of real tokens (sum(length^2) for the padded masks too), so
``useful_tflop_per_s`` compares padded with packed. On CUDA, ``fraction_of_peak`` is TFLOP/s over the
GPU's dense tensor-core peak for the dtype (DENSE_PEAK_TFLOPS, from the vendor's datasheet), and
``fraction_of_matmul`` over a bf16/fp16 8192^3 matmul timed in the same run (the practical ceiling).

CUDA (defaults): batch 1, 16, 128 x seq 128, 384, 512; fp32, fp16, bf16; all masks; CUDA events, median of 20.
CPU (defaults): batch 1, 4 x seq 128, 384; fp32; masks none and padding; time.perf_counter, median of 20.

    python benchmarks/attention.py --plot benchmarks/results/attention-cpu.png
    python benchmarks/attention.py --device cuda --plot benchmarks/results/attention-cuda.png
    python benchmarks/attention.py --device cuda --dtypes fp16,bf16 --modes forward   # what benchmarks/gpu.sh runs
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
from distilqa.attention import PackedWindows, attend, eager_attention, sdpa_attention, triton_attention

HEADS, HEAD_DIM = 12, 64
CUDA_SHAPES = "1x128,1x384,1x512,16x128,16x384,16x512,128x128,128x384,128x512"
CPU_SHAPES = "1x128,1x384,4x128,4x384"
SMALL_SHAPES = "1x32,2x64"
SMALL_HEADS = 2
MASKS = ("none", "padding")  # --masks both (the CPU default)
ALL_MASKS = ("none", "padding", "squad-padded", "squad-packed")  # --masks all (the CUDA default)
# Window lengths (tokens) of SQuAD v1.1 dev as distilqa's tokenizer cuts them (cased vocabulary,
# max_seq_len 384, doc_stride 128): the 5th, 15th, ..., 95th percentiles of its 10822 windows (10570
# questions; mean 181, 2.4% full). Measured once with QuestionContextTokenizer.encode_windows over
# /work/shared/data; written here so that a GPU machine without the data runs the same mix.
SQUAD_WINDOW_LENGTHS = (91, 123, 137, 149, 161, 175, 192, 212, 245, 314)
SQUAD_MAX_SEQ_LEN = 384
# Dense tensor-core peaks (TFLOP/s, no sparsity) by GPU name and dtype, from the vendors' datasheets
# (H100/H200 SXM: bf16/fp16 989, TF32 494; /work/.library/device/H200.md: "dense bf16 about 990").
DENSE_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
}
MODES = ("forward", "forward+backward")
SDPA_BACKENDS = {
    "sdpa-math": "MATH",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}
IMPLEMENTATIONS = (
    "distilqa-eager",
    "distilqa-sdpa",
    *SDPA_BACKENDS,
    "transformers-eager",
    "transformers-sdpa",
    "distilqa-triton",
)
CPU_DEFAULT_IMPLEMENTATIONS = IMPLEMENTATIONS[:-1]  # the Triton kernel runs on CPU only in Triton's interpreter


class _AttentionHost(nn.Module):
    """What transformers' attention functions read from the module they are given."""

    is_causal = False

    def __init__(self) -> None:
        super().__init__()
        self.eval()


def padding_lengths(batch: int, seq: int) -> list[int]:
    return [seq - (seq // 2) * (i + 1) // batch for i in range(batch)]


def squad_lengths(batch: int, seq: int) -> list[int]:
    """``batch`` SQuAD-like window lengths for windows of at most ``seq`` tokens: SQUAD_WINDOW_LENGTHS
    scaled by seq / 384, taken in a fixed order that visits all ten (3 and 10 are coprime)."""
    chosen = [SQUAD_WINDOW_LENGTHS[(3 * i + 6) % len(SQUAD_WINDOW_LENGTHS)] for i in range(batch)]
    return [max(1, min(seq, round(n * seq / SQUAD_MAX_SEQ_LEN))) for n in chosen]


def sequence_lengths(batch: int, seq: int, mask: str) -> list[int]:
    """The real tokens of each sequence (window) of the case."""
    if mask == "padding":
        return padding_lengths(batch, seq)
    if mask.startswith("squad"):
        return squad_lengths(batch, seq)
    return [seq] * batch


def make_masks(batch: int, seq: int, mask: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The mask for each library's format: distilqa's (batch, 1, 1, seq) bool, or PackedWindows for
    squad-packed; transformers' eager (float, additive) and sdpa (bool) (batch, 1, seq, seq), as its
    create_bidirectional_mask builds them (None for squad-packed: it has no packed input)."""
    if mask == "none":
        return {"distilqa": None, "transformers-eager": None, "transformers-sdpa": None}
    if mask == "squad-packed":
        windows = PackedWindows(tuple(squad_lengths(batch, seq)))
        offsets = torch.tensor(windows.offsets, device=device)
        return {"distilqa": windows, "offsets": offsets, "transformers-eager": None, "transformers-sdpa": None}
    lengths = torch.tensor(sequence_lengths(batch, seq, mask), device=device)
    attention_mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None]).long()  # (batch, seq)
    masks: dict[str, Any] = {"distilqa": attention_mask.bool()[:, None, None, :]}
    try:  # another transformers version (a GPU machine's, say) may lack these: its rows are skipped, with why
        import transformers
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError as error:
        masks["transformers-unavailable"] = f"transformers' masks cannot be built here: {error}"
        return masks
    embeds = torch.zeros(batch, seq, 1, device=device, dtype=dtype)  # only its shape, dtype, device are read
    for implementation in ("eager", "sdpa"):
        config = transformers.DistilBertConfig()
        config._attn_implementation = implementation
        masks[f"transformers-{implementation}"] = create_bidirectional_mask(
            config=config, inputs_embeds=embeds, attention_mask=attention_mask
        )
    return masks


def make_implementations(masks: dict[str, Any]) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor] | str]:
    """Each implementation as a function (query, key, value) -> context (batch, seq, heads * head_dim),
    or, where it cannot run these inputs here, a string saying why (transformers' functions with packed
    windows, which they take no such input for, or with a transformers version that lacks them)."""
    host = _AttentionHost()
    key_mask = masks["distilqa"]
    packed = isinstance(key_mask, PackedWindows)

    def merge(context: Tensor) -> Tensor:  # (batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)
        batch, heads, seq, head_dim = context.shape
        return context.transpose(1, 2).reshape(batch, seq, heads * head_dim)

    def nested(t: Tensor) -> Tensor:  # packed (1, heads, total, head_dim) -> jagged (windows, heads, j, head_dim)
        return torch.nested.nested_tensor_from_jagged(t[0].transpose(0, 1), masks["offsets"]).transpose(1, 2)

    def backend(name: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        chosen = getattr(SDPBackend, SDPA_BACKENDS[name])

        def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            with sdpa_kernel(chosen):
                return merge(F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask))

        def run_jagged(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            # nested tensors cannot be made in inference mode ("Cannot set version_counter for inference tensor")
            with torch.inference_mode(False), sdpa_kernel(chosen):
                context = F.scaled_dot_product_attention(nested(q), nested(k), nested(v))
                return context.transpose(1, 2).values().reshape(1, q.size(2), -1)  # (1, total, heads * head_dim)

        return run_jagged if packed else run

    def transformers_function(function: Callable, mask: Tensor | None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            context, _ = function(host, q, k, v, mask, dropout=0.0, scaling=q.size(-1) ** -0.5)
            return context.reshape(q.size(0), q.size(2), -1)  # it returns (batch, seq, heads, head_dim)

        return run

    implementations: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor] | str] = {
        "distilqa-eager": lambda q, k, v: merge(attend(eager_attention, q, k, v, key_mask)[0]),
        "distilqa-sdpa": lambda q, k, v: merge(attend(sdpa_attention, q, k, v, key_mask)[0]),
        **{name: backend(name) for name in SDPA_BACKENDS},
        "distilqa-triton": lambda q, k, v: merge(attend(triton_attention, q, k, v, key_mask)[0]),
    }
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.models.distilbert.modeling_distilbert import eager_attention_forward
    except ImportError as error:
        missing = f"transformers' attention functions are not importable here: {error}"
    else:
        missing = masks.get("transformers-unavailable")
    if packed:
        missing = "takes no packed windows"
    if missing:
        implementations["transformers-eager"] = implementations["transformers-sdpa"] = missing
    else:
        implementations["transformers-eager"] = transformers_function(
            eager_attention_forward, masks["transformers-eager"]
        )
        implementations["transformers-sdpa"] = transformers_function(sdpa_attention_forward, masks["transformers-sdpa"])
    return implementations


def attention_flops(batch: int, seq: int, heads: int, head_dim: int, mode: str) -> int:
    forward = 2 * 2 * batch * heads * seq * seq * head_dim
    return forward if mode == "forward" else 3 * forward


def dense_peak_tflops(device_name: str, dtype_name: str) -> float | None:
    """The GPU's dense tensor-core peak for the dtype (DENSE_PEAK_TFLOPS), or None if not listed."""
    for gpu, peaks in DENSE_PEAK_TFLOPS.items():
        if gpu in device_name:
            return peaks.get(dtype_name)
    return None


def matmul_ceiling(device: torch.device, dtype_names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """TFLOP/s of one large (n x n) @ (n x n) matmul per low-precision dtype on CUDA: the practical
    ceiling that fraction_of_matmul divides by. Nothing on CPU."""
    if device.type != "cuda":
        return {}
    n = 1024 if args.small else 8192
    ceilings = {}
    for name in dtype_names:
        if name == "fp32":
            continue
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=generator).to(device=device, dtype=DTYPES[name]) for _ in range(2))
        timing = time_callables({"matmul": lambda a=a, b=b: a @ b}, args.warmup, args.repeats, device)["matmul"]
        ceilings[name] = {"n": n, "timing": timing, "tflop_per_s": 2 * n**3 / (timing["median_ms"] / 1000) / 1e12}
        del a, b
    return ceilings


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype_names = setup(args)
    default_shapes = SMALL_SHAPES if args.small else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    shapes = parse_pairs(args.shapes or default_shapes)
    heads = SMALL_HEADS if args.small else HEADS
    mask_choice = args.masks or ("all" if device.type == "cuda" else "both")
    masks = {"both": list(MASKS), "all": list(ALL_MASKS)}.get(mask_choice, [mask_choice])
    modes = list(MODES) if args.modes == "both" else [args.modes]
    default_names = IMPLEMENTATIONS if device.type == "cuda" else CPU_DEFAULT_IMPLEMENTATIONS
    names = args.implementations.split(",") if args.implementations else list(default_names)
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
            "squad": f"window i has SQUAD_WINDOW_LENGTHS[(3i+6) % 10] * seq/384 tokens, {SQUAD_WINDOW_LENGTHS} "
            "being the 5th..95th percentiles of SQuAD v1.1 dev's windows at max_seq_len 384, doc_stride 128; "
            "squad-padded pads them to seq, squad-packed lays them end to end in one row",
            "flops": "dense: forward 4*heads*head_dim per (query, key) pair of the layout (batch*seq^2, or "
            "sum(length^2) packed), forward+backward 3x forward; useful_tflop: pairs of real tokens only",
            "dense_peak_tflops": "vendor datasheet, dense tensor cores (DENSE_PEAK_TFLOPS); fp32: TF32",
        },
        "matmul": matmul_ceiling(device, dtype_names, args),
        "results": [],
        "skipped": [],
    }
    for dtype_name in dtype_names:
        for batch, seq in shapes:
            for mask in masks:
                for mode in modes:
                    run_case(payload, names, device, dtype_name, batch, seq, heads, mask, mode, args)
    payload["targets"] = targets(payload)
    payload["machine"]["load_average_at_end"] = load_average()
    return payload


def targets(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """distilqa-triton against the best SDPA backend (sdpa-*, distilqa-sdpa) in each forward case: time
    ratio (> 1: triton faster) and triton's fraction of the dense peak. Issue 11's targets on an H200:
    >= 0.9 on squad-packed, >= 50% of the bf16 peak at 128 x 512."""
    rows = []
    forward = [r for r in payload["results"] if r["mode"] == "forward"]
    for triton in (r for r in forward if r["implementation"] == "distilqa-triton"):
        case = (triton["dtype"], triton["batch"], triton["seq"], triton["mask"])
        rivals = [
            r
            for r in forward
            if (r["dtype"], r["batch"], r["seq"], r["mask"]) == case
            and (r["implementation"].startswith("sdpa-") or r["implementation"] == "distilqa-sdpa")
        ]
        if not rivals:
            continue
        best = min(rivals, key=lambda r: r["timing"]["median_ms"])
        rows.append(
            {
                "dtype": case[0],
                "batch": case[1],
                "seq": case[2],
                "mask": case[3],
                "triton_ms": triton["timing"]["median_ms"],
                "best_sdpa": best["implementation"],
                "best_sdpa_ms": best["timing"]["median_ms"],
                "speed_vs_best_sdpa": best["timing"]["median_ms"] / triton["timing"]["median_ms"],
                "triton_fraction_of_peak": triton["fraction_of_peak"],
            }
        )
    return rows


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

    lengths = sequence_lengths(batch, seq, mask)
    rows, tokens = (1, sum(lengths)) if mask == "squad-packed" else (batch, seq)  # the layout of q, k, v
    # (rows, heads, tokens, head_dim) views of (rows, tokens, heads, head_dim), as split_heads makes them
    q, k, v = (tensor(rows, tokens, heads, HEAD_DIM).transpose(1, 2).requires_grad_(backward) for _ in range(3))
    grad_output = tensor(rows, tokens, heads * HEAD_DIM)
    masks = make_masks(batch, seq, mask, device, dtype)
    implementations = make_implementations(masks)
    if mask == "squad-packed":  # the math backend, window by window

        def reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            with sdpa_kernel(SDPBackend.MATH):
                context = attend(sdpa_attention, q, k, v, masks["distilqa"])[0]  # (1, heads, total, head_dim)
            return context.transpose(1, 2).reshape(1, tokens, -1)

    else:
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

    def skip(name: str, why: str) -> None:
        case = {"dtype": dtype_name, "batch": batch, "seq": seq, "mask": mask, "mode": mode}
        payload["skipped"].append({"implementation": name, **case, "why": why[:500]})

    for name in names:
        if isinstance(implementations[name], str):  # cannot run these inputs here; the string says why
            skip(name, implementations[name])
            continue
        if name == "distilqa-triton" and backward:
            skip(name, "forward only: the Triton kernel has no backward pass")
            continue
        try:  # a backend that is unavailable or rejects these inputs raises: note why and skip it
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                timed(implementations[name])()
                with torch.inference_mode():
                    deviations[name] = (implementations[name](q, k, v).float() - expected).abs().max().item()
        except (RuntimeError, ImportError, ValueError) as error:  # the Triton core: not installed, or not on CUDA
            reasons = [str(w.message).splitlines()[0] for w in caught] + [str(error).splitlines()[0]]
            skip(name, " | ".join(dict.fromkeys(reasons)))
            continue
        functions[name] = timed(implementations[name])
    print(f"[attention] {dtype_name} batch={batch} seq={seq} mask={mask} {mode}: timing {len(functions)}", flush=True)
    timings = (
        time_callables(functions, args.warmup, args.repeats, device, args.retries, args.max_other_load)
        if functions
        else {}
    )
    if mask == "squad-packed":  # the layout holds only real tokens: sum(length^2) pairs
        flops = sum(attention_flops(1, n, heads, HEAD_DIM, mode) for n in lengths)
    else:
        flops = attention_flops(batch, seq, heads, HEAD_DIM, mode)
    useful_flops = sum(attention_flops(1, n, heads, HEAD_DIM, mode) for n in lengths)
    peak = dense_peak_tflops(payload["machine"]["device_name"], dtype_name) if device.type == "cuda" else None
    ceiling = payload.get("matmul", {}).get(dtype_name, {}).get("tflop_per_s")
    for name, timing in timings.items():
        tflop_per_s = flops / (timing["median_ms"] / 1000) / 1e12
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
                "lengths": lengths,
                "timing": timing,
                "tflop": flops / 1e12,
                "tflop_per_s": tflop_per_s,
                "useful_tflop": useful_flops / 1e12,
                "useful_tflop_per_s": useful_flops / (timing["median_ms"] / 1000) / 1e12,
                "fraction_of_peak": tflop_per_s / peak if peak else None,
                "fraction_of_matmul": tflop_per_s / ceiling if ceiling else None,
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
            r["useful_tflop_per_s"],
            None if r.get("fraction_of_peak") is None else f"{100 * r['fraction_of_peak']:.1f}%",
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
        "useful TFLOP/s",
        "% peak",
        "|diff| vs math",
    ]
    lines.append(format_table(headers, rows))
    for dtype, ceiling in payload.get("matmul", {}).items():
        lines.append(f"matmul ceiling {dtype}: {ceiling['n']}^3 at {ceiling['tflop_per_s']:.1f} TFLOP/s")
    if payload.get("targets"):
        lines.append("distilqa-triton against the best SDPA backend (speed > 1: triton faster):")
        target_rows = [
            [
                f"{t['batch']}x{t['seq']}",
                t["dtype"],
                t["mask"],
                t["triton_ms"],
                t["best_sdpa"],
                t["best_sdpa_ms"],
                t["speed_vs_best_sdpa"],
                None if t["triton_fraction_of_peak"] is None else f"{100 * t['triton_fraction_of_peak']:.1f}%",
            ]
            for t in payload["targets"]
        ]
        target_headers = ["shape", "dtype", "mask", "triton ms", "best sdpa", "its ms", "speed", "triton % peak"]
        lines.append(format_table(target_headers, target_rows))
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
                # SQuAD-like masks: TFLOP/s of real-token work, so padded and packed panels compare
                work = "useful_tflop" if mask.startswith("squad") else "tflop"
                for name in dict.fromkeys(r["implementation"] for r in chosen):
                    by_shape = {(r["batch"], r["seq"]): r for r in chosen if r["implementation"] == name}
                    series[name] = (
                        [by_shape[s][f"{work}_per_s"] if s in by_shape else None for s in shapes],
                        [
                            by_shape[s][work] / (by_shape[s]["timing"]["q3_ms"] / 1000) if s in by_shape else None
                            for s in shapes
                        ],
                        [
                            by_shape[s][work] / (by_shape[s]["timing"]["q1_ms"] / 1000) if s in by_shape else None
                            for s in shapes
                        ],
                    )
                panel = {
                    "title": f"{dtype}, {mode}, mask={mask}",
                    "categories": [f"{b}x{s}" for b, s in shapes],
                    "series": series,
                }
                if work == "useful_tflop":
                    panel["ylabel"] = "TFLOP/s of real tokens"
                panels.append(panel)
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
    parser.add_argument(
        "--masks",
        choices=["none", "padding", "squad-padded", "squad-packed", "both", "all"],
        default=None,
        help="both: none and padding (the CPU default); all: also squad-padded and squad-packed (the CUDA default)",
    )
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
