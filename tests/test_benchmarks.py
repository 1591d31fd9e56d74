"""The benchmark scripts run end to end on the CPU (tiny sizes) and write the JSON they promise; the
committed pictures' and docs tables' source, ``benchmarks/results``, is what docs/speed.md shows.

Each script runs in a subprocess, exactly as a user runs it, with ``--small --threads 1`` so that the
run is short; numbers are checked for being present, positive and consistent, never for speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from benchmarks import common, report  # noqa: E402
from benchmarks.common import layer_gemms  # noqa: E402
from benchmarks.forward import SMALL_CONFIG, VARIANTS  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ("--small", "--threads", "1", "--repeats", "2", "--warmup", "1")
ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def run_script(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env or ENV)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    return run_script([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args])


def assert_timing(timing: dict) -> None:
    assert 0 < timing["min_ms"] <= timing["q1_ms"] <= timing["median_ms"] <= timing["q3_ms"] <= timing["max_ms"]
    assert timing["repeats"] == 2 and len(timing["samples_ms"]) == 2
    assert min(timing["samples_ms"]) == pytest.approx(timing["min_ms"])


def assert_machine(machine: dict) -> None:
    for key in ("date", "cpu_model", "logical_cores", "python", "torch", "transformers", "device_name"):
        assert machine[key], key
    assert machine["torch_threads"] == 1 and isinstance(machine["cpu_flags"], list)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# -- forward.py ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("forward") / "forward.json"
    variants = "distilqa-eager,distilqa-sdpa,distilqa-onednn,distilqa-int8,onnxruntime,openvino"
    result = run_benchmark("forward", *QUICK, "--variants", variants, "--profile", "--output", str(output))
    return json.loads(output.read_text()), output.with_suffix(".png"), result.stdout


def test_forward_json_has_every_case(forward_run):
    payload, png, stdout = forward_run
    assert payload["benchmark"] == "forward"
    assert_machine(payload["machine"])
    names = ["transformers-eager", "transformers-sdpa", "onnxruntime", "openvino", "distilqa-eager", "distilqa-sdpa",
             "distilqa-onednn", "distilqa-int8"]  # fmt: skip
    assert payload["settings"]["variants"] == names, "the transformers references are added, in table order"
    cases = {(r["batch"], r["seq"], r["variant"]) for r in payload["results"]}
    assert cases == {(b, s, v) for b, s in [(1, 16), (2, 32)] for v in names}
    assert png.read_bytes()[:8] == PNG_MAGIC, "the PNG goes beside the JSON by default"
    assert "| 1 x 16 |" in stdout and "distilqa-onednn ms" in stdout


def test_forward_numbers_are_consistent(forward_run):
    payload, _, _ = forward_run
    gemm = {(m["batch"], m["seq"]): m for m in payload["matmul"]}
    for result in payload["results"]:
        assert_timing(result["timing"])
        assert result["gflop"] == pytest.approx(result["gflop_linear"] + result["gflop_attention"])
        assert result["gflop_per_s"] == pytest.approx(result["gflop"] / result["timing"]["median_ms"] * 1000)
        limit = gemm[result["batch"], result["seq"]]["gflop_per_s"]
        assert result["fraction_of_matmul"] == pytest.approx(result["gflop_per_s"] / limit)
        assert positive(result["first_call_ms"]) and result["library"] == common.kind(result["variant"])
        # The same weights and inputs give the same logits (measured <= 1e-7), int8 aside.
        if result["variant"] != "distilqa-int8":
            assert result["max_abs_logit_diff"] <= 1e-5, result["variant"]
        if result["variant"] == "distilqa-eager":
            assert result["max_abs_logit_diff"] == 0.0, "eager vs transformers eager is bit for bit"
    for m in payload["matmul"]:
        assert_timing(m["timing"])
        assert set(m["gflop_per_s_by_library"]) == {"F.linear", "onednn"}
        assert m["gflop_per_s"] == max(m["gflop_per_s_by_library"].values())
    assert {(p["batch"], p["variant"]) for p in payload["profiles"]} == {
        (b, v) for b in (1, 2) for v in ("transformers-sdpa", "distilqa-sdpa", "distilqa-onednn")
    }
    for profile in payload["profiles"]:
        assert sum(profile["shares"].values()) == pytest.approx(1.0) and profile["shares"]["gemm"] > 0


def test_forward_modes_are_one_row_each():
    """Every mode is a name and a way to build it; each builds the same network from a checkpoint."""
    assert {"distilqa-onednn", "distilqa-int8", "distilqa-compile", "distilqa-triton"} <= set(VARIANTS)
    assert all(callable(variant.build) and variant.only in ("", "cpu", "cuda") for variant in VARIANTS.values())


@pytest.mark.parametrize("length", [1, 37, 128])
def test_flop_count_matches_what_torch_counts(length):
    """The benchmarks' FLOP formula against torch's own FLOP counter on a real forward (eager
    attention, so both attention matmuls are counted as the matmuls they are)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from distilqa import DistilBertConfig, DistilBertForQuestionAnswering

    config = DistilBertConfig(vocab_size=100, dim=64, n_layers=3, n_heads=4, hidden_dim=96)
    model = DistilBertForQuestionAnswering(config, attn_implementation="eager").eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.ones(1, length, dtype=torch.long))
    assert common.window_flops(config, length)["total"] == counter.get_total_flops()
    per_layer = sum(2 * length * k * n * c for k, n, c in layer_gemms(config))
    assert common.window_flops(config, length)["linear"] == config.n_layers * per_layer + 2 * length * config.dim * 2
    assert layer_gemms(SMALL_CONFIG)[1] == (64, 256, 1)


# -- attention.py ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("attention") / "attention.json"
    masks = "none,padding,squad-packed"
    result = run_benchmark("attention", *QUICK, "--masks", masks, "--output", str(output))
    return json.loads(output.read_text()), output.with_suffix(".png"), result.stdout


def test_attention_json_has_every_case(attention_run):
    payload, png, stdout = attention_run
    assert_machine(payload["machine"])
    names = payload["settings"]["implementations"]
    assert "distilqa-triton" not in names, "the Triton kernel runs on the CPU only in its interpreter"
    cases = [(b, s, m, mode) for b, s in [(1, 32), (2, 64)] for m in ("none", "padding", "squad-packed")
             for mode in ("forward", "forward+backward")]  # fmt: skip
    ran = {(r["batch"], r["seq"], r["mask"], r["mode"], r["implementation"]) for r in payload["results"]}
    skipped = {(s["batch"], s["seq"], s["mask"], s["mode"], s["implementation"]): s["why"] for s in payload["skipped"]}
    for case in cases:  # every implementation either ran or says why not, once
        for name in names:
            assert ((*case, name) in ran) != ((*case, name) in skipped), (case, name)
    assert all(skipped.values()), "a skipped case says why"
    on_cpu = ("distilqa-eager", "distilqa-sdpa", "sdpa-math", "sdpa-flash", "transformers-eager", "transformers-sdpa")
    assert {(*case, name) for case in cases if case[2] != "squad-packed" for name in on_cpu} <= ran
    assert {(*case, name) for case in cases if case[2] == "squad-packed" for name in on_cpu[:3]} <= ran
    assert {("sdpa-efficient", "none"), ("sdpa-cudnn", "none"), ("transformers-sdpa", "squad-packed")} <= {
        (key[4], key[2]) for key in skipped
    }
    assert png.read_bytes()[:8] == PNG_MAGIC and "sdpa-math ms" in stdout


def test_attention_numbers_are_consistent(attention_run):
    payload, _, _ = attention_run
    for result in payload["results"]:
        assert_timing(result["timing"])
        assert positive(result["tflop_per_s"]) and result["useful_tflop"] <= result["tflop"]
        assert result["max_abs_diff_vs_sdpa_math"] <= 1e-5  # measured <= 1e-6
        if result["mask"] == "squad-packed":  # packed windows do no work on padding
            assert result["useful_tflop"] == pytest.approx(result["tflop"])


# -- pipeline.py and serve.py ----------------------------------------------------------------


needs_data = pytest.mark.skipif(
    not (common.SQUAD_FILE.exists() and common.VOCAB_FILE.exists()),
    reason=f"the pipeline and serving benchmarks read SQuAD dev and the vocabulary from {common.SHARED_DATA}",
)


@needs_data
def test_pipeline_small_run(tmp_path):
    output = tmp_path / "pipeline.json"
    run_benchmark("pipeline", "--small", "--threads", "1", "--chunks", "2", "--output", str(output))
    payload = json.loads(output.read_text())
    assert_machine(payload["machine"])
    rows = {row["runner"]: row for row in payload["results"]}
    modes = {
        f"distilqa {m}" for m in ("fp32", "fp32-aten", "bf16", "bf16-aten", "bf16-fp32-attention", "int8", "int8-aten")
    }
    modes.add("distilqa fp32-compiled")
    assert set(rows) == modes | {"onnxruntime", "openvino", "transformers b1", "transformers b8", "transformers b32"}
    assert payload["settings"]["questions"] == 16 and payload["settings"]["windows"] >= 16
    assert set(payload["bf16_gemm_gflop_per_s"]) == {"F.linear", "onednn"}  # the bf16 GEMM ceiling, beside fp32's
    for name, row in rows.items():
        assert row["gflop_per_s_end_to_end"] == pytest.approx(payload["settings"]["gflop_total"] / row["seconds"])
        if "bf16" not in name:  # fp32 arithmetic (int8 barely moves a tiny model): the same answers
            assert row["identical_to_best_reference"] == 16, name
    assert rows["distilqa fp32"]["max_abs_logit_diff_vs_fp32"] == 0.0
    assert 0 < rows["distilqa bf16"]["max_abs_logit_diff_vs_fp32"] < 1e-2
    assert set(payload["fp32_gemm_gflop_per_s"]) == {"F.linear", "onednn"}
    assert output.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


@needs_data
def test_serve_small_run(tmp_path):
    pytest.importorskip("fastapi")
    output = tmp_path / "serve.json"
    run_benchmark(
        "serve", "--small", "--threads", "1", "--concurrency", "1,4", "--ray-workers", "", "--output", str(output)
    )
    payload = json.loads(output.read_text())
    assert [row["concurrency"] for row in payload["server"]] == [1, 4]
    assert all(row["errors"] == 0 and row["p50_ms"] <= row["p99_ms"] for row in payload["server"])
    assert positive(payload["in_process_pairs_per_second"]) and payload["ray"] == []


# -- gpu.sh, report.py, common.py ------------------------------------------------------------


def test_gpu_script_dry_run(tmp_path):
    """The prepared CUDA command runs its steps on the CPU at tiny sizes (the Triton kernel in its interpreter)."""
    pytest.importorskip("triton")
    results = tmp_path / "dry"
    env = {**ENV, "PYTHON": sys.executable, "DISTILQA_DATA": str(tmp_path / "no-data")}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--results", str(results)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)  # fmt: skip
    assert result.returncode == 1 and "pipeline (no data)" in result.stdout, result.stdout[-3000:]
    for step in ("attention", "forward"):
        assert f"== {step}: exit status 0" in result.stdout
        assert (results / f"{step}-cpu-dry-run.png").read_bytes()[:8] == PNG_MAGIC
    attention = json.loads((results / "attention-cpu-dry-run.json").read_text())
    triton = [r for r in attention["results"] if r["implementation"] == "distilqa-triton"]
    assert {r["mask"] for r in triton} == {"none", "padding", "squad-padded", "squad-packed"}
    assert all(r["max_abs_diff_vs_sdpa_math"] <= 1e-5 for r in triton)


def test_run_all_checks_every_step_name_before_running_any(tmp_path):
    env = {**ENV, "PYTHON": str(tmp_path / "no-python")}  # a step that started would fail differently
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_all.sh"), "forward", "fowrard"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)  # fmt: skip
    assert result.returncode == 2 and "unknown step fowrard" in result.stderr and not result.stdout


def test_docs_tables_are_the_committed_results():
    """The results tables of docs/ are made from benchmarks/results/*.json by benchmarks/report.py."""
    pages = {page.name: page.read_text(encoding="utf-8") for page in report.DOCS.glob("*.md")}
    assert len(report.TABLE.findall(pages["speed.md"])) >= 3, "docs/speed.md marks its generated tables"
    for name, text in pages.items():
        assert report.tables(text) == text, f"docs/{name} is stale: run python benchmarks/report.py"


def test_report_fills_a_table_from_json(tmp_path):
    payload = json.loads((common.RESULTS / "pipeline-cpu.json").read_text())
    payload["results"][0]["questions_per_second"] = 1234.5
    (tmp_path / "pipeline-cpu.json").write_text(json.dumps(payload))
    text = "before\n<!-- table: pipeline-cpu.json -->\nold\n<!-- end table -->\nafter\n"
    filled = report.tables(text, tmp_path)
    assert filled.startswith("before\n<!-- table: pipeline-cpu.json -->\n\n| runner |") and filled.endswith("after\n")
    assert "| distilqa fp32 | 1234 |" in filled and "old" not in filled


def test_every_committed_result_is_from_one_machine():
    """Ratios are compared within one machine's results only: one CPU for the CPU files, one GPU for CUDA's."""
    machines: dict[str, set[str]] = {}
    for path in common.RESULTS.glob("*.json"):
        machine = json.loads(path.read_text())["machine"]
        machines.setdefault(machine["device"].split(":")[0], set()).add(machine["device_name"])
    assert machines and all(len(names) == 1 for names in machines.values()), machines


def test_summarize_and_parse_pairs(tmp_path):
    stats = common.summarize([0.004, 0.001, 0.002, 0.003])
    assert stats["median_ms"] == pytest.approx(2.5) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["q1_ms"] == pytest.approx(1.75) and stats["q3_ms"] == pytest.approx(3.25)
    assert common.parse_pairs("1x128, 8X384") == [(1, 128), (8, 384)]
    for bad in ("8", "0x3", "ax3", "8x"):
        with pytest.raises(SystemExit):
            common.parse_pairs(bad)
    path = common.write_json(tmp_path / "a" / "b.json", {"x": float("nan"), "y": [1.5, float("inf")], "z": (1, 2)})
    assert json.loads(path.read_text()) == {"x": None, "y": [1.5, None], "z": [1, 2]}
    assert common.markdown_table(["a", "b"], [["x", 1234.5], ["y", 0.01234]]).splitlines()[2:] == [
        "| x | 1234 |",
        "| y | 0.0123 |",
    ]


def test_colours_are_one_family_per_kind():
    kinds = {name: common.kind(name) for name in ("distilqa fp32", "distilqa-sdpa", "onnxruntime", "openvino",
                                                  "sdpa-math", "transformers b8", "transformers-eager")}  # fmt: skip
    assert kinds == {"distilqa fp32": "distilqa", "distilqa-sdpa": "distilqa", "onnxruntime": "peer",
                     "openvino": "peer", "sdpa-math": "peer", "transformers b8": "reference",
                     "transformers-eager": "reference"}  # fmt: skip
    palette = common.colours(list(kinds))
    blue, orange, grey = palette["distilqa fp32"], palette["onnxruntime"], palette["transformers b8"]
    assert blue[2] > blue[0] and orange[0] > orange[2] and max(grey[:3]) - min(grey[:3]) < 0.01
