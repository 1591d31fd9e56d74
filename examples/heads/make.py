"""Regenerate this folder: train the test suite's model on the generated task, then run `distilqa heads`.

    python examples/heads/make.py            # about 2-3 minutes on 2 CPU cores
    python examples/heads/make.py --plots    # only redraw the two pictures from the JSON files here

Writes importance.json, importance.png, pruning_curve.json and pruning_curve.png next to this file,
from the same task, initial weights and training command as tests/test_train.py. The pictures are
titled for the data they show: the generated task's held-out questions (tests/synthetic_qa.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))

from synthetic_qa import (  # noqa: E402 (the tests folder is not a package)
    DOC_STRIDE,
    MAX_SEQ_LEN,
    TRAIN_ARGS,
    single_threaded,
    write_initial_checkpoint,
    write_task,
)

from distilqa.cli import main  # noqa: E402
from distilqa.files import atomic_write  # noqa: E402
from distilqa.heads import plot_curve, plot_importance  # noqa: E402
from distilqa.plotting import require_matplotlib  # noqa: E402

QUESTIONS = "held-out questions of the generated task"


def plots() -> int:
    """Draw importance.png and pruning_curve.png from the JSON files beside this script."""
    pyplot = require_matplotlib("examples/heads/make.py")
    report = json.loads((HERE / "importance.json").read_text(encoding="utf-8"))
    curve = json.loads((HERE / "pruning_curve.json").read_text(encoding="utf-8"))
    importance = torch.tensor([[float("nan") if v is None else v for v in row] for row in report["importance"]])
    title = f"Head importance on\n{report['questions']} held-out questions\nof the generated task"
    plot_importance(pyplot, importance, HERE / "importance.png", title)
    heads = report["layers"] * report["heads"]
    title = f"EM / F1 on {report['questions']} {QUESTIONS} as heads are pruned"
    plot_curve(pyplot, curve, heads, HERE / "pruning_curve.png", title)
    return 0


def make() -> int:
    with tempfile.TemporaryDirectory() as scratch, single_threaded():
        os.chdir(scratch)  # relative paths: the JSON files name the model and data without a temporary folder
        try:
            task = write_task(Path("synthetic-qa"))
            initial = write_initial_checkpoint(Path("initial"), task["vocab"])
            train = ["train", "--model", str(initial), "--data", str(task["train"]), "--output", "synthetic-qa-model"]
            train += ["--epochs", "4", "--learning-rate", "2e-3", "--seed", "0", *TRAIN_ARGS]
            heads = ["heads", "--model", "synthetic-qa-model", "--data", str(task["heldout"]), "--output", "heads"]
            heads += ["--points", "17", "--max-seq-len", str(MAX_SEQ_LEN), "--doc-stride", str(DOC_STRIDE)]
            if status := main(train) or main(heads):
                return status
            for name in ("importance.json", "pruning_curve.json"):  # the pictures are drawn below, titled
                atomic_write(HERE / name, lambda partial, name=name: shutil.copyfile(Path("heads", name), partial))
        finally:
            os.chdir(HERE)
    return plots()


if __name__ == "__main__":
    sys.exit(plots() if sys.argv[1:] == ["--plots"] else make())
