"""Extractive question answering: (question, context) -> answer span, score and character offsets.

Answer for answer the same as the transformers question-answering pipeline (releases <= 5.2) for
the same weights and tokenizer, but batched: windows of many questions are sorted by length,
laid end to end with no padding (or padded per batch, ``packed=False``), run through the model
object it holds under ``torch.inference_mode()``, and decoded with tensor code.

How an answer is chosen (as in the reference):
1. Each context is cut into windows ``[CLS] question [SEP] context-part [SEP]`` overlapping by
   ``doc_stride`` tokens.
2. In each window, start and end logits of tokens that cannot be part of an answer (question,
   special tokens, padding) are set to -10000; a softmax turns each into probabilities. The CLS
   token stays, and ``p_start[CLS] * p_end[CLS]`` is the window's "no answer" score.
3. A span (s, e) scores ``p_start[s] * p_end[e]`` for ``s <= e < s + max_answer_len``; the best
   ``2 * top_k + 10`` spans per window (``top_k`` without word alignment) become candidates.
4. Each candidate maps to characters of the context, widened to whole words with
   ``align_to_words``. Candidates whose text is equal (ignoring case) are merged and their scores
   SUMMED, across windows too, keeping the first one's offsets. This is the reference's behaviour,
   kept deliberately so answers match it; see the README.
5. The ``top_k`` best remain; with ``handle_impossible_answer`` the lowest "no answer" score over
   the windows competes as ``{"answer": "", "start": 0, "end": 0}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from tokenizers import Encoding
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from distilqa import hardware, linear
from distilqa.model import DistilBertForQuestionAnswering
from distilqa.options import DEFAULT_OPTIONS, AnswerOptions
from distilqa.tokenization import QuestionContextTokenizer
from distilqa.validate import at_least, positive_int
from distilqa.weights import DEFAULT_REPO_ID, load_checkpoint

EXCLUDED_LOGIT = -10000.0  # the reference's value for tokens that cannot be in an answer
# Tokens per forward pass on the CPU: large enough for full-speed GEMMs, small enough that the largest
# activation (tokens x hidden_dim floats, 24 MiB) stays under the 32 MiB mmap threshold that
# hardware.keep_freed_memory sets, so its memory is reused from one pass to the next.
# Accelerators have no such cap by default (batch_size alone bounds a pass there).
CPU_MAX_TOKENS = 2048
PAIRS_PER_CHUNK = 256  # pairs tokenized and decoded together: bounds memory, paces the progress bar


class Answer(TypedDict):
    """One answer: ``answer == context[start:end]``; ``score`` is its probability (summed over equal
    answers, see the module docstring). The empty answer is ``{"answer": "", "start": 0, "end": 0}``."""

    score: float
    start: int
    end: int
    answer: str


class PairError(ValueError):
    """A (question, context) pair that cannot be answered: ``index`` is its position in the caller's
    lists, ``field`` is "question" or "context", and ``reason`` says what is wrong with it. The message
    is "<field> <index> <reason>", e.g. "context 3 has no tokens (...)"."""

    def __init__(self, index: int, field: Literal["question", "context"], reason: str):
        super().__init__(f"{field} {index} {reason}")
        self.index, self.field, self.reason = index, field, reason

    def describe(self, where: str | None = None) -> str:
        """The message for a caller who names the pair its own way: ``where`` is, e.g., "in.jsonl:7"
        or "'inputs[3]'"; None for a single pair ("the question is empty ...")."""
        return f"the {self.field} {self.reason}" if where is None else f"{where}: the {self.field} {self.reason}"


@dataclass
class Window:
    """One model input: a part of one pair's context. ``pair`` indexes the caller's pairs."""

    pair: int
    encoding: Encoding


class QuestionAnswerer:
    """Answers questions about contexts with a DistilBERT question-answering model.

    >>> qa = QuestionAnswerer.from_pretrained()  # the published checkpoint: HF cache, weights/, or a download
    >>> qa(question="Where was HuggingFace founded ?", context="HuggingFace was founded in Paris.")
    {'score': ..., 'start': 27, 'end': 32, 'answer': 'Paris'}

    Threads: one answerer may be called from several threads at once (a web server's pool), each call
    answering exactly as it would alone, whatever its ``max_seq_len``, ``doc_stride`` and ``top_k``
    (tests/test_threads.py). The tokenizer encodes each window setting with its own configured copy, and
    the model's forward changes no state. Do not reconfigure the model (``set_attn_implementation``,
    ``set_linear_backend``, ``train()``) while calls are running.
    """

    def __init__(
        self,
        model: DistilBertForQuestionAnswering,
        tokenizer: QuestionContextTokenizer,
        batch_size: int = 32,
        packed: bool = True,
        max_tokens: int | None = None,
    ):
        """``model`` is the model that answers: its modules, attention core and current parameters
        run every call (nothing is copied). ``packed`` lays each batch's windows end to end with no
        padding (``window_lengths``); ``packed=False`` pads them into a (batch, seq) tensor with an
        attention mask. Both give the same logits within float32 rounding. A forward pass takes at
        most ``batch_size`` windows and at most ``max_tokens`` tokens (padding included), or one
        window when a single window is longer; by default 2048 tokens on the CPU and no cap elsewhere."""
        _check_batch_size(batch_size)
        on_cpu = model.device.type == "cpu"
        if on_cpu:
            hardware.keep_freed_memory()  # each pass reuses the memory the last one freed
        if max_tokens is None:
            max_tokens = CPU_MAX_TOKENS if on_cpu else batch_size * model.config.max_position_embeddings
        _check_batch_size(max_tokens, "max_tokens")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.packed = packed
        self.max_tokens = max_tokens

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_REPO_ID,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
        attn_implementation: str = "auto",
        linear_backend: str = "auto",
        packed: bool = True,
        compile: bool = False,
        quantize: str | None = None,
        max_tokens: int | None = None,
    ) -> QuestionAnswerer:
        """Load model and tokenizer from a checkpoint folder or hub repo id (found in the Hugging Face
        cache or weights/, else downloaded into the cache: see :mod:`distilqa.hub`). A device this
        torch cannot use, or a tokenizer that does not fit the model, is refused before the weights load.

        ``dtype``: None / "float32" (the default; answers match the reference), "bfloat16",
        "float16", or "auto" (bfloat16 where the hardware has it). ``attn_implementation`` and
        ``linear_backend`` are set on the model (see DistilBertForQuestionAnswering); their "auto"
        defaults run the attention core and the float32 GEMMs measured faster here. ``compile``
        runs :meth:`DistilBertForQuestionAnswering.compile_blocks` (the first calls are slow while
        it compiles); ``quantize="int8"`` runs the encoder's linear layers in int8 (CPU, float32;
        approximate): on oneDNN's int8 GEMM with the post-ops ("onednn-int8", see distilqa.linear)
        where the GEMM backend is oneDNN and the CPU multiplies int8 natively, else as PyTorch's
        dynamically quantised linear layers."""
        _check_batch_size(batch_size)
        for name, value in (("packed", packed), ("compile", compile)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if revision is not None and Path(name_or_path).expanduser().is_dir():
            raise ValueError(f"revision={revision!r} selects a hub version, but {name_or_path} is a local folder")
        loaded = load_checkpoint(
            DistilBertForQuestionAnswering,
            name_or_path,
            revision,
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            linear_backend=linear_backend,
        )
        model = loaded.model
        if quantize == "int8":
            if model.device.type != "cpu" or model.dtype != torch.float32:
                raise ValueError("quantize='int8' needs a float32 model on the CPU (dtype float32, device cpu)")
            encoder = model.distilbert.transformer  # the encoder's layers; the small head stays float32
            if linear.linear_backend(encoder) == "onednn" and linear.onednn_int8_available():
                linear.set_linear_backend(encoder, "onednn-int8")
            else:
                linear.quantize_int8(encoder)
        if compile:
            model.compile_blocks()
        return cls(model, loaded.tokenizer, batch_size, packed, max_tokens)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model (config.json, model.safetensors) and the tokenizer (tokenizer.json,
        tokenizer_config.json) into ``directory``, so that ``from_pretrained(directory)`` answers as
        this answerer does. PyTorch's dynamically quantised int8 layers cannot be saved (their weights
        are not float); oneDNN's int8 backend keeps float32 weights and saves them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.tokenizer.save(str(directory / "tokenizer.json"))
        config = {"model_max_length": self.tokenizer.model_max_length, "tokenizer_class": "BertTokenizer"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def __call__(
        self,
        question: str | Sequence[str],
        context: str | Sequence[str],
        top_k: int = DEFAULT_OPTIONS.top_k,
        max_answer_len: int = DEFAULT_OPTIONS.max_answer_len,
        max_seq_len: int | None = DEFAULT_OPTIONS.max_seq_len,
        doc_stride: int | None = DEFAULT_OPTIONS.doc_stride,
        handle_impossible_answer: bool = DEFAULT_OPTIONS.handle_impossible_answer,
        align_to_words: bool = DEFAULT_OPTIONS.align_to_words,
        progress: bool = False,
    ) -> Answer | list[Answer] | list[Answer | list[Answer]]:
        """Answer one pair (``question`` and ``context`` strings) or many (lists of equal length, or a
        list of questions about one context string).

        Returns an answer dict ``{"score", "start", "end", "answer"}`` per pair, or a list of the
        ``top_k`` best when ``top_k > 1``; a list of those when given lists. ``answer ==
        context[start:end]`` always. ``max_seq_len`` defaults to min(384, the tokenizer's
        model_max_length) and ``doc_stride`` to min(128, max_seq_len // 2), as in the reference.

        Raises :class:`PairError` (a ValueError with the pair's ``index`` and ``field``) for a pair
        that cannot be answered, TypeError for values that are not strings, ValueError for bad options.
        """
        questions, contexts, single = _pairs(question, context)
        max_seq_len = min(384, self.tokenizer.model_max_length) if max_seq_len is None else max_seq_len
        doc_stride = min(128, max_seq_len // 2) if doc_stride is None and isinstance(max_seq_len, int) else doc_stride
        self._check_options(top_k, max_answer_len, max_seq_len, doc_stride)
        candidates_per_window = AnswerOptions(top_k=top_k, align_to_words=align_to_words).candidates_per_window

        results: list[Answer | list[Answer]] = []
        bar = tqdm(total=len(questions), unit="question", disable=not progress, dynamic_ncols=True)
        for chunk in range(0, len(questions), PAIRS_PER_CHUNK):
            chunk_questions = questions[chunk : chunk + PAIRS_PER_CHUNK]
            chunk_contexts = contexts[chunk : chunk + PAIRS_PER_CHUNK]
            windows = self._windows(chunk_questions, chunk_contexts, max_seq_len, doc_stride, offset=chunk)
            candidates: list[list[tuple[float, int, int]]] = [[] for _ in chunk_questions]
            null_scores = [float("inf")] * len(chunk_questions)
            for batch in self._batches(windows):
                start_logits, end_logits, allowed = self._run(batch)
                spans = decode_spans(start_logits, end_logits, allowed, max_answer_len, candidates_per_window)
                for window, (window_spans, null_score) in zip(batch, spans):
                    pair = window.pair - chunk
                    null_scores[pair] = min(null_scores[pair], null_score)
                    candidates[pair].extend(
                        (score, *_characters(window.encoding, s, e, align_to_words)) for score, s, e in window_spans
                    )
            for pair, context_text in enumerate(chunk_contexts):
                null = null_scores[pair] if handle_impossible_answer else None
                answers = merge_answers(context_text, candidates[pair], null, top_k)
                results.append(answers[0] if top_k == 1 else answers)
            bar.update(len(chunk_questions))
        bar.close()
        return results[0] if single else results

    @staticmethod
    def _check_options(top_k: int, max_answer_len: int, max_seq_len: int, doc_stride: int) -> None:
        at_least("max_seq_len", max_seq_len, 4)  # first: the default doc_stride depends on it
        at_least("top_k", top_k, 1)
        at_least("max_answer_len", max_answer_len, 1)
        at_least("doc_stride", doc_stride, 0)
        if doc_stride >= max_seq_len - 3:
            raise ValueError(f"doc_stride ({doc_stride}) must be smaller than max_seq_len - 3 ({max_seq_len - 3})")

    def _windows(
        self, questions: list[str], contexts: list[str], max_seq_len: int, doc_stride: int, offset: int
    ) -> list[Window]:
        """Tokenize pairs into windows, longest first (pairs stay identifiable through ``Window.pair``)."""
        if max_seq_len > self.model.config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len ({max_seq_len}) exceeds the model's {self.model.config.max_position_embeddings} positions"
            )
        try:
            per_pair = self.tokenizer.encode_windows(questions, contexts, max_seq_len, doc_stride, first_index=offset)
        except ValueError:  # a question too long for the windows: find which pair, one by one
            for pair in range(len(questions)):
                try:
                    self.tokenizer.encode_windows(
                        questions[pair : pair + 1], contexts[pair : pair + 1], max_seq_len, doc_stride, offset + pair
                    )
                except ValueError as single:
                    reason = str(single).removeprefix(f"question {offset + pair} ")
                    raise PairError(offset + pair, "question", reason) from single
            raise
        windows = []
        for pair, encodings in enumerate(per_pair):
            no_tokens = "has no tokens (only whitespace or control characters?)"
            if 1 not in encodings[0].sequence_ids:
                raise PairError(offset + pair, "context", no_tokens)
            if 0 not in encodings[0].sequence_ids:
                raise PairError(offset + pair, "question", no_tokens)
            windows.extend(Window(offset + pair, encoding) for encoding in encodings)
        # Sorting by length makes each padded batch nearly rectangular; Python's sort is stable, so
        # the windows of one pair keep their context order, which merging relies on.
        return sorted(windows, key=lambda window: -len(window.encoding.ids))

    def _batches(self, windows: list[Window]) -> Iterator[list[Window]]:
        """Consecutive windows (longest first) in batches of at most ``batch_size`` windows and
        ``max_tokens`` tokens (padded: windows x the first, longest one)."""
        batch: list[Window] = []
        tokens = 0  # in the batch, the next window included: packed, the sum; padded, count x the longest
        for window in windows:
            length = len(window.encoding.ids)
            tokens = tokens + length if self.packed else (len(batch) + 1) * len((batch or [window])[0].encoding.ids)
            if batch and (len(batch) == self.batch_size or tokens > self.max_tokens):
                yield batch
                batch, tokens = [], length
            batch.append(window)
        if batch:
            yield batch

    @torch.inference_mode()
    def _run(self, batch: list[Window]) -> tuple[Tensor, Tensor, Tensor]:
        """Logits (batch, seq) in float32, and which tokens may be part of an answer (batch, seq)."""
        lengths = [len(w.encoding.ids) for w in batch]
        longest, pad, cls = max(lengths), self.tokenizer.pad_token_id, self.tokenizer.cls_token_id
        ids = torch.tensor([w.encoding.ids + [pad] * (longest - len(w.encoding.ids)) for w in batch])  # (batch, seq)
        context = torch.tensor(
            [[sid == 1 for sid in w.encoding.sequence_ids] + [False] * (longest - len(w.encoding.ids)) for w in batch]
        )  # (batch, seq)
        allowed = context | (ids == cls)  # the reference keeps every CLS token, for "no answer"
        real = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # (batch, seq): not padding
        device = self.model.device
        if self.packed:  # windows end to end in one row: no work spent on padding
            packed = ids[real][None, :].to(device)  # (1, tokens): the windows' ids, one after another
            output = self.model(packed, window_lengths=lengths)  # logits (1, tokens)
            start, end = (logits[0].float().cpu().split(lengths) for logits in (output.start_logits, output.end_logits))
            return pad_sequence(list(start), batch_first=True), pad_sequence(list(end), batch_first=True), allowed
        output = self.model(ids.to(device), None if bool(real.all()) else real.to(device))
        return output.start_logits.float().cpu(), output.end_logits.float().cpu(), allowed


def decode_spans(
    start_logits: Tensor, end_logits: Tensor, allowed: Tensor, max_answer_len: int, k: int
) -> list[tuple[list[tuple[float, int, int]], float]]:
    """The best spans of each window, by p_start[s] * p_end[e] with s <= e < s + max_answer_len.

    start_logits, end_logits: (windows, seq) float32; allowed: (windows, seq) bool.
    Returns per window ``([(score, s, e), ...] best first, no_answer_score)``; spans of probability
    0 (touching a token outside the context) are never returned.
    """
    windows, seq = start_logits.shape
    p_start = F.softmax(start_logits.masked_fill(~allowed, EXCLUDED_LOGIT), dim=-1)  # (windows, seq)
    p_end = F.softmax(end_logits.masked_fill(~allowed, EXCLUDED_LOGIT), dim=-1)  # (windows, seq)
    null_scores = (p_start[:, 0] * p_end[:, 0]).tolist()  # (windows,): the CLS token's span
    p_start[:, 0] = 0.0  # CLS is "no answer", never the start or end of one
    p_end[:, 0] = 0.0
    lengths = min(max_answer_len, seq)
    # p_end_ahead[w, s, d] = p_end[w, s + d]: the end probability d tokens after each start.
    p_end_ahead = F.pad(p_end, (0, lengths - 1)).unfold(1, lengths, 1)  # (windows, seq, lengths)
    scores = (p_start[:, :, None] * p_end_ahead).reshape(windows, seq * lengths)  # (windows, seq * lengths)
    k = min(k, seq * lengths)
    # A stable sort keeps ties in (start, end) order, as the reference's argmax does.
    best_scores, best = torch.sort(scores, dim=-1, descending=True, stable=True)  # (windows, seq * lengths)
    best_scores, best = best_scores[:, :k].tolist(), best[:, :k].tolist()  # (windows, k)
    return [
        (
            [(score, i // lengths, i // lengths + i % lengths) for score, i in zip(row_scores, row) if score > 0.0],
            null,
        )
        for row_scores, row, null in zip(best_scores, best, null_scores)
    ]


def _characters(encoding: Encoding, start: int, end: int, align_to_words: bool) -> tuple[int, int]:
    """Character span in the context of tokens start..end, widened to whole words if asked."""
    if align_to_words:
        first_word, last_word = encoding.token_to_word(start), encoding.token_to_word(end)
        if first_word is not None and last_word is not None:  # None: a special token, which has no word
            return (encoding.word_to_chars(first_word, 1)[0], encoding.word_to_chars(last_word, 1)[1])
    return encoding.offsets[start][0], encoding.offsets[end][1]


def merge_answers(
    context: str, candidates: list[tuple[float, int, int]], null_score: float | None, top_k: int
) -> list[Answer]:
    """Merge candidates of equal text (case-insensitive), summing their scores, and keep the top_k.
    ``candidates`` must be in window order, best first within a window, as the reference merges."""
    answers: dict[str, Answer] = {}
    for score, start, end in candidates:
        text = context[start:end]
        if (merged := answers.get(text.lower())) is not None:
            merged["score"] += score
        else:
            answers[text.lower()] = {"score": score, "start": start, "end": end, "answer": text}
    ranked = list(answers.values())
    if null_score is not None:
        ranked.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
    if not ranked:  # every span had probability 0: only possible for degenerate windows
        ranked.append({"score": 0.0, "start": 0, "end": 0, "answer": ""})
    return sorted(ranked, key=lambda answer: answer["score"], reverse=True)[:top_k]


def _check_batch_size(batch_size: int, name: str = "batch_size") -> None:
    positive_int(name, batch_size)


def _pairs(question: str | Sequence[str], context: str | Sequence[str]) -> tuple[list[str], list[str], bool]:
    """Validate the inputs; returns (questions, contexts, whether a single pair was given)."""
    single = isinstance(question, str) and isinstance(context, str)
    if isinstance(question, str):
        if not isinstance(context, str):
            raise TypeError("with one question string, context must be one string too")
        questions, contexts = [question], [context]
    elif isinstance(question, Sequence):
        questions = list(question)
        if isinstance(context, str):
            contexts = [context] * len(questions)  # several questions about one context
        elif isinstance(context, Sequence):
            contexts = list(context)
            if len(questions) != len(contexts):
                raise ValueError(
                    f"got {len(questions)} questions but {len(contexts)} contexts; they pair up one to one"
                )
        else:
            raise TypeError(f"context must be a string or a list of strings, got {type(context).__name__}")
    else:
        raise TypeError(f"question must be a string or a list of strings, got {type(question).__name__}")
    if not questions:
        raise ValueError("no questions given")
    for name, texts in (("question", questions), ("context", contexts)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name} {i} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise PairError(i, name, "is empty or only whitespace")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise PairError(i, name, "is not valid Unicode: it holds a lone surrogate") from None
    return questions, contexts, single
