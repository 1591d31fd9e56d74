"""distilqa: a hand-written DistilBERT question-answering model in pure PyTorch."""

from distilqa.config import DistilBertConfig
from distilqa.model import DistilBertForQuestionAnswering, QuestionAnsweringOutput
from distilqa.pipeline import QuestionAnswerer
from distilqa.weights import CheckpointError, WeightsNotFoundError

__all__ = [
    "CheckpointError",
    "DistilBertConfig",
    "DistilBertForQuestionAnswering",
    "QuestionAnswerer",
    "QuestionAnsweringOutput",
    "WeightsNotFoundError",
]
__version__ = "0.1.0"
