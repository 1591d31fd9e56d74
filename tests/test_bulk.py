"""Bulk answering on Ray Data actors: a local two-worker run answers exactly as one process does, in
input order; a worker that dies mid-batch costs a retry, never a lost or doubled answer.

Ray's start (about 15 s here) and each actor pool's start (a process per actor importing torch)
dominate these tests, so one Ray instance serves the module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from conftest import SQUAD_FILE  # noqa: E402

from distilqa import QuestionAnswerer, bulk  # noqa: E402
from distilqa.bulk import PairAnswerer, answer_on_ray, iter_answers_on_ray  # noqa: E402
from distilqa.cli import main  # noqa: E402

LOAD = {"linear_backend": "aten"}  # the same GEMM in every process: no per-actor measurement


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs (one actor each) for this module."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",  # never a cluster that `ray start` left on this machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=200 * 2**20,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pairs() -> tuple[list[str], list[str]]:
    if not SQUAD_FILE.exists():
        pytest.skip(f"SQuAD dev set not found at {SQUAD_FILE}")
    from distilqa.squad import read_squad

    questions = read_squad(SQUAD_FILE)[:48]
    return [q.question for q in questions], [q.context for q in questions]


def assert_same_answers(got: list[dict], expected: list[dict]) -> None:
    assert [(a["answer"], a["start"], a["end"]) for a in got] == [(a["answer"], a["start"], a["end"]) for a in expected]
    assert [a["score"] for a in got] == pytest.approx([a["score"] for a in expected], rel=1e-4, abs=1e-7)


def test_two_workers_answer_as_one_process_in_order(local_ray, tiny_checkpoint, pairs, tmp_path, monkeypatch):
    questions, contexts = pairs
    marks = tmp_path / "batches"
    marks.mkdir()

    class RecordingAnswerer(PairAnswerer):  # defined here: Ray ships it to the workers by value
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            (marks / f"started-{os.getpid()}").touch()
            deadline = time.monotonic() + 120
            while len(list(marks.glob("started-*"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # both actors ready together, so that both get batches

        def __call__(self, batch):
            (marks / f"{os.getpid()}-{int(batch['index'][0])}").touch()  # which process answered which batch
            if int(batch["index"][0]) == 0:
                time.sleep(1.0)  # the first batch finishes after later ones: order is not free
            return super().__call__(batch)

    monkeypatch.setattr(bulk, "PairAnswerer", RecordingAnswerer)
    answers = answer_on_ray(questions, contexts, tiny_checkpoint, workers=2, rows_per_batch=6, load_options=LOAD)
    expected = QuestionAnswerer.from_pretrained(tiny_checkpoint, **LOAD)(questions, contexts)
    assert len(answers) == len(questions)
    assert_same_answers(answers, expected)
    batches = [name.name for name in marks.iterdir() if not name.name.startswith("started-")]
    workers = {name.split("-")[0] for name in batches}
    assert len(workers) == 2, f"the batches ran in {len(workers)} process(es), not 2"
    assert len(batches) == len(questions) // 6


def test_a_worker_dying_mid_batch_loses_and_doubles_nothing(local_ray, tiny_checkpoint, pairs, tmp_path, monkeypatch):
    questions, contexts = pairs
    crash_once = tmp_path / "crash-once"
    crash_once.touch()
    answered = tmp_path / "answered"
    answered.mkdir()

    class CrashingAnswerer(PairAnswerer):
        def __call__(self, batch):
            result = super().__call__(batch)
            first = int(batch["index"][0])
            (answered / f"{first}-{os.getpid()}").touch()
            if first == 12 and crash_once.exists():  # the whole process dies after the work, before replying
                crash_once.unlink()
                os._exit(1)
            return result

    monkeypatch.setattr(bulk, "PairAnswerer", CrashingAnswerer)
    results = list(
        iter_answers_on_ray(questions, contexts, tiny_checkpoint, workers=2, rows_per_batch=6, load_options=LOAD)
    )
    assert not crash_once.exists(), "the worker never crashed: the test did not test anything"
    assert len([p for p in answered.iterdir() if p.name.startswith("12-")]) == 2, "batch 12 was not retried"
    assert [index for index, _, _ in results] == list(range(len(questions)))  # each once, in order
    expected = QuestionAnswerer.from_pretrained(tiny_checkpoint, **LOAD)(questions, contexts)
    assert_same_answers([answer for _, answer, _ in results], expected)


def test_cli_ask_on_ray_writes_answers_in_input_order(local_ray, tiny_checkpoint, pairs, tmp_path, capsys):
    questions, contexts = pairs
    source = tmp_path / "pairs.jsonl"
    lines = [{"id": f"q{i}", "question": q, "context": c} for i, (q, c) in enumerate(zip(questions[:20], contexts))]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    argv = ["ask", "--model", str(tiny_checkpoint), "--input", str(source), "--output", str(output)]
    assert main([*argv, "--ray", "--ray-workers", "2", "--linear-backend", "aten"]) == 0
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == [line["id"] for line in lines]
    expected = QuestionAnswerer.from_pretrained(tiny_checkpoint, **LOAD)(questions[:20], contexts[:20])
    assert_same_answers([r["answer"] for r in records], expected)
    assert not list(tmp_path.glob("*.partial"))


def test_cli_ray_needs_input_and_output(tiny_checkpoint, capsys, tmp_path):
    argv = ["ask", "--model", str(tiny_checkpoint), "--question", "Where?", "--context", "In Paris.", "--ray"]
    assert main(argv) == 2
    assert "--ray answers a file: it needs --input FILE.jsonl and --output FILE.jsonl" in capsys.readouterr().err
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"question": "Where?", "context": "In Paris."}) + "\n", encoding="utf-8")
    assert main(["ask", "--model", str(tiny_checkpoint), "--input", str(source), "--ray"]) == 2
    assert "needs --input FILE.jsonl and --output" in capsys.readouterr().err
    assert main(["ask", "--model", str(tiny_checkpoint), "--input", str(source), "--ray-workers", "2"]) == 2
    assert "--ray-workers goes with --ray" in capsys.readouterr().err


@pytest.mark.slow  # one more actor pool: about 15 s
def test_a_refused_pair_names_its_line_and_writes_nothing(local_ray, tiny_checkpoint, tmp_path, capsys):
    source = tmp_path / "pairs.jsonl"
    rows = [{"question": "Where?", "context": "In Paris."}, {"question": "Where?", "context": "\x01 \x02"}]
    source.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    output.write_text("kept\n", encoding="utf-8")
    argv = ["ask", "--model", str(tiny_checkpoint), "--input", str(source), "--output", str(output), "--ray"]
    assert main([*argv, "--linear-backend", "aten"]) == 2  # refused before Ray starts: the output exists
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--linear-backend", "aten", "--overwrite"]) == 2
    assert f"{source}:2: the context has no tokens" in capsys.readouterr().err
    assert output.read_text(encoding="utf-8") == "kept\n"
    assert not list(Path(tmp_path).glob("*.partial"))


def ask_on_ray_in_a_subprocess(tmp_path: Path, checkpoint: Path, *extra: str) -> subprocess.CompletedProcess:
    source = tmp_path / "pairs.jsonl"
    rows = [{"question": "Where?", "context": "In Paris."}, {"question": "Who?", "context": "Bob is in Paris."}]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    argv = ["ask", "--model", str(checkpoint), "--input", "pairs.jsonl", "--output", "answers.jsonl", *extra]
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    return subprocess.run(
        [sys.executable, "-m", "distilqa.cli", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )


def test_ask_on_ray_says_nothing_but_its_own_lines(tiny_checkpoint, tmp_path):
    """Ray's notices (token authentication, core_worker.cc lines, Ray Data's INFO and WARNING logs)
    stay out of a user's terminal; only the progress bar and distilqa's summary remain."""
    result = ask_on_ray_in_a_subprocess(tmp_path, tiny_checkpoint, "--ray", "--ray-workers", "1")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "answered 2 questions into answers.jsonl"
    assert all("%|" in line for line in lines[:-1]), result.stderr
    assert len((tmp_path / "answers.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_an_unreachable_cluster_is_one_error_line(tiny_checkpoint, tmp_path):
    with socket.socket() as listener:  # a port nothing listens on: bound, never listening
        listener.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        result = ask_on_ray_in_a_subprocess(tmp_path, tiny_checkpoint, "--ray", address)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert message.startswith(f"distilqa: error: no Ray cluster answers at '{address}'"), result.stderr
    assert not (tmp_path / "answers.jsonl").exists()
