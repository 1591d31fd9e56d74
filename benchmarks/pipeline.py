"""End-to-end question answering speed on the first N SQuAD v1.1 dev questions, tokenization and decoding
included, interleaved chunk by chunk: distilqa's QuestionAnswerer per mode of MODES, the peers inside its
tokenization and decoding, the transformers pipeline per batch size. Per row: questions/s, answers identical
to distilqa fp32's and to the fastest transformers run's, logit deviation from fp32, GFLOP/s end to end."""

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: `benchmarks` importable

import torch
from torch.nn.utils.rnn import pad_sequence

from benchmarks import common
from distilqa import DistilBertConfig, QuestionAnswerer
from distilqa.attention import auto_attention
from distilqa.squad import read_squad
from distilqa.testing import save_reference_checkpoint
from distilqa.tokenization import write_tokenizer_files

SMALL_CONFIG = DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)


def float32_attention(query, key, value, mask, dropout_p=0.0, need_weights=False):
    """A researcher's core: a bf16 model's attention computed in float32, the rest of it in bf16."""
    context, _ = auto_attention(query.float(), key.float(), value.float(), mask, dropout_p)
    return context.to(query.dtype), None


# name -> QuestionAnswerer.from_pretrained options. A new mode is one more row.
MODES: dict[str, dict[str, Any]] = {
    "fp32": dict(dtype="float32"),
    "fp32-aten": dict(dtype="float32", linear_backend="aten"),
    "bf16": dict(dtype="bfloat16"),
    "bf16-aten": dict(dtype="bfloat16", linear_backend="aten"),  # PyTorch's own bf16 GEMMs, no post-ops
    "bf16-fp32-attention": dict(dtype="bfloat16", attn_implementation=float32_attention),  # bf16 attention's cost
    "fp16": dict(dtype="float16"),
    "int8": dict(dtype="float32", quantize="int8"),  # on oneDNN's int8 GEMM where "auto" picks oneDNN
    "int8-aten": dict(dtype="float32", quantize="int8", linear_backend="aten"),  # PyTorch's dynamic int8 layers
    "fp32-compiled": dict(dtype="float32", compile=True),
}
CPU_ONLY_MODES = ("fp32-aten", "bf16-aten", "int8", "int8-aten")
DEFAULT_MODES = {
    "cpu": "fp32,fp32-aten,bf16,bf16-aten,bf16-fp32-attention,int8,int8-aten,fp32-compiled",
    "cuda": "fp32,bf16,fp16,fp32-compiled",
}
MAX_SEQ_LEN, DOC_STRIDE = 384, 128  # the pipelines' defaults
MODEL_TITLES = {"small random": "a tiny model", "random, published config": "random weights at the published size"}
# Where an answerer's time goes, by the function that spends it (cProfile's cumulative time).
PHASES = {
    "tokenization": ("tokenization.py", "encode_windows"),
    "forward": ("model.py", "forward"),  # the model's own forward, outermost call
    "packing and batching": ("pipeline.py", "_run"),  # _run minus the forward inside it
    "span decoding": ("pipeline.py", "decode_spans"),
    "merging": ("pipeline.py", "merge_answers"),
    "character offsets": ("pipeline.py", "_characters"),
}


def load_data(args: argparse.Namespace, folder: Path, count: int) -> tuple[Path, list[str], list[str]]:
    """The checkpoint (--model, or random weights written to ``folder``), the first ``count`` pairs (0: all)."""
    if not args.data.exists() or not (args.model or args.vocab.exists()):
        raise SystemExit(f"SQuAD v1.1 ({args.data}) or the vocabulary ({args.vocab}) not found: pass --data, --vocab")
    if args.model is None:
        save_reference_checkpoint(folder, SMALL_CONFIG if args.small else DistilBertConfig())
        write_tokenizer_files(folder, args.vocab, lowercase=False)
    squad = read_squad(args.data)[: count or None]
    return args.model or folder, [q.question for q in squad], [q.context for q in squad]


def model_name(args: argparse.Namespace) -> str:
    return str(args.model) if args.model else ("small random" if args.small else "random, published config")


def interleaved(runners: dict, questions: list[str], contexts: list[str], chunks: int) -> tuple[dict, dict, dict]:
    """Each runner answers every question, chunk by chunk in turn: results, seconds, first-call seconds."""
    first_call = {}
    for name, run_chunk in runners.items():
        began = time.perf_counter()
        run_chunk(questions[:8], contexts[:8])
        first_call[name] = time.perf_counter() - began
    results, seconds = {name: [] for name in runners}, dict.fromkeys(runners, 0.0)
    size = -(-len(questions) // chunks)
    for start in range(0, len(questions), size):
        for name, run_chunk in runners.items():
            began = time.perf_counter()
            result = run_chunk(questions[start : start + size], contexts[start : start + size])
            seconds[name] += time.perf_counter() - began
            results[name] += result if isinstance(result, list) else [result]
    return results, seconds, first_call


def windows(answerer: QuestionAnswerer, questions: list[str], contexts: list[str]) -> list:
    return [w for pair in answerer.tokenizer.encode_windows(questions, contexts, MAX_SEQ_LEN, DOC_STRIDE) for w in pair]


def window_logits(model: torch.nn.Module, answerer: QuestionAnswerer, questions, contexts) -> torch.Tensor:
    """Start and end logits of the questions' windows as one padded batch: (2, windows, seq) float32."""
    rows = [torch.tensor(w.ids) for w in windows(answerer, questions, contexts)]
    ids = pad_sequence(rows, batch_first=True)
    mask = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True)
    with torch.inference_mode():
        out = model(ids.to(answerer.model.device), attention_mask=mask.to(answerer.model.device))
    return torch.stack([out.start_logits.float().cpu(), out.end_logits.float().cpu()]) * mask


def run(args: argparse.Namespace, device: torch.device, _: list[str]) -> dict[str, Any]:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    modes = (args.modes or DEFAULT_MODES[device.type]).split(",")
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(MODES)}")
    modes = ["fp32", *(m for m in modes if m != "fp32" and (device.type == "cpu" or m not in CPU_ONLY_MODES))]
    peers = [p for p in args.peers.split(",") if p] if device.type == "cpu" else []
    with tempfile.TemporaryDirectory(prefix="distilqa-bench-") as tmp:
        checkpoint, questions, contexts = load_data(args, Path(tmp), 16 if args.small else args.questions)
        shared = dict(device=device, batch_size=args.batch_size, attn_implementation=args.attn_implementation)
        answerers = {
            f"distilqa {m}": QuestionAnswerer.from_pretrained(checkpoint, **{**shared, **MODES[m]}) for m in modes
        }
        fp32 = answerers["distilqa fp32"]
        runners: dict[str, Any] = dict(answerers)
        models = {name: answerer.model for name, answerer in answerers.items()}
        for peer in peers:
            models[peer] = common.load_peer(peer, checkpoint, Path(tmp) / "reference.onnx", fp32.model.config)
            runners[peer] = QuestionAnswerer(models[peer], fp32.tokenizer, args.batch_size, packed=False)
        pipe = transformers.pipeline("question-answering", str(checkpoint), tokenizer=str(checkpoint), device=device)
        for b in [int(b) for b in args.reference_batch_sizes.split(",")]:
            runners[f"transformers b{b}"] = lambda q, c, b=b: pipe(question=q, context=c, batch_size=b)
        models["transformers"] = pipe.model.eval()
        results, seconds, first_call = interleaved(runners, questions, contexts, args.chunks)
        phases = {name: pipeline_phases(a, questions, contexts) for name, a in answerers.items() if "int8" not in name}
        logits = {name: window_logits(model, fp32, questions[:16], contexts[:16]) for name, model in models.items()}
    deviation = {name: (x - logits["distilqa fp32"]).abs().max().item() for name, x in logits.items()}
    answers = {name: [(a["answer"], a["start"], a["end"]) for a in result] for name, result in results.items()}
    lengths = [len(w.ids) for w in windows(fp32, questions, contexts)]
    flops = sum(common.window_flops(fp32.model.config, n)["total"] for n in lengths)
    gemms = common.gemm_rates(fp32.model.config, device) if device.type == "cpu" else {}
    bf16_gemms = common.gemm_rates(fp32.model.config, device, torch.bfloat16) if device.type == "cpu" else {}
    best_gemm = max(gemms.values(), default=None)
    best_reference = min((n for n in runners if n.startswith("transformers")), key=seconds.get)
    rows = [{"runner": name, "seconds": seconds[name], "first_call_seconds": first_call[name],
             "questions_per_second": len(questions) / seconds[name],
             "speedup_vs_best_reference": seconds[best_reference] / seconds[name],
             "identical_to_distilqa_fp32": sum(a == b for a, b in zip(answers[name], answers["distilqa fp32"])),
             "identical_to_best_reference": sum(a == b for a, b in zip(answers[name], answers[best_reference])),
             "max_abs_logit_diff_vs_fp32": deviation["transformers" if name.startswith("transformers") else name],
             "gflop_per_s_end_to_end": flops / seconds[name] / 1e9,
             "fraction_of_best_fp32_gemm": flops / seconds[name] / 1e9 / best_gemm if best_gemm else None}
            for name in runners]  # fmt: skip
    settings = {"data": str(args.data), "questions": len(questions), "windows": len(lengths),
                "window_tokens": sum(lengths), "gflop_total": flops / 1e9, "model": model_name(args),
                "distilqa_batch_size": args.batch_size, "distilqa_max_tokens": fp32.max_tokens,
                "distilqa_attn_implementation": args.attn_implementation,
                "distilqa_modes": {m: {k: getattr(v, "__name__", v) for k, v in MODES[m].items()} for m in modes},
                "peers": peers, "best_reference": best_reference, "chunks_interleaved": args.chunks}  # fmt: skip
    return {"settings": settings, "fp32_gemm_gflop_per_s": gemms, "best_fp32_gemm_gflop_per_s": best_gemm,
            "bf16_gemm_gflop_per_s": bf16_gemms,
            "results": rows, "phases": phases}  # fmt: skip


def pipeline_phases(answerer: QuestionAnswerer, questions: list[str], contexts: list[str]) -> dict[str, float]:
    """Shares of one pass's wall time per phase (PHASES; "other" the rest), measured with cProfile."""
    profiler = cProfile.Profile()
    began = time.perf_counter()
    profiler.runcall(answerer, questions, contexts)
    total = time.perf_counter() - began
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    cumulative = dict.fromkeys(PHASES, 0.0)
    for phase, (file, function) in PHASES.items():
        for (path, _, name), (_, _, _, seconds, _) in stats.items():
            if path.endswith(f"distilqa/{file}") and name == function:
                cumulative[phase] = max(cumulative[phase], seconds)
    cumulative["packing and batching"] -= cumulative["forward"]
    shares = {phase: seconds / total for phase, seconds in cumulative.items()}
    return {**shares, "other": 1 - sum(shares.values()), "seconds": total}


def phases_table(payload: dict[str, Any]) -> str:
    """Where each distilqa mode's time goes, as shares of one profiled pass."""
    names = [*PHASES, "other"]
    rows = [[runner, *(f"{100 * shares[p]:.1f}%" for p in names), f"{shares['seconds']:.2f}"]
            for runner, shares in payload.get("phases", {}).items()]  # fmt: skip
    return common.markdown_table(["runner", *names, "seconds (profiled)"], rows)


def table(payload: dict[str, Any]) -> str:
    n, best = payload["settings"]["questions"], payload["settings"]["best_reference"]
    rows = [[r["runner"], r["questions_per_second"], f"{r['speedup_vs_best_reference']:.2f}x",
             f"{r['identical_to_distilqa_fp32']}/{n}", f"{r['identical_to_best_reference']}/{n}",
             f"{r['max_abs_logit_diff_vs_fp32']:.1e}", r["gflop_per_s_end_to_end"],
             "" if r["fraction_of_best_fp32_gemm"] is None else f"{100 * r['fraction_of_best_fp32_gemm']:.0f}%"]
            for r in payload["results"]]  # fmt: skip
    headers = ["runner", "questions/s", f"vs {best}", "same answers as distilqa fp32", f"same as {best}",
               "max logit diff vs fp32", "GFLOP/s", "of best fp32 GEMM"]  # fmt: skip
    return common.markdown_table(headers, rows)


def plot(payload: dict[str, Any], path: Path) -> Path:
    rows, best_gemm = payload["results"], payload.get("best_fp32_gemm_gflop_per_s")
    panels = [{"title": f"first {payload['settings']['questions']} SQuAD v1.1 dev questions",
               "xlabel": "questions per second (higher is faster)",
               "bars": [(r["runner"], r["questions_per_second"]) for r in rows]},
              {"title": "achieved GFLOP/s end to end", "xlabel": "GFLOP/s (higher is faster)",
               "bars": [(r["runner"], r["gflop_per_s_end_to_end"]) for r in rows],
               **({"line": (best_gemm, "best fp32 GEMM")} if best_gemm else {})}]  # fmt: skip
    model = MODEL_TITLES.get(payload["settings"]["model"], payload["settings"]["model"])
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


if __name__ == "__main__":  # one pass: --repeats, --warmup and --dtypes are unused
    common.main("pipeline", __doc__, options, run, table, plot, repeats=1, warmup=1)
