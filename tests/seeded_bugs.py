"""Seeded bugs: does the test suite catch them? Run on demand (not collected by pytest):

    python tests/seeded_bugs.py            # every bug
    python tests/seeded_bugs.py -k merge   # the bugs whose name contains "merge"

Each bug is one textual change to a COPY of the package (the real files are never touched: others
may be editing them). The copy (distilqa/, tests/, pyproject.toml) is made once per bug in a
temporary folder; the bug's test subset runs there in a subprocess (``-x``, the copy first on the
import path). A bug is caught when that run fails. The script prints one line per bug and exits 1
if any bug escaped. When a bug escapes, write the test that catches it, and keep the bug here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str
    path: str  # relative to the repository
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments, run in the copy


BUGS = [
    # -- the model ---------------------------------------------------------------------------------
    Bug(
        "model: FFN residual dropped",
        "distilqa/model.py",
        "x = self.output_layer_norm(self.ffn(x, residual=x))",
        "x = self.output_layer_norm(self.ffn(x))",
        ("tests/test_model_parity.py", "-k", "small_configurations"),
    ),
    Bug(
        "model: positions start at 1",
        "distilqa/model.py",
        "position_ids = torch.arange(input_ids.size(1), device=input_ids.device)[None, :]",
        "position_ids = torch.arange(1, input_ids.size(1) + 1, device=input_ids.device)[None, :]",
        ("tests/test_model_parity.py", "-k", "small_configurations"),
    ),
    Bug(
        "model: tanh-approximate GELU",
        "distilqa/model.py",
        'self.activation = nn.GELU() if config.activation == "gelu" else nn.ReLU()',
        'self.activation = nn.GELU(approximate="tanh") if config.activation == "gelu" else nn.ReLU()',
        ("tests/test_model_parity.py", "-k", "small_configurations"),
    ),
    Bug(
        "model: start and end logits swapped",
        "distilqa/model.py",
        "start_logits, end_logits = logits.unbind(dim=-1)",
        "end_logits, start_logits = logits.unbind(dim=-1)",
        ("tests/test_model_parity.py", "-k", "small_configurations"),
    ),
    Bug(
        "model: loss does not ignore out-of-range positions",
        "distilqa/model.py",
        "start_positions = start_positions.reshape(-1).clamp(0, seq)",
        "start_positions = start_positions.reshape(-1).clamp(0, seq - 1)",
        ("tests/test_model_parity.py", "-k", "loss or out_of_range"),
    ),
    # -- attention ---------------------------------------------------------------------------------
    Bug(
        "attention: scale 1/d instead of 1/sqrt(d)",
        "distilqa/model.py",
        "* query.size(-1) ** -0.5",
        "* query.size(-1) ** -1.0",
        ("tests/test_attention.py",),
    ),
    Bug(
        "attention: mask inverted",
        "distilqa/model.py",
        "scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)",
        "scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)",
        ("tests/test_attention.py",),
    ),
    Bug(
        "attention: sdpa NaN on an all-padding row",
        "distilqa/attention.py",
        "mask = mask | ~mask.any(dim=-1, keepdim=True)  # (batch, 1, 1, seq)",
        "mask = mask  # (batch, 1, 1, seq)",
        ("tests/test_attention.py",),
    ),
    Bug(
        "attention: packed windows attend across windows",
        "distilqa/attention.py",
        "return attend_each_window(core, query, key, value, mask, dropout_p)",
        "return core(query, key, value, None, dropout_p, need_weights)",
        ("tests/test_attention.py", "-k", "packed"),
    ),
    Bug(
        "windowing: positions do not restart in each packed window",
        "distilqa/attention.py",
        "return torch.cat([torch.arange(n, device=device) for n in self.lengths])[None, :]",
        "return torch.arange(self.total, device=device)[None, :]",
        ("tests/test_attention.py", "-k", "packed"),
    ),
    Bug(
        "attention: onednn core reads one key too few",
        "distilqa/attention.py",
        "key[b, :, :n].contiguous()",
        "key[b, :, : n - 1].contiguous()",
        ("tests/test_attention.py", "-k", "onednn"),
    ),
    Bug(
        "kernel: triton core trains without gradients",
        "distilqa/attention.py",
        "if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):",
        "if False:",
        ("tests/test_kernels.py", "-k", "training"),
    ),
    # -- GEMM backends and pruning -----------------------------------------------------------------
    Bug(
        "linear: oneDNN path drops the bias",
        "distilqa/linear.py",
        "_linear_pointwise(x, packed_weight(self), self.bias, self.post_op, [], algorithm)",
        "_linear_pointwise(x, packed_weight(self), None, self.post_op, [], algorithm)",
        ("tests/test_linear.py",),
    ),
    Bug(
        "linear: the residual add's GEMM drops the bias",
        "distilqa/linear.py",
        'binary(x, residual, packed_weight(self), self.bias, "add")',
        'binary(x, residual, packed_weight(self), None, "add")',
        ("tests/test_linear.py",),
    ),
    Bug(
        "linear: the residual fused across training dropout",
        "distilqa/linear.py",
        "inactive = dropout is None or not dropout.training or dropout.p == 0.0",
        "inactive = True",
        ("tests/test_linear.py",),
    ),
    Bug(
        "linear: oneDNN given a layer with every input pruned",
        "distilqa/linear.py",
        "and x.shape[-1] > 0",
        "and x.shape[-1] >= 0",
        ("tests/test_linear.py",),
    ),
    Bug(
        "attention: auto leaves the written-out core out",
        "distilqa/attention.py",
        'AUTO_CANDIDATES = ("sdpa", "onednn", "eager")',
        'AUTO_CANDIDATES = ("sdpa", "onednn")',
        ("tests/test_attention.py", "-k", "auto"),
    ),
    Bug(
        "linear: auto measures float32 for a bfloat16 model",
        "distilqa/linear.py",
        'backend = fastest_linear_backend(dtypes.pop()) if len(dtypes) == 1 else "aten"',
        "backend = fastest_linear_backend()",
        ("tests/test_linear.py",),
    ),
    Bug(
        "linear: the packed weight ignores in-place edits",
        "distilqa/linear.py",
        "weight._version if not weight.is_inference() else None",
        "None",
        ("tests/test_linear.py",),
    ),
    Bug(
        "model: the feed-forward's last chunk dropped",
        "distilqa/model.py",
        "return torch.cat([self(x_part, r_part) for x_part, r_part in chunks]).view_as(x)",
        "return torch.cat([self(x_part, r_part) for x_part, r_part in list(chunks)[:-1]] * 2)"
        "[: x[..., 0].numel()].view_as(x)",
        ("tests/test_linear.py",),
    ),
    Bug(
        "attention: auto measures one shape for every window",
        "distilqa/attention.py",
        "query.dtype, min(8, 1 << (batch - 1).bit_length()), heads, -(-seq // 64) * 64, head_dim",
        "query.dtype",
        ("tests/test_attention.py", "-k", "auto"),
    ),
    Bug(
        "hardware: glibc's trim threshold left alone",
        "distilqa/hardware.py",
        "libc.mallopt(m_mmap_threshold, KEEP_MMAP_THRESHOLD) and libc.mallopt(m_trim_threshold, KEEP_TRIM_THRESHOLD)",
        "libc.mallopt(m_mmap_threshold, KEEP_MMAP_THRESHOLD)",
        ("tests/test_hardware.py", "-k", "freed"),
    ),
    Bug(
        "hardware: the setup round counted in the median",
        "distilqa/hardware.py",
        "statistics.median(times[1:])",
        "statistics.median(times)",
        ("tests/test_hardware.py",),
    ),
    Bug(
        "hardware: the answerer leaves glibc's freed memory alone",
        "distilqa/pipeline.py",
        "hardware.keep_freed_memory()  # each pass reuses the memory the last one freed",
        "pass",
        ("tests/test_pipeline_inputs.py", "-k", "freed"),
    ),
    Bug(
        "linear: int8 weights scaled for a range of 120",
        "distilqa/linear.py",
        "scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)",
        "scales = (weight.abs().amax(dim=1) / 120).clamp_min(1e-12)",
        ("tests/test_linear.py", "-k", "int8"),
    ),
    Bug(
        "linear: the int8 residual add loses the bias",
        "distilqa/linear.py",
        "*weight_args, residual, self.bias, 1.0",
        "*weight_args, residual, None, 1.0",
        ("tests/test_linear.py", "-k", "int8"),
    ),
    Bug(
        "linear: fused GELU approximated with tanh",
        "distilqa/linear.py",
        '"gelu": (nn.GELU, "none", F.gelu),',
        '"gelu": (nn.GELU, "tanh", F.gelu),',
        ("tests/test_linear.py",),
    ),
    Bug(
        "pruning: the caller's config is pruned too",
        "distilqa/model.py",
        "self.config = config = copy.deepcopy(config) if config is not None else DistilBertConfig()",
        "self.config = config = config if config is not None else DistilBertConfig()",
        ("tests/test_pruning.py",),
    ),
    # -- windows and the pipeline's batches ----------------------------------------------------------
    Bug(
        "windowing: a pair's windows reversed",
        "distilqa/pipeline.py",
        "windows.extend(Window(offset + pair, encoding) for encoding in encodings)",
        "windows.extend(Window(offset + pair, encoding) for encoding in reversed(encodings))",
        ("tests/test_pipeline_inputs.py", "-k", "summed_scores"),
    ),
    Bug(
        "windowing: packed logits split in the wrong order",
        "distilqa/pipeline.py",
        "logits[0].float().cpu().split(lengths)",
        "logits[0].float().cpu().split(lengths[::-1])",
        ("tests/test_pipeline_inputs.py", "-k", "batching_does_not_change"),
    ),
    Bug(
        "windowing: CLS not kept for 'no answer'",
        "distilqa/pipeline.py",
        "allowed = context | (ids == cls)",
        "allowed = context",
        ("tests/test_pipeline_inputs.py", "-k", "summed_scores"),
    ),
    # -- span decoding -----------------------------------------------------------------------------
    Bug(
        "decoding: max_answer_len off by one",
        "distilqa/pipeline.py",
        "lengths = min(max_answer_len, seq)",
        "lengths = min(max_answer_len + 1, seq)",
        ("tests/test_pipeline_inputs.py", "-k", "summed_scores"),
    ),
    Bug(
        "decoding: CLS may start an answer",
        "distilqa/pipeline.py",
        "p_start[:, 0] = 0.0  # CLS",
        "p_start[:, 0] = p_start[:, 0]  # CLS",
        ("tests/test_pipeline_inputs.py", "-k", "cls_token"),
    ),
    Bug(
        "decoding: question tokens not excluded from the softmax",
        "distilqa/pipeline.py",
        "EXCLUDED_LOGIT = -10000.0",
        "EXCLUDED_LOGIT = 0.0",
        ("tests/test_pipeline_inputs.py", "-k", "summed_scores"),
    ),
    # -- answer merging ----------------------------------------------------------------------------
    Bug(
        "merging: max instead of sum of equal answers",
        "distilqa/pipeline.py",
        'merged["score"] += score',
        'merged["score"] = max(merged["score"], score)',
        ("tests/test_pipeline_inputs.py", "-k", "summed_scores"),
    ),
    Bug(
        "merging: 'no answer' is the last window's CLS score, not the lowest",
        "distilqa/pipeline.py",
        "null_scores[pair] = min(null_scores[pair], null_score)",
        "null_scores[pair] = null_score",
        ("tests/test_pipeline_inputs.py", "-k", "summed_scores or lowest_window"),
    ),
    Bug(
        "merging: the last window's offsets kept instead of the first's",
        "distilqa/pipeline.py",
        'merged["score"] += score',
        'merged["score"] += score\n            merged["start"], merged["end"], merged["answer"] = start, end, text',
        ("tests/test_pipeline_inputs.py", "-k", "summed_scores"),
    ),
    # -- the metric --------------------------------------------------------------------------------
    Bug(
        "metric: articles removed inside words",
        "distilqa/squad.py",
        '_ARTICLES = re.compile(r"\\b(a|an|the)\\b")',
        '_ARTICLES = re.compile(r"(a|an|the)")',
        ("tests/test_squad.py",),
    ),
    Bug(
        "metric: F1 over token sets, not multisets",
        "distilqa/squad.py",
        "common = Counter(prediction_tokens) & Counter(ground_truth_tokens)",
        "common = Counter(set(prediction_tokens) & set(ground_truth_tokens))",
        ("tests/test_squad.py",),
    ),
    Bug(
        "metric: unanswered questions left out of the mean",
        "distilqa/squad.py",
        "exact_match=100.0 * exact_match / total,",
        "exact_match=100.0 * exact_match / max(answered, 1),",
        ("tests/test_squad.py",),
    ),
    # -- loaders -----------------------------------------------------------------------------------
    Bug(
        "loader: q_lin weights transposed",
        "distilqa/weights.py",
        "        converted[name] = tensor\n",
        "        converted[name] = tensor.t() if name.endswith('q_lin.weight') else tensor\n",
        ("tests/test_model_parity.py", "-k", "small_configurations"),
    ),
    Bug(
        "loader: SQuAD answer starts all 0",
        "distilqa/squad.py",
        'starts.append(_field(answer, "answer_start", int, answer_where, source))',
        'starts.append(0 * _field(answer, "answer_start", int, answer_where, source))',
        ("tests/test_squad.py",),
    ),
    # -- the command line --------------------------------------------------------------------------
    Bug(
        "cli: failing pair named by its position in the chunk, not its line",
        "distilqa/cli.py",
        "lines[first + error.index]",
        "lines[error.index]",
        ("tests/test_cli.py", "-k", "jsonl"),
    ),
]


def run_bug(bug: Bug, data: str, timeout: float) -> tuple[bool, float, str]:
    """(caught, seconds, last line of the test run) for one bug applied to a fresh copy. A bug whose
    ``old`` and ``new`` are equal is the control: its selection must pass on the unchanged code."""
    with tempfile.TemporaryDirectory(prefix="seeded-bug-") as folder:
        copy = Path(folder)
        shutil.copytree(REPO / "distilqa", copy / "distilqa", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
        target = copy / bug.path
        text = target.read_text(encoding="utf-8")
        if text.count(bug.old) < 1 or (bug.old != bug.new and text.count(bug.old) != 1):
            raise SystemExit(f"{bug.name}: the text to change occurs {text.count(bug.old)} times in {bug.path}")
        target.write_text(text.replace(bug.old, bug.new), encoding="utf-8")
        # The copy first on the import path: cwd (python -m puts it first) and PYTHONPATH for subprocesses.
        env = {**os.environ, "PYTHONPATH": str(copy), "DISTILQA_DATA": data, "PYTHONDONTWRITEBYTECODE": "1"}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *bug.tests]
        began = time.perf_counter()
        try:
            result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, time.perf_counter() - began, f"timed out after {timeout:.0f} s"
        seconds = time.perf_counter() - began
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        summary = lines[-1] if lines else result.stderr.strip()[-200:]
        if result.returncode == 5:  # no test collected: the selection is wrong, not a catch
            return False, seconds, "no test selected: " + summary
        return result.returncode != 0, seconds, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only the bugs whose name contains this")
    parser.add_argument("--control", action="store_true", help="run each test selection on the unchanged package")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per bug's test run (default 900)")
    parser.add_argument(
        "--data",
        default=os.environ.get("DISTILQA_DATA", str(REPO.parent / "shared" / "data")),
        help="the shared data folder (default $DISTILQA_DATA, else ../shared/data)",
    )
    args = parser.parse_args()
    bugs = [bug for bug in BUGS if args.k in bug.name]
    if args.control:  # each distinct test selection on the unchanged package: it must pass, or a "catch" means nothing
        selections = list(dict.fromkeys(bug.tests for bug in bugs))
        failing = []
        for tests in selections:
            control = Bug("control", "distilqa/__init__.py", '"""', '"""', tests)
            failed, seconds, summary = run_bug(control, args.data, args.timeout)
            print(f"control {' '.join(tests)} ({seconds:.0f} s): {summary}")
            sys.stdout.flush()
            if failed or summary.startswith(("no test", "timed out")):
                failing.append(tests)
        print(f"{len(selections) - len(failing)} of {len(selections)} selections pass on the unchanged package")
        return 1 if failing else 0
    escaped = []
    for number, bug in enumerate(bugs, start=1):
        caught, seconds, summary = run_bug(bug, args.data, args.timeout)
        print(f"[{number}/{len(bugs)}] {'caught ' if caught else 'ESCAPED'} {bug.name} ({seconds:.0f} s): {summary}")
        sys.stdout.flush()
        if not caught:
            escaped.append(bug.name)
    print(
        f"{len(bugs) - len(escaped)} of {len(bugs)} seeded bugs caught" + (f"; escaped: {escaped}" if escaped else "")
    )
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
