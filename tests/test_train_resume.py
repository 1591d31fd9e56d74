"""distilqa train stopped by a signal and continued: as a user runs it, in subprocesses with real
SIGINT / SIGTERM; resuming with the saved options; --save-total-limit; checkpoints that appear whole.

The runs use a 1-layer model of width 16 and many steps, so a signal sent once the first step is
logged always lands mid-run; nothing here depends on how fast the machine is (the waits only guard
against a hang).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from synthetic_qa import single_threaded, write_initial_checkpoint, write_task

import distilqa
from distilqa.cli import main
from distilqa.train import (
    CHECKPOINT_PREFIX,
    LOG_FILE,
    STATE_FILE,
    Trainer,
    TrainingOptions,
    checkpoint_steps,
    resumed_options,
    train,
)

HANG_GUARD_S = 300  # a run that has not reached its next state by then is stuck, however slow the machine
DISTILQA = [sys.executable, "-m", "distilqa.cli"]  # what the `distilqa` entry point runs


@pytest.fixture(scope="module")
def long_run(tmp_path_factory) -> dict:
    """A task and a tiny model; the options give about 3000 steps, far more than any test waits for."""
    root = tmp_path_factory.mktemp("long_run")
    paths = write_task(root / "task", n_train=30, n_heldout=4)
    model = write_initial_checkpoint(
        root / "model", paths["vocab"], dim=16, n_layers=1, n_heads=2, hidden_dim=32, dropout=0.1, qa_dropout=0.1
    )
    arguments = ["--model", str(model), "--data", str(paths["train"]), "--epochs", "100", "--batch-size", "2"]
    arguments += ["--max-seq-len", "48", "--doc-stride", "16", "--learning-rate", "1e-3", "--seed", "5"]
    arguments += ["--warmup-ratio", "1"]  # all warm-up: every step's learning rate is peak * (step - 1) / steps
    return {"paths": paths, "model": model, "arguments": arguments}


def start(arguments: list[str], cwd: Path) -> subprocess.Popen:
    """``distilqa train ARGUMENTS`` in ``cwd``, running the distilqa these tests import, on one thread."""
    path = os.pathsep.join(filter(None, [str(Path(distilqa.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*DISTILQA, "train", *arguments], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def step_records(log: Path) -> list[dict]:
    """The whole lines of the log that record an optimizer step."""
    if not log.exists():
        return []
    lines = log.read_text(encoding="utf-8").split("\n")[:-1]  # the last piece may be half-written
    return [record for record in map(json.loads, lines) if "loss" in record]


def wait_for_step_after(process: subprocess.Popen, log: Path, step: int) -> None:
    """Return once the log records a step after ``step``; fail if the run ends or hangs first."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not any(record["step"] > step for record in step_records(log)):
        if process.poll() is not None:
            pytest.fail(f"training ended (status {process.returncode}) early:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no step after {step} logged in {HANG_GUARD_S} s")
        time.sleep(0.05)


def stop(process: subprocess.Popen, number: int) -> tuple[str, str]:
    process.send_signal(number)
    try:
        return process.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"training did not stop within {HANG_GUARD_S} s of {signal.Signals(number).name}")


def assert_stopped_cleanly(output: Path, stdout: str, stderr: str, name: str) -> tuple[int, list[str]]:
    """The run saved checkpoint-<last logged step>, said so, and printed the command to continue on the
    last line of stderr; no traceback, no half-written file. Returns the step and that command."""
    assert "Traceback" not in stderr, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    steps = [record["step"] for record in step_records(output / LOG_FILE)]
    assert summary["stopped_by"] == name and summary["steps"] == steps[-1], summary
    assert steps == list(range(1, steps[-1] + 1))  # every step once, in order
    checkpoint = output / f"{CHECKPOINT_PREFIX}{steps[-1]}"
    assert (checkpoint / STATE_FILE).exists() and (checkpoint / "model.safetensors").exists()
    assert torch.load(checkpoint / STATE_FILE, weights_only=True)["step"] == steps[-1]
    assert not (output / "model.safetensors").exists()  # no final model: the run is not finished
    assert not [path.name for path in output.iterdir() if path.name.startswith(".")]  # no temporary leftovers
    lines = stderr.strip().splitlines()
    command = shlex.split(lines[-1])
    assert f"stopped by {name} after step {steps[-1]}" in lines[-2]
    assert command == ["distilqa", "train", "--resume", str(checkpoint), "--output", str(output)], lines[-1]
    return steps[-1], command


def test_signal_stops_after_the_step_with_a_checkpoint_and_the_printed_command_continues(long_run, tmp_path):
    output = tmp_path / "run7"
    first = start([*long_run["arguments"], "--output", str(output)], tmp_path)
    wait_for_step_after(first, output / LOG_FILE, 0)
    stdout, stderr = stop(first, signal.SIGINT)
    assert first.returncode == 130, stderr
    stopped_at, command = assert_stopped_cleanly(output, stdout, stderr, "SIGINT")

    # The printed command alone continues the run in its own folder, with the saved options.
    second = start(command[2:], tmp_path)
    wait_for_step_after(second, output / LOG_FILE, stopped_at)
    stdout, stderr = stop(second, signal.SIGTERM)
    assert second.returncode == 143, stderr
    stopped_again, _ = assert_stopped_cleanly(output, stdout, stderr, "SIGTERM")
    assert stopped_again > stopped_at
    # The resumed steps follow the schedule of the whole run: the learning rate keeps warming up from
    # where it stopped, by the same increment.
    rates = [record["learning_rate"] for record in step_records(output / LOG_FILE)]
    increment = rates[1] - rates[0]
    assert rates[0] == 0 and increment > 0
    assert rates == pytest.approx([step * increment for step in range(len(rates))], rel=1e-9)


def test_resume_keeps_the_options_that_decide_what_is_learnt(long_run, tmp_path, capsys):
    paths = long_run["paths"]
    options = TrainingOptions(
        model=long_run["model"], data=paths["train"], output=tmp_path / "run", epochs=1, batch_size=8,
        max_seq_len=48, doc_stride=16, save_every=2, progress=False, device="cpu",
    )  # fmt: skip
    with single_threaded():
        train(options)
    checkpoint = tmp_path / "run" / f"{CHECKPOINT_PREFIX}2"
    # Refused, naming the option and what it decides; nothing written.
    for flag, value, decides in [
        ("--batch-size", "4", "which windows form each step"),
        ("--learning-rate", "1", "the learning-rate schedule"),
        ("--epochs", "5", "the number of steps"),
        ("--data", str(paths["heldout"]), "which windows form each step"),
        ("--dtype", "bfloat16", "the arithmetic of every step"),
    ]:
        capsys.readouterr()
        arguments = ["train", "--resume", str(checkpoint), "--output", str(tmp_path / "new"), flag, value]
        assert main(arguments) == 2
        error = capsys.readouterr().err
        assert error.startswith("distilqa: error:") and f"{flag} was " in error and decides in error, error
        assert "Traceback" not in error and not (tmp_path / "new").exists()
    # Given again with the run's own value: accepted. Where to write, what to evaluate and save: applied.
    resumed = resumed_options(
        checkpoint, output=tmp_path / "new", batch_size=8, data=paths["train"], eval_data=paths["heldout"],
        eval_every=3, save_every=1, save_total_limit=2, device="cpu",
    )  # fmt: skip
    assert (resumed.eval_every, resumed.save_every, resumed.save_total_limit) == (3, 1, 2)
    assert (resumed.resume, resumed.output, resumed.batch_size, resumed.max_seq_len) == (
        checkpoint,
        tmp_path / "new",
        8,
        48,
    )
    assert resumed.overwrite is False and Path(resumed.data).samefile(paths["train"])
    # Without --resume, --model and --data are needed.
    capsys.readouterr()
    assert main(["train", "--output", str(tmp_path / "new")]) == 2
    assert "train needs --model and --data, or --resume CHECKPOINT" in capsys.readouterr().err


@pytest.fixture
def small_run(long_run, tmp_path):
    """Library options for a short run (2 epochs of batches of 8) on the long run's task."""
    paths = long_run["paths"]

    def options(output: str, **changes) -> TrainingOptions:
        values = dict(model=long_run["model"], data=paths["train"], output=tmp_path / output, epochs=2)
        values.update(batch_size=8, max_seq_len=48, doc_stride=16, seed=2, progress=False, learning_rate=1e-3)
        return TrainingOptions(**{**values, **changes})

    return options


def test_resume_in_place_after_a_crash_redoes_the_lost_steps(small_run, tmp_path):
    """A run killed without warning (SIGKILL) keeps its last checkpoint; resuming into its own folder
    drops the log records of the steps after it and runs them again, ending as the uninterrupted run."""
    with single_threaded():
        full = train(small_run("full", save_every=3))
        crashed = tmp_path / "crashed"
        shutil.copytree(tmp_path / "full", crashed)
        for step in checkpoint_steps(crashed):  # as if killed after step 7, the newest checkpoint 6
            if step > 6:
                shutil.rmtree(crashed / f"{CHECKPOINT_PREFIX}{step}")
        for name in ("model.safetensors", "config.json"):
            (crashed / name).unlink()
        lines = (crashed / LOG_FILE).read_text().splitlines(keepends=True)
        (crashed / LOG_FILE).write_text("".join(line for line in lines if json.loads(line)["step"] <= 7))
        with pytest.raises(ValueError, match=f"holds {CHECKPOINT_PREFIX}6, newer than --resume"):
            train(resumed_options(crashed / f"{CHECKPOINT_PREFIX}3", output=crashed))
        resumed = train(resumed_options(crashed / f"{CHECKPOINT_PREFIX}6", output=crashed))
    assert resumed.steps == full.steps > 7
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[6:]), rtol=0, atol=1e-6)
    logged, uninterrupted = step_records(crashed / LOG_FILE), step_records(tmp_path / "full" / LOG_FILE)
    assert [r["step"] for r in logged] == list(range(1, full.steps + 1))  # steps 7 and on once each, not twice
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in uninterrupted], rel=0, abs=1e-6)
    assert (crashed / "model.safetensors").exists()


def test_save_total_limit_keeps_the_newest_and_the_best(small_run, long_run, monkeypatch):
    with single_threaded():
        newest = train(small_run("newest", save_every=1, save_total_limit=2))
        assert sorted(checkpoint_steps(newest.output)) == [newest.steps - 1, newest.steps]
        # Scripted scores: the best F1 is at step 5; evaluations every 5 steps, checkpoints every 4.
        monkeypatch.setattr(Trainer, "evaluate", lambda self: {"step": self.step, "f1": 90.0 - (self.step != 5) * 50})
        best = train(
            small_run("best", save_every=4, save_total_limit=1, eval_data=long_run["paths"]["heldout"], eval_every=5)
        )
    assert best.steps % 4 != 0 and best.steps % 5 != 0  # the last checkpoint is only the end's
    assert sorted(checkpoint_steps(best.output)) == [5, best.steps]  # the best is saved when it happens, and kept
    assert torch.load(best.output / f"{CHECKPOINT_PREFIX}{best.steps}" / STATE_FILE, weights_only=True)["best"] == {
        "step": 5,
        "f1": 90.0,
    }


def test_a_checkpoint_appears_whole_or_not_at_all(small_run, monkeypatch):
    def disk_full(state, path):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    options = small_run("full_disk", save_every=1)
    with single_threaded(), pytest.raises(OSError, match="No space left"):
        train(options)
    assert sorted(path.name for path in Path(options.output).iterdir()) == [LOG_FILE, "training_options.json"]


def test_overwrite_replaces_a_run_but_never_deletes_an_input(long_run, tmp_path, capsys):
    paths = long_run["paths"]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "old.txt").write_text("an earlier run")
    data_inside = existing / "train.json"
    shutil.copyfile(paths["train"], data_inside)
    arguments = ["train", "--model", str(long_run["model"]), "--output", str(existing), "--epochs", "1"]
    arguments += ["--batch-size", "16", "--max-seq-len", "48", "--doc-stride", "16"]
    for extra, message in [([], "already exists and is not empty"), (["--overwrite"], "an input inside --output")]:
        capsys.readouterr()
        assert main([*arguments, "--data", str(data_inside), *extra]) == 2
        assert message in capsys.readouterr().err
        assert sorted(path.name for path in existing.iterdir()) == ["old.txt", "train.json"]  # untouched
    with single_threaded():
        assert main([*arguments, "--data", str(paths["train"]), "--overwrite"]) == 0
    assert not (existing / "old.txt").exists() and (existing / "model.safetensors").exists()
