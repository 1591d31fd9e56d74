"""distilqa: a hand-written DistilBERT question-answering model in pure PyTorch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distilqa.config import DistilBertConfig
    from distilqa.hub import CheckpointError, WeightsNotFoundError
    from distilqa.model import DistilBertForQuestionAnswering, QuestionAnsweringOutput
    from distilqa.pipeline import Answer, PairError, QuestionAnswerer
    from distilqa.tokenization import QuestionContextTokenizer

# Imported on first use (PEP 562), so that `distilqa --help` and `import distilqa.hub` do not load torch.
_LAZY = {
    "Answer": "distilqa.pipeline",
    "CheckpointError": "distilqa.hub",
    "DistilBertConfig": "distilqa.config",
    "DistilBertForQuestionAnswering": "distilqa.model",
    "PairError": "distilqa.pipeline",
    "QuestionAnswerer": "distilqa.pipeline",
    "QuestionAnsweringOutput": "distilqa.model",
    "QuestionContextTokenizer": "distilqa.tokenization",
    "WeightsNotFoundError": "distilqa.hub",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distilqa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Answer",
    "CheckpointError",
    "DistilBertConfig",
    "DistilBertForQuestionAnswering",
    "PairError",
    "QuestionAnswerer",
    "QuestionAnsweringOutput",
    "QuestionContextTokenizer",
    "WeightsNotFoundError",
]
__version__ = "0.1.0"
