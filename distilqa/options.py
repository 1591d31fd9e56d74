"""The answering options and their defaults, as in the transformers question-answering pipeline.

Torch-free and importing nothing from distilqa, so the command line's help shows the same defaults
that :class:`distilqa.pipeline.QuestionAnswerer`, the service and ``explain`` use, without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AnswerOptions:
    """The answering options and their defaults, as in the transformers question-answering pipeline;
    the one definition that the pipeline, the CLI, the service and ``explain`` use."""

    top_k: int = 1
    max_answer_len: int = 15
    max_seq_len: int | None = None  # None: min(384, the tokenizer's model_max_length)
    doc_stride: int | None = None  # None: min(128, max_seq_len // 2)
    handle_impossible_answer: bool = False
    align_to_words: bool = True

    @property
    def candidates_per_window(self) -> int:
        """Spans kept per window before merging: the reference's 2 * top_k + 10 with word alignment."""
        return 2 * self.top_k + 10 if self.align_to_words else self.top_k


DEFAULT_OPTIONS = AnswerOptions()
