"""End-to-end question answering speed: distilqa's QuestionAnswerer in each mode beside the transformers
question-answering pipeline and the peer runtimes, tokenization and decoding included.

Everyone answers the first N SQuAD v1.1 dev questions with the same checkpoint (random weights at the
published configuration, or ``--model DIR``) and the real cased vocabulary, interleaved chunk by chunk:
each distilqa mode of MODES; the transformers pipeline at each of ``--reference-batch-sizes``; ONNX
Runtime and OpenVINO inside distilqa's own tokenization and decoding, so that only the runtime differs.
Per row: questions/s; answers identical to distilqa fp32's and to the fastest transformers run's; the
largest logit deviation from fp32 (windows of the first 16 questions); GFLOP/s end to end.

    python benchmarks/pipeline.py                     # CPU: benchmarks/results/pipeline-cpu.{json,png}
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

from benchmarks import common
from benchmarks.peers import PEERS, export_reference_onnx
from distilqa import DistilBertConfig, QuestionAnswerer
from distilqa.squad import read_squad
from distilqa.testing import save_reference_checkpoint
from distilqa.tokenization import write_tokenizer_files

SMALL_CONFIG = DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)
# name -> QuestionAnswerer.from_pretrained options. A new mode is one more row.
MODES: dict[str, dict[str, Any]] = {
    "fp32": dict(dtype="float32"),
    "fp32-aten": dict(dtype="float32", linear_backend="aten"),
    "bf16": dict(dtype="bfloat16"),
    "fp16": dict(dtype="float16"),
    "int8": dict(dtype="float32", quantize="int8"),
    "fp32-compiled": dict(dtype="float32", compile=True),
}
CPU_ONLY_MODES = ("fp32-aten", "int8")
DEFAULT_MODES = {"cpu": "fp32,fp32-aten,bf16,int8,fp32-compiled", "cuda": "fp32,bf16,fp16,fp32-compiled"}
MAX_SEQ_LEN, DOC_STRIDE = 384, 128  # the pipelines' defaults


def make_checkpoint(directory: Path, args: argparse.Namespace) -> Path:
    """The random-weight checkpoint plus tokenizer files, unless --model names one."""
    if args.model is not None:
        return args.model
    if not args.vocab.exists():
        raise SystemExit(f"vocabulary not found at {args.vocab}; pass --vocab or --model")
    save_reference_checkpoint(directory, SMALL_CONFIG if args.small else DistilBertConfig())
    write_tokenizer_files(directory, args.vocab, lowercase=False)
    return directory


def model_name(args: argparse.Namespace) -> str:
    return str(args.model) if args.model else ("small random" if args.small else "random, published config")


def read_questions(args: argparse.Namespace, count: int) -> tuple[list[str], list[str]]:
    if not args.data.exists():
        raise SystemExit(f"SQuAD v1.1 not found at {args.data}; pass --data")
    squad = read_squad(args.data)
    squad = squad[:count] if count > 0 else squad
    return [q.question for q in squad], [q.context for q in squad]


def interleaved(runners: dict, questions: list[str], contexts: list[str], chunks: int) -> tuple[dict, dict, dict]:
    """Every runner answers every question, chunk by chunk in turn, so that load from other processes
    falls on all alike. Returns answers, seconds and the first (warm-up, compiling) call's seconds."""
    first_call = {}
    for name, run_chunk in runners.items():
        began = time.perf_counter()
        run_chunk(questions[:8], contexts[:8])
        first_call[name] = time.perf_counter() - began
    answers, seconds = {name: [] for name in runners}, dict.fromkeys(runners, 0.0)
    size = -(-len(questions) // chunks)
    for start in range(0, len(questions), size):
        for name, run_chunk in runners.items():
            began = time.perf_counter()
            result = run_chunk(questions[start : start + size], contexts[start : start + size])
            seconds[name] += time.perf_counter() - began
            result = result if isinstance(result, list) else [result]
            answers[name] += [(a["answer"], a["start"], a["end"]) for a in result]
    return answers, seconds, first_call


def encode(answerer: QuestionAnswerer, questions: list[str], contexts: list[str]) -> list:
    return answerer.tokenizer.encode_windows(questions, contexts, MAX_SEQ_LEN, DOC_STRIDE)


def window_logits(model: torch.nn.Module, answerer: QuestionAnswerer, questions, contexts) -> torch.Tensor:
    """Start and end logits of the questions' windows as one padded batch: (2, windows, seq) float32."""
    windows = [w for pair in encode(answerer, questions, contexts) for w in pair]
    longest = max(len(w.ids) for w in windows)
    ids = torch.tensor([w.ids + [0] * (longest - len(w.ids)) for w in windows])
    mask = torch.tensor([[1] * len(w.ids) + [0] * (longest - len(w.ids)) for w in windows])
    with torch.inference_mode():
        out = model(ids.to(answerer.model.device), attention_mask=mask.to(answerer.model.device))
    return torch.stack([out.start_logits.float().cpu(), out.end_logits.float().cpu()]) * mask


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    device, _ = common.setup(args)
    questions, contexts = read_questions(args, 16 if args.small else args.questions)
    modes = (args.modes or DEFAULT_MODES[device.type]).split(",")
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(MODES)}")
    modes = ["fp32", *(m for m in modes if m != "fp32" and (device.type == "cpu" or m not in CPU_ONLY_MODES))]
    peers = [p for p in args.peers.split(",") if p] if device.type == "cpu" else []
    with tempfile.TemporaryDirectory(prefix="distilqa-bench-") as tmp:
        checkpoint = make_checkpoint(Path(tmp), args)
        options = dict(device=device, batch_size=args.batch_size, attn_implementation=args.attn_implementation)
        answerers = {
            f"distilqa {m}": QuestionAnswerer.from_pretrained(checkpoint, **options, **MODES[m]) for m in modes
        }
        fp32 = answerers["distilqa fp32"]
        runners: dict[str, Any] = dict(answerers)
        models = {name: answerer.model for name, answerer in answerers.items()}
        if peers:
            onnx_path = export_reference_onnx(checkpoint, Path(tmp) / "reference.onnx")
            for peer in peers:
                models[peer] = PEERS[peer](onnx_path, torch.get_num_threads(), fp32.model.config)
                runners[peer] = QuestionAnswerer(models[peer], fp32.tokenizer, args.batch_size, packed=False)
        folder = str(checkpoint)
        pipe = transformers.pipeline("question-answering", model=folder, tokenizer=folder, device=device)
        for b in [int(b) for b in args.reference_batch_sizes.split(",")]:
            runners[f"transformers b{b}"] = lambda q, c, b=b: pipe(question=q, context=c, batch_size=b)
        models["transformers"] = pipe.model.eval()
        answers, seconds, first_call = interleaved(runners, questions, contexts, args.chunks)
        phases = {
            name: pipeline_phases(answerers[name], questions, contexts) for name in answerers if "int8" not in name
        }
        sample = window_logits(fp32.model, fp32, questions[:16], contexts[:16])
        deviation = {
            name: (window_logits(model, fp32, questions[:16], contexts[:16]) - sample).abs().max().item()
            for name, model in models.items()
        }
    lengths = [len(w.ids) for pair in encode(fp32, questions, contexts) for w in pair]
    flops = sum(common.window_flops(fp32.model.config, n)["total"] for n in lengths)
    gemms = common.gemm_rates(fp32.model.config, device) if device.type == "cpu" else {}
    best_gemm = max(gemms.values(), default=None)
    best_reference = min((n for n in runners if n.startswith("transformers")), key=seconds.get)
    same = lambda a, b: sum(x == y for x, y in zip(answers[a], answers[b]))  # noqa: E731
    rows = [
        {"runner": name, "seconds": seconds[name], "first_call_seconds": first_call[name],
         "questions_per_second": len(questions) / seconds[name],
         "speedup_vs_best_reference": seconds[best_reference] / seconds[name],
         "identical_to_distilqa_fp32": same(name, "distilqa fp32"),
         "identical_to_best_reference": same(name, best_reference),
         "max_abs_logit_diff_vs_fp32": deviation["transformers" if name.startswith("transformers") else name],
         "gflop_per_s_end_to_end": flops / seconds[name] / 1e9,
         "fraction_of_best_fp32_gemm": flops / seconds[name] / 1e9 / best_gemm if best_gemm else None}
        for name in runners
    ]  # fmt: skip
    settings = {"data": str(args.data), "questions": len(questions), "windows": len(lengths),
                "window_tokens": sum(lengths), "gflop_total": flops / 1e9, "model": model_name(args),
                "distilqa_batch_size": args.batch_size, "distilqa_max_tokens": fp32.max_tokens,
                "distilqa_attn_implementation": args.attn_implementation,
                "distilqa_modes": {m: MODES[m] for m in modes},
                "peers": peers, "best_reference": best_reference, "chunks_interleaved": args.chunks}  # fmt: skip
    machine = {**common.machine_info(device), "load_average_at_end": common.load_average()}
    return {"benchmark": "pipeline", "machine": machine, "settings": settings, "fp32_gemm_gflop_per_s": gemms,
            "best_fp32_gemm_gflop_per_s": best_gemm, "results": rows, "phases": phases}  # fmt: skip


# Where an answerer's time goes, by the function that spends it (cProfile's cumulative time).
PHASES = {
    "tokenization": ("tokenization.py", "encode_windows"),
    "forward": ("model.py", "forward"),  # the model's own forward, outermost call
    "packing and batching": ("pipeline.py", "_run"),  # _run minus the forward inside it
    "span decoding": ("pipeline.py", "decode_spans"),
    "merging": ("pipeline.py", "merge_answers"),
    "character offsets": ("pipeline.py", "_characters"),
}


def pipeline_phases(answerer: QuestionAnswerer, questions: list[str], contexts: list[str]) -> dict[str, float]:
    """Shares of one pass's wall time per phase (PHASES; "other" the rest), measured with cProfile."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    began = time.perf_counter()
    profiler.runcall(answerer, questions, contexts)
    total = time.perf_counter() - began
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    cumulative = {
        phase: max(
            (v[3] for (path, _, name), v in stats.items() if path.endswith(f"distilqa/{file}") and name == fn),
            default=0.0,
        )
        for phase, (file, fn) in PHASES.items()
    }
    cumulative["packing and batching"] -= cumulative["forward"]
    shares = {phase: seconds / total for phase, seconds in cumulative.items()}
    return {**shares, "other": 1 - sum(shares.values()), "seconds": total}


def phases_table(payload: dict[str, Any]) -> str:
    """Where each distilqa mode's time goes, as shares of one profiled pass."""
    phases = payload.get("phases", {})
    names = [*PHASES, "other"]
    rows = [
        [runner] + [f"{100 * shares[p]:.1f}%" for p in names] + [f"{shares['seconds']:.2f}"]
        for runner, shares in phases.items()
    ]
    return common.markdown_table(["runner", *names, "seconds (profiled)"], rows)


def table(payload: dict[str, Any]) -> str:
    n = payload["settings"]["questions"]
    best = payload["settings"]["best_reference"]
    rows = [
        [r["runner"], r["questions_per_second"], f"{r['speedup_vs_best_reference']:.2f}x",
         f"{r['identical_to_distilqa_fp32']}/{n}", f"{r['identical_to_best_reference']}/{n}",
         f"{r['max_abs_logit_diff_vs_fp32']:.1e}", r["gflop_per_s_end_to_end"],
         "" if r["fraction_of_best_fp32_gemm"] is None else f"{100 * r['fraction_of_best_fp32_gemm']:.0f}%"]
        for r in payload["results"]
    ]  # fmt: skip
    headers = ["runner", "questions/s", f"vs {best}", "same answers as distilqa fp32", f"same as {best}",
               "max logit diff vs fp32", "GFLOP/s", "of best fp32 GEMM"]  # fmt: skip
    return common.markdown_table(headers, rows)


def plot(payload: dict[str, Any], path: Path) -> Path:
    rows = payload["results"]
    panels = [
        {"title": f"first {payload['settings']['questions']} SQuAD v1.1 dev questions",
         "xlabel": "questions per second (higher is faster)",
         "bars": [(r["runner"], r["questions_per_second"]) for r in rows]},
        {"title": "achieved GFLOP/s end to end", "xlabel": "GFLOP/s (higher is faster)",
         "bars": [(r["runner"], r["gflop_per_s_end_to_end"]) for r in rows]},
    ]  # fmt: skip
    if payload.get("best_fp32_gemm_gflop_per_s"):
        panels[1]["line"] = (payload["best_fp32_gemm_gflop_per_s"], "best fp32 GEMM")
    model = payload["settings"]["model"]
    model = {"random, published config": "random weights at the published size", "small random": "a tiny model"}.get(
        model, model
    )
    title = f"Question answering end to end, tokenization and decoding included; {model}"
    return common.figure(path, panels, title, payload)


def add_data_arguments(parser: argparse.ArgumentParser, questions: int) -> None:
    parser.add_argument("--data", type=Path, default=common.SQUAD_FILE, help="SQuAD v1.1 (.json or .zip)")
    parser.add_argument("--vocab", type=Path, default=common.VOCAB_FILE, help="the cased WordPiece vocabulary")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint folder with tokenizer files")
    parser.add_argument("--questions", type=int, default=questions, help="the first N questions (0: all)")


def options(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, 512)
    parser.add_argument("--batch-size", type=int, default=32, help="distilqa's windows per forward pass")
    parser.add_argument("--chunks", type=int, default=4, help="interleave the runners over this many chunks")
    parser.add_argument("--modes", default=None, help=f"distilqa modes, some of {', '.join(MODES)}")
    parser.add_argument("--peers", default="onnxruntime,openvino", help="peer runtimes (CPU only; '' for none)")
    parser.add_argument("--reference-batch-sizes", default="1,8,32", help="transformers pipeline batch sizes")
    parser.add_argument("--attn-implementation", default="auto", help="distilqa's attention core (default auto)")


def main(argv: list[str] | None = None) -> dict[str, Any]:  # one pass; --repeats and --dtypes: unused
    return common.script("pipeline", __doc__, options, run, table, plot, repeats=1, warmup=1, argv=argv)


if __name__ == "__main__":
    main()
