"""Regenerate this folder: train the test suite's model on the generated task, then run `distilqa heads`.

    python examples/heads/make.py            # about 2-3 minutes on 2 CPU cores

Writes importance.json, importance.png, pruning_curve.json and pruning_curve.png next to this file
(remove them first), from the same task, initial weights and training command as tests/test_train.py.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

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


def make() -> int:
    with tempfile.TemporaryDirectory() as scratch, single_threaded():
        os.chdir(scratch)  # relative paths: the JSON files name the model and data without a temporary folder
        task = write_task(Path("synthetic-qa"))
        initial = write_initial_checkpoint(Path("initial"), task["vocab"])
        train = ["train", "--model", str(initial), "--data", str(task["train"]), "--output", "synthetic-qa-model"]
        train += ["--epochs", "4", "--learning-rate", "2e-3", "--seed", "0", *TRAIN_ARGS]
        if status := main(train):
            return status
        heads = ["heads", "--model", "synthetic-qa-model", "--data", str(task["heldout"]), "--out", str(HERE)]
        heads += ["--points", "17", "--max-seq-len", str(MAX_SEQ_LEN), "--doc-stride", str(DOC_STRIDE)]
        try:
            return main(heads)
        finally:
            os.chdir(HERE)


if __name__ == "__main__":
    sys.exit(make())
