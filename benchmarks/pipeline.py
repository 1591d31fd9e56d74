"""End-to-end question answering speed: distilqa's QuestionAnswerer in each precision mode against the
transformers question-answering pipeline and the peer runtimes, tokenization and decoding included.

Everyone answers the first N questions (512 by default) of SQuAD v1.1 dev with the same checkpoint
and tokenizer files: transformers' DistilBertForQuestionAnswering with random weights at the
published configuration (or ``--model DIR``), and a tokenizer built from the real cased vocabulary.

Rows, all timed interleaved chunk by chunk in one run:
* distilqa modes (``--modes``): ``fp32`` (the default answerer: float32, GEMM library chosen by
  measurement), ``fp32-aten`` (float32 on PyTorch's default GEMM), ``bf16``, ``fp16``, ``int8``
  (dynamic quantisation of the linear layers), ``fp32-compiled`` (``compile_blocks``; the compile
  time is the first call's, reported apart);
* the transformers pipeline at each of ``--reference-batch-sizes`` (fp32), the reference;
* ONNX Runtime and OpenVINO (fp32) running transformers' exported model inside distilqa's own
  tokenization and decoding (padded windows), so only the runtime differs.

For each row: questions/s; the share of answers identical (answer, start, end) to distilqa fp32's
and to the best transformers configuration's; the largest logit deviation from distilqa fp32 on a
fixed sample of windows; and the achieved GFLOP/s end to end (FLOPs of the windows it ran, divided
by its wall time), beside the fp32 GEMM throughput of each GEMM library at the model's shapes.

    python benchmarks/pipeline.py                     # CPU, writes benchmarks/results/pipeline-cpu.json
    python benchmarks/pipeline.py --device cuda       # fp32, bf16, fp16 (all 10570 questions: --questions 0)
    python benchmarks/pipeline.py --small             # a tiny model and 16 questions, to check the script
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/pipeline.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    add_common_arguments,
    default_output,
    format_table,
    machine_info,
    plot_panels,
    setup,
    window_flops,
    write_json,
)
from benchmarks.peers import PEERS, export_reference_onnx
from distilqa import DistilBertConfig, QuestionAnswerer
from distilqa.hardware import has_native_bfloat16
from distilqa.linear import LINEAR_BACKENDS, fastest_linear_backend, gemm_throughput, onednn_available
from distilqa.testing import save_reference_checkpoint
from distilqa.squad import read_squad
from distilqa.tokenization import write_tokenizer_files

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL_CONFIG = DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)
# distilqa's modes: QuestionAnswerer.from_pretrained options.
MODES: dict[str, dict[str, Any]] = {
    "fp32": dict(dtype="float32"),
    "fp32-aten": dict(dtype="float32", linear_backend="aten"),
    "bf16": dict(dtype="bfloat16"),
    "fp16": dict(dtype="float16"),
    "int8": dict(dtype="float32", quantize="int8"),
    "fp32-compiled": dict(dtype="float32", compile=True),
}
CPU_ONLY_MODES = ("fp32-aten", "int8")
DEFAULT_CPU_MODES = "fp32,fp32-aten,bf16,int8,fp32-compiled"
DEFAULT_CUDA_MODES = "fp32,bf16,fp16,fp32-compiled"
MAX_SEQ_LEN, DOC_STRIDE = 384, 128  # the pipelines' defaults


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, default_repeats=1, default_warmup=1)  # --repeats, --dtypes: unused (see --modes)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "squad" / "dev-v1.1.json.zip", help="SQuAD v1.1")
    parser.add_argument("--vocab", type=Path, default=SHARED_DATA / "vocab" / "bert-base-cased-vocab.txt")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint folder with tokenizer files")
    parser.add_argument("--questions", type=int, default=512, help="the first N questions (0: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="distilqa's windows per forward pass")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="distilqa's tokens per forward pass (default: 2048 on CPU)"
    )
    parser.add_argument("--chunks", type=int, default=4, help="interleave the pipelines over this many chunks")
    parser.add_argument(
        "--modes", default=None, help=f"distilqa modes, some of {', '.join(MODES)} (default CPU: {DEFAULT_CPU_MODES})"
    )
    parser.add_argument("--peers", default="onnxruntime,openvino", help="peer runtimes (CPU only; '' for none)")
    parser.add_argument("--reference-batch-sizes", default="1,8,32", help="transformers pipeline batch sizes")
    parser.add_argument("--attn-implementation", default="sdpa", help="distilqa's attention core (default sdpa)")
    return parser.parse_args(argv)


def make_checkpoint(directory: Path, args: argparse.Namespace) -> Path:
    """The random-weight reference checkpoint plus tokenizer files, unless --model names one."""
    if args.model is not None:
        return args.model
    if not args.vocab.exists():
        raise SystemExit(f"vocabulary not found at {args.vocab}; pass --vocab or --model")
    save_reference_checkpoint(directory, SMALL_CONFIG if args.small else DistilBertConfig())
    write_tokenizer_files(directory, args.vocab, lowercase=False)
    return directory


def keys(results: list[Any]) -> list[tuple[str, int, int]]:
    return [(r["answer"], r["start"], r["end"]) for r in results]


def interleaved(runners, questions, contexts, chunks: int, warmup: bool):
    """Answer all questions with every runner, chunk by chunk in turn (A, B, C on chunk 1, then on
    chunk 2, ...), so that load from other processes falls on all of them alike. Returns each
    runner's answers, total seconds, and the seconds of its warm-up call (compilation happens there)."""
    first_call = dict.fromkeys(runners, 0.0)
    if warmup:
        for name, run_chunk in runners.items():
            began = time.perf_counter()
            run_chunk(questions[:8], contexts[:8])
            first_call[name] = time.perf_counter() - began
    answers = {name: [] for name in runners}
    seconds = dict.fromkeys(runners, 0.0)
    size = -(-len(questions) // chunks)
    for start in range(0, len(questions), size):
        for name, run_chunk in runners.items():
            began = time.perf_counter()
            result = run_chunk(questions[start : start + size], contexts[start : start + size])
            seconds[name] += time.perf_counter() - began
            answers[name].extend(result if isinstance(result, list) else [result])
    return answers, seconds, first_call


def sample_logits(model: torch.nn.Module, answerer: QuestionAnswerer, questions, contexts) -> torch.Tensor:
    """Start and end logits of a fixed sample of windows as one padded batch: (2, windows, seq) float32."""
    windows = [
        w
        for per_pair in answerer.tokenizer.encode_windows(questions, contexts, MAX_SEQ_LEN, DOC_STRIDE)
        for w in per_pair
    ]
    longest = max(len(w.ids) for w in windows)
    ids = torch.tensor([w.ids + [0] * (longest - len(w.ids)) for w in windows])
    mask = torch.tensor([[1] * len(w.ids) + [0] * (longest - len(w.ids)) for w in windows])
    with torch.inference_mode():
        output = model(ids.to(answerer.model.device), attention_mask=mask.to(answerer.model.device))
    return torch.stack([output.start_logits.float().cpu(), output.end_logits.float().cpu()]) * mask


def gemm_throughputs(config: DistilBertConfig) -> dict[str, dict[str, float]]:
    """fp32 CPU GFLOP/s of each GEMM library at the model's GEMM shapes: for each (K, N) the best over
    M = 384, 2048 and 3072 tokens (one window, the pipeline's CPU token cap, 8 windows), then the
    layer's mix weighted by its FLOPs. The best of the libraries is the bar the pipeline is held to."""
    shapes = [(config.dim, config.dim, 4), (config.dim, config.hidden_dim, 1), (config.hidden_dim, config.dim, 1)]
    result = {}
    for backend in LINEAR_BACKENDS:
        if backend == "onednn" and not onednn_available():
            continue
        per_shape = {
            f"{k}x{n}": max(gemm_throughput(backend, tokens, k, n) for tokens in (384, 2048, 3072))
            for k, n, _ in shapes
        }
        flops = [k * n * count for k, n, count in shapes]
        seconds = sum(f / per_shape[f"{k}x{n}"] for f, (k, n, _) in zip(flops, shapes))
        result[backend] = {"layer_mix": sum(flops) / seconds, **per_shape}
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    device, _ = setup(args)
    if not args.data.exists():
        raise SystemExit(f"SQuAD v1.1 not found at {args.data}; pass --data")
    count = 16 if args.small else args.questions
    squad = read_squad(args.data)
    squad = squad[:count] if count > 0 else squad
    questions, contexts = [q.question for q in squad], [q.context for q in squad]
    modes = (args.modes or (DEFAULT_CPU_MODES if device.type == "cpu" else DEFAULT_CUDA_MODES)).split(",")
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(MODES)}")
    if "fp32" not in modes:
        modes.insert(0, "fp32")  # the baseline every mode is compared with
    if device.type != "cpu":
        modes = [m for m in modes if m not in CPU_ONLY_MODES]
    peers = [p for p in args.peers.split(",") if p] if device.type == "cpu" else []
    reference_batch_sizes = [int(b) for b in args.reference_batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="distilqa-bench-") as tmp:
        checkpoint = make_checkpoint(Path(tmp), args)
        answerers = {
            mode: QuestionAnswerer.from_pretrained(
                checkpoint,
                device=device,
                batch_size=args.batch_size,
                max_tokens=args.max_tokens,
                attn_implementation=args.attn_implementation,
                **MODES[mode],
            )
            for mode in modes
        }
        config = answerers["fp32"].model.config
        runners: dict[str, Any] = {f"distilqa {mode}": answerer for mode, answerer in answerers.items()}
        models = {f"distilqa {mode}": answerer.model for mode, answerer in answerers.items()}
        if peers:
            onnx_path = export_reference_onnx(checkpoint, Path(tmp) / "reference.onnx")
            for peer in peers:
                model = PEERS[peer](onnx_path, torch.get_num_threads(), config)
                runners[peer] = QuestionAnswerer(model, answerers["fp32"].tokenizer, args.batch_size, packed=False)
                models[peer] = model
        reference = transformers.pipeline(
            "question-answering", model=str(checkpoint), tokenizer=str(checkpoint), device=device
        )
        for batch_size in reference_batch_sizes:
            runners[f"transformers b{batch_size}"] = lambda q, c, b=batch_size, pipe=reference: pipe(
                question=q, context=c, batch_size=b
            )
        models["transformers"] = reference.model.eval()
        results, seconds, first_call = interleaved(runners, questions, contexts, args.chunks, args.warmup > 0)
        sample = sample_logits(models["distilqa fp32"], answerers["fp32"], questions[:16], contexts[:16])
        deviations = {
            name: (sample_logits(model, answerers["fp32"], questions[:16], contexts[:16]) - sample).abs().max().item()
            for name, model in models.items()
        }
    windows = answerers["fp32"].tokenizer.encode_windows(questions, contexts, MAX_SEQ_LEN, DOC_STRIDE)
    lengths = [len(w.ids) for per_pair in windows for w in per_pair]
    total_flops = sum(window_flops(config, n)["total"] for n in lengths)
    gemms = gemm_throughputs(config) if device.type == "cpu" else {}
    best_gemm = max((g["layer_mix"] for g in gemms.values()), default=None)

    answers = {name: keys(result) for name, result in results.items()}
    references = [name for name in runners if name.startswith("transformers")]
    best_reference = min(references, key=lambda name: seconds[name])
    rows = []
    for name in runners:
        qps = len(questions) / seconds[name]
        gflops = total_flops / seconds[name] / 1e9
        rows.append(
            {
                "runner": name,
                "seconds": seconds[name],
                "first_call_seconds": first_call[name],
                "questions_per_second": qps,
                "speedup_vs_best_reference": seconds[best_reference] / seconds[name],
                "identical_to_distilqa_fp32": sum(a == b for a, b in zip(answers[name], answers["distilqa fp32"])),
                "identical_to_best_reference": sum(a == b for a, b in zip(answers[name], answers[best_reference])),
                "max_abs_logit_diff_vs_fp32": deviations.get(name.split(" b")[0] if name in references else name),
                "gflop_per_s_end_to_end": gflops,
                "fraction_of_best_fp32_gemm": gflops / best_gemm if best_gemm else None,
            }
        )
    return {
        "benchmark": "pipeline",
        "machine": machine_info(device),
        "settings": {
            "data": str(args.data),
            "questions": len(questions),
            "windows": len(lengths),
            "window_tokens": sum(lengths),
            "gflop_total": total_flops / 1e9,
            "model": str(args.model) if args.model else ("small random" if args.small else "random, published config"),
            "distilqa_batch_size": args.batch_size,
            "distilqa_max_tokens": answerers["fp32"].max_tokens,
            "distilqa_attn_implementation": args.attn_implementation,
            "distilqa_modes": {mode: MODES[mode] for mode in modes},
            "linear_backend_auto": fastest_linear_backend() if device.type == "cpu" else "aten",
            "native_bfloat16": has_native_bfloat16(device),
            "peers": peers,
            "reference_batch_sizes": reference_batch_sizes,
            "best_reference": best_reference,
            "chunks_interleaved": args.chunks,
            "flops": "per window: linear layers 2*L*K*N and attention 2*2*heads*L*L*head_dim per layer, + qa head",
            "logit_sample": "start/end logits of the windows of the first 16 questions, padded batch, vs distilqa fp32",
        },
        "fp32_gemm_gflop_per_s": gemms,
        "best_fp32_gemm_gflop_per_s": best_gemm,
        "results": rows,
    }


def print_table(payload: dict[str, Any]) -> None:
    n = payload["settings"]["questions"]
    table = [
        [
            row["runner"],
            row["questions_per_second"],
            row["seconds"],
            row["first_call_seconds"],
            row["speedup_vs_best_reference"],
            f"{row['identical_to_distilqa_fp32']}/{n}",
            f"{row['identical_to_best_reference']}/{n}",
            "" if row["max_abs_logit_diff_vs_fp32"] is None else f"{row['max_abs_logit_diff_vs_fp32']:.1e}",
            row["gflop_per_s_end_to_end"],
            "" if row["fraction_of_best_fp32_gemm"] is None else f"{100 * row['fraction_of_best_fp32_gemm']:.0f}%",
        ]
        for row in payload["results"]
    ]
    headers = [
        "runner",
        "questions/s",
        "seconds",
        "first call s",
        "vs best transformers",
        "same as fp32",
        "same as transformers",
        "logit diff",
        "GFLOP/s",
        "of best GEMM",
    ]
    print(format_table(headers, table))
    gemms = payload["fp32_gemm_gflop_per_s"]
    print(
        "fp32 GEMM GFLOP/s at the model's shapes: " + ", ".join(f"{b} {g['layer_mix']:.0f}" for b, g in gemms.items())
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    rows = payload["results"]
    names = [row["runner"] for row in rows]
    panels = [
        {
            "title": f"{payload['settings']['questions']} SQuAD questions end to end",
            "categories": names,
            "series": {"questions/s": ([row["questions_per_second"] for row in rows], None, None)},
        },
        {
            "title": "achieved GFLOP/s end to end (line: best fp32 GEMM)",
            "categories": names,
            "series": {"GFLOP/s": ([row["gflop_per_s_end_to_end"] for row in rows], None, None)},
            "ylabel": "GFLOP/s",
            **({"hline": payload["best_fp32_gemm_gflop_per_s"]} if payload["best_fp32_gemm_gflop_per_s"] else {}),
        },
    ]
    return plot_panels(
        path, panels, "questions per second", f"End-to-end question answering ({payload['machine']['device_name']})"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    payload = run(args)
    print_table(payload)
    output = args.output or default_output("pipeline-small" if args.small else "pipeline", torch.device(args.device))
    print(f"wrote {write_json(output, payload)}")
    if args.plot is not None:
        print(f"wrote {plot(payload, args.plot)}")
    return payload


if __name__ == "__main__":
    main()
