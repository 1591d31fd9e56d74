"""The benchmark scripts run end to end on the CPU (tiny sizes) and write the JSON they promise.

Each script runs in a subprocess, exactly as a user runs it, with ``--small --threads 1`` so that
the run is short (and does not fight other work for cores); the numbers are only checked for
being present, positive and consistent, not for speed.
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

from benchmarks import common  # noqa: E402
from benchmarks.forward import SMALL_CONFIG, layer_gemms  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


def assert_timing(timing: dict) -> None:
    assert set(timing) >= {"median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "iqr_ms", "repeats"}
    assert 0 < timing["min_ms"] <= timing["q1_ms"] <= timing["median_ms"] <= timing["q3_ms"] <= timing["max_ms"]
    assert timing["iqr_ms"] >= 0 and timing["repeats"] == 2
    assert len(timing["samples_ms"]) == 2 and min(timing["samples_ms"]) == pytest.approx(timing["min_ms"])
    assert timing["attempts"] == 1, "--retries 0: one attempt"
    assert timing["other_load"] is None or 0 <= timing["other_load"] <= 1


def assert_machine(machine: dict, threads: int) -> None:
    for key in ("cpu_model", "logical_cores", "python", "torch", "transformers", "date", "device", "device_name"):
        assert machine[key], key
    assert machine["torch_threads"] == threads


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# -- forward.py ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("forward")
    output, plot = directory / "forward.json", directory / "forward.png"
    result = run_script(
        "forward", "--small", "--threads", "1", "--repeats", "2", "--warmup", "1", "--retries", "0",
        "--variants", "distilqa-eager,distilqa-sdpa,distilqa-onednn,onnxruntime,openvino",
        "--output", str(output), "--plot", str(plot), "--profile",
    )  # fmt: skip
    return json.loads(output.read_text()), plot, result.stdout


def test_forward_json_has_every_case(forward_run):
    payload, _, _ = forward_run
    assert payload["benchmark"] == "forward"
    assert_machine(payload["machine"], threads=1)
    settings = payload["settings"]
    assert settings["small"] is True and settings["threads"] == 1 and settings["device"] == "cpu"
    assert settings["shapes"] == [[1, 16], [2, 32]] and settings["masks"] == ["ones", "none"]
    assert settings["dtypes"] == ["fp32"]
    variants = {
        "transformers-eager",
        "transformers-sdpa",
        "onnxruntime",
        "openvino",
        "distilqa-eager",
        "distilqa-sdpa",
        "distilqa-onednn",
    }
    assert set(settings["variants"]) == variants  # the transformers counterparts are added
    cases = {(r["batch"], r["seq"], r["mask"], r["variant"]) for r in payload["results"]}
    assert cases == {(b, s, m, v) for b, s in [(1, 16), (2, 32)] for m in ("ones", "none") for v in variants}


def test_forward_numbers_are_sane(forward_run):
    payload, _, _ = forward_run
    for result in payload["results"]:
        assert_timing(result["timing"])
        assert positive(result["gflop"]) and positive(result["gflop_per_s"]) and positive(result["fraction_of_matmul"])
        assert result["gflop"] == pytest.approx(result["gflop_linear"] + result["gflop_attention"])
        assert result["library"] in ("distilqa", "transformers", "onnxruntime", "openvino")
        assert positive(result["first_call_ms"]) and positive(result["fraction_of_matmul_paired"])
        # Same weights, same inputs: the same logits (measured: 0 for the eager twins, <= 2e-7 otherwise).
        assert 0 <= result["max_abs_logit_diff"] <= 1e-5, result["variant"]
        if result["variant"] == "distilqa-eager":
            assert result["max_abs_logit_diff"] == 0.0, "eager vs transformers eager is bit for bit"
    assert len(payload["matmul"]) == 4
    for matmul in payload["matmul"]:
        assert_timing(matmul["timing"])
        assert positive(matmul["gflop_per_s"]) and positive(matmul["with_bias"]["gflop_per_s"])
        by_library = matmul["gflop_per_s_by_library"]
        assert set(by_library) == {"F.linear", "onednn"} and matmul["gflop_per_s"] == max(by_library.values())
        assert [(g["K"], g["N"], g["count_per_layer"]) for g in matmul["gemms"]] == layer_gemms(SMALL_CONFIG)
        assert all(positive(g["gflop_per_s"]) for g in matmul["gemms"])
    ratios = {(r["batch"], r["seq"], r["mask"], r["distilqa"]): r for r in payload["ratios"]}
    assert len(ratios) == 12
    medians = {(r["batch"], r["seq"], r["mask"], r["variant"]): r["timing"]["median_ms"] for r in payload["results"]}
    for (batch, seq, mask, name), ratio in ratios.items():
        assert ratio["transformers"] == ("transformers-eager" if name.endswith("eager") else "transformers-sdpa")
        assert positive(ratio["speedup"]) and positive(ratio["speedup_of_min"]) and positive(ratio["speedup_paired"])
        peers = {v: t for (b, s, m, v), t in medians.items() if (b, s, m) == (batch, seq, mask) and "distilqa" not in v}
        assert ratio["strongest_peer"] == min(peers, key=peers.get)
        expected = peers[ratio["strongest_peer"]] / medians[(batch, seq, mask, name)]
        assert ratio["speedup_vs_strongest_peer"] == pytest.approx(expected)


def test_forward_profile_breakdown(forward_run):
    payload, _, stdout = forward_run
    profiled = {(p["batch"], p["seq"], p["variant"]) for p in payload["profiles"]}
    assert profiled == {
        (b, s, v) for b, s in [(1, 16), (2, 32)] for v in ("transformers-sdpa", "distilqa-sdpa", "distilqa-onednn")
    }
    for profile in payload["profiles"]:
        assert positive(profile["profiled_ms_per_forward"])
        assert sum(c["share"] for c in profile["categories"].values()) == pytest.approx(1.0)
        assert profile["categories"]["gemm"]["share"] > 0 and profile["top_ops"]
    assert "where the time goes" in stdout


def test_forward_prints_a_table_and_writes_a_png(forward_run):
    _, plot, stdout = forward_run
    assert "matmul reference" in stdout and "speedup" in stdout and "distilqa-onednn" in stdout
    assert plot.read_bytes()[:8] == PNG_MAGIC


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


# -- attention.py ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("attention") / "attention.json"
    result = run_script(
        "attention", "--small", "--threads", "1", "--repeats", "2", "--warmup", "1", "--retries", "0",
        "--output", str(output),
    )  # fmt: skip
    return json.loads(output.read_text()), output.with_suffix(".png"), result.stdout


def test_attention_json_has_every_case(attention_run):
    payload, _, _ = attention_run
    assert payload["benchmark"] == "attention"
    assert_machine(payload["machine"], threads=1)
    settings = payload["settings"]
    assert settings["shapes"] == [[1, 32], [2, 64]] and settings["dtypes"] == ["fp32"]
    assert settings["masks"] == ["none", "padding"] and settings["modes"] == ["forward", "forward+backward"]
    on_cpu = {"distilqa-eager", "distilqa-sdpa", "sdpa-math", "sdpa-flash", "transformers-eager", "transformers-sdpa"}
    cases = {(r["batch"], r["seq"], r["mask"], r["mode"], r["implementation"]) for r in payload["results"]}
    expected = {
        (b, s, m, mode, name)
        for b, s in [(1, 32), (2, 64)]
        for m in ("none", "padding")
        for mode in ("forward", "forward+backward")
        for name in on_cpu
    }
    assert cases == expected
    skipped = {s["implementation"] for s in payload["skipped"]}
    assert skipped == {"sdpa-efficient", "sdpa-cudnn"}, "CUDA-only backends are skipped on CPU, with a reason"
    assert all(s["why"] for s in payload["skipped"])


def test_attention_numbers_are_sane(attention_run):
    payload, png, stdout = attention_run
    for result in payload["results"]:
        assert_timing(result["timing"])
        assert positive(result["tflop"]) and positive(result["tflop_per_s"])
        assert result["max_abs_diff_vs_sdpa_math"] <= 1e-5
    assert "transformers-sdpa" in stdout and "skipped sdpa-efficient" in stdout
    assert png.read_bytes()[:8] == PNG_MAGIC, "the PNG goes beside the JSON by default"


# -- common.py ----------------------------------------------------------------------------------


def test_summarize_and_parse_pairs():
    stats = common.summarize([0.004, 0.001, 0.002, 0.003])
    assert stats["median_ms"] == pytest.approx(2.5) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["max_ms"] == pytest.approx(4.0) and stats["iqr_ms"] == pytest.approx(1.5)
    assert common.summarize([0.002])["iqr_ms"] == 0
    assert common.parse_pairs("1x128, 8X384") == [(1, 128), (8, 384)]
    for bad in ("8", "0x3", "ax3", "8x"):
        with pytest.raises(SystemExit):
            common.parse_pairs(bad)


def test_write_json_and_table(tmp_path):
    path = common.write_json(tmp_path / "a" / "b.json", {"x": float("nan"), "y": [1.5, float("inf")], "z": (1, 2)})
    assert json.loads(path.read_text()) == {"x": None, "y": [1.5, None], "z": [1, 2]}
    table = common.format_table(["name", "ms"], [["a", 1.23456], ["bb", 123.456], ["c", None]])
    lines = table.splitlines()
    assert lines[0].split() == ["name", "ms"] and "1.235" in table and "123.5" in table and lines[-1].endswith("-")
    assert (
        common.default_output("forward", common.torch.device("cpu"))
        == ROOT / "benchmarks" / "results" / "forward-cpu.json"
    )


SQUAD_FILE = ROOT.parent / "shared" / "data" / "squad" / "dev-v1.1.json.zip"
VOCAB_FILE = ROOT.parent / "shared" / "data" / "vocab" / "bert-base-cased-vocab.txt"


def test_pipeline_small_run_writes_results(tmp_path):
    if not (SQUAD_FILE.exists() and VOCAB_FILE.exists()):
        pytest.skip(f"benchmarks/pipeline.py reads SQuAD dev and the vocabulary from {SQUAD_FILE.parent.parent}")
    output = tmp_path / "pipeline.json"
    run_script("pipeline", "--small", "--threads", "1", "--chunks", "2", "--output", str(output))
    payload = json.loads(output.read_text())
    assert_machine(payload["machine"], threads=1)
    rows = {row["runner"]: row for row in payload["results"]}
    modes = {f"distilqa {m}" for m in ("fp32", "fp32-aten", "bf16", "int8", "fp32-compiled")}
    assert set(rows) == modes | {"onnxruntime", "openvino", "transformers b1", "transformers b8", "transformers b32"}
    assert payload["settings"]["questions"] == 16 and payload["settings"]["windows"] >= 16
    for name, row in rows.items():
        assert positive(row["questions_per_second"]) and positive(row["gflop_per_s_end_to_end"]), name
        assert row["gflop_per_s_end_to_end"] == pytest.approx(payload["settings"]["gflop_total"] / row["seconds"])
        if name != "distilqa bf16":  # fp32 arithmetic (int8: a tiny model barely moves): the same answers
            assert row["identical_to_best_reference"] == 16, name
    assert rows["distilqa fp32"]["max_abs_logit_diff_vs_fp32"] == 0.0
    assert 0 < rows["distilqa bf16"]["max_abs_logit_diff_vs_fp32"] < 1e-2
    assert set(payload["fp32_gemm_gflop_per_s"]) == {"aten", "onednn"}
