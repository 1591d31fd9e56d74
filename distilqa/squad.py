"""SQuAD v1.1 reading and the official v1.1 evaluation metric.

The metric follows the official ``evaluate-v1.1.py`` script exactly:

* answers are normalised by lower-casing, removing ASCII punctuation
  (``string.punctuation`` only; Unicode punctuation is kept), replacing the
  articles ``a``, ``an`` and ``the`` (as whole words) by a space and
  collapsing whitespace;
* exact match compares the normalised strings;
* F1 is computed over the whitespace tokens of the normalised strings with a
  multiset intersection, and is 0 when no token is shared (so also when both
  strings normalise to nothing);
* each question scores the maximum over its ground-truth answers, a question
  without a prediction scores 0, and totals are 100 times the mean over all
  questions.

Unlike the official script, unanswered questions are counted in
:class:`SquadScores` rather than printed.
"""

from __future__ import annotations

import json
import os
import re
import string
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from distilqa.files import write_json

__all__ = [
    "SquadQuestion",
    "SquadScores",
    "evaluate",
    "exact_match_score",
    "f1_score",
    "load_squad_dataset",
    "metric_max_over_ground_truths",
    "normalize_answer",
    "read_predictions",
    "read_squad",
    "write_predictions",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

T = TypeVar("T", float, bool)


# --------------------------------------------------------------------------- #
# Data model
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class SquadQuestion:
    """One SQuAD question with its paragraph and gold answers.

    ``answers[i]`` starts at character offset ``answer_starts[i]`` of
    ``context``.
    """

    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


@dataclass
class SquadScores:
    """Official SQuAD v1.1 scores.

    ``exact_match`` and ``f1`` are percentages (0..100) over all ``total``
    questions; ``answered`` questions had a prediction and ``missing`` did not
    (they score 0).
    """

    exact_match: float
    f1: float
    total: int
    answered: int
    missing: int

    def to_dict(self) -> dict[str, float | int]:
        """Return the scores as a plain (JSON-serialisable) dictionary."""
        return asdict(self)


# --------------------------------------------------------------------------- #
# Reading files
# --------------------------------------------------------------------------- #


def _read_json_file(path: str | os.PathLike[str]) -> Any:
    """Parse a ``.json`` file, or the single ``.json`` member of a ``.zip``.

    Raises:
        FileNotFoundError: if ``path`` is not an existing file.
        ValueError: if the zip is invalid or does not hold exactly one
            ``.json`` member, or the content is not UTF-8 JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        raw, source = _read_single_json_member(path)
    else:
        raw, source = path.read_bytes(), str(path)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{source}: not a valid UTF-8 JSON file ({err})") from err


def _read_single_json_member(path: Path) -> tuple[bytes, str]:
    """Return the bytes and a display name of the only ``.json`` in a zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [
                info.filename
                for info in archive.infolist()
                if not info.is_dir() and info.filename.lower().endswith(".json")
            ]
            if len(names) != 1:
                found = "none" if not names else ", ".join(names)
                raise ValueError(f"{path}: expected exactly one .json file in the zip archive, found {found}")
            return archive.read(names[0]), f"{path}!{names[0]}"
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: not a valid zip archive ({err})") from err


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "an integer"}


def _require(value: Any, kind: type, where: str, source: Path) -> Any:
    """Return ``value`` if it is an instance of ``kind``, else raise ValueError."""
    # bool is a subclass of int, but a boolean answer_start is malformed data.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(
            f"{source}: not in SQuAD format: {where} should be {_JSON_KINDS[kind]}, got {type(value).__name__}"
        )
    return value


def _field(obj: Any, key: str, kind: type, where: str, source: Path) -> Any:
    """Return ``obj[key]`` checked to be a ``kind``; ``obj`` must be a dict."""
    _require(obj, dict, where, source)
    if key not in obj:
        raise ValueError(f"{source}: not in SQuAD format: {where} has no {key!r}")
    return _require(obj[key], kind, f"{where}.{key}", source)


def load_squad_dataset(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Return the raw ``data`` list (the articles) of a SQuAD file.

    This is what the official evaluation script iterates over. ``path`` may be
    a ``.json`` file or a ``.zip`` holding exactly one ``.json`` file. Only the
    top level is checked here; :func:`read_squad` checks the full structure.
    """
    document = _read_json_file(path)
    return _field(document, "data", list, "the top-level object", Path(path))


def read_squad(path: str | os.PathLike[str]) -> list[SquadQuestion]:
    """Read a SQuAD v1.1 file into a flat list of questions, in dataset order.

    ``path`` may be a ``.json`` file or a ``.zip`` holding exactly one
    ``.json`` file. The expected structure is
    ``data[] -> {title, paragraphs[] -> {context, qas[] -> {id, question,
    answers[] -> {text, answer_start}}}}``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not JSON, a zip without a single ``.json``,
            or does not have the SQuAD structure. Messages name the file.
    """
    source = Path(path)
    questions: list[SquadQuestion] = []
    for a, article in enumerate(load_squad_dataset(source)):
        where = f"data[{a}]"
        title = _field(article, "title", str, where, source)
        paragraphs = _field(article, "paragraphs", list, where, source)
        for p, paragraph in enumerate(paragraphs):
            questions.extend(_read_paragraph(paragraph, title, f"{where}.paragraphs[{p}]", source))
    return questions


def _read_paragraph(paragraph: Any, title: str, where: str, source: Path) -> list[SquadQuestion]:
    """Convert one raw paragraph (context plus its questions)."""
    context = _field(paragraph, "context", str, where, source)
    qas = _field(paragraph, "qas", list, where, source)
    questions = []
    for q, qa in enumerate(qas):
        qa_where = f"{where}.qas[{q}]"
        answers = _field(qa, "answers", list, qa_where, source)
        texts, starts = [], []
        for i, answer in enumerate(answers):
            answer_where = f"{qa_where}.answers[{i}]"
            texts.append(_field(answer, "text", str, answer_where, source))
            starts.append(_field(answer, "answer_start", int, answer_where, source))
        questions.append(
            SquadQuestion(
                id=_field(qa, "id", str, qa_where, source),
                title=title,
                context=context,
                question=_field(qa, "question", str, qa_where, source),
                answers=tuple(texts),
                answer_starts=tuple(starts),
            )
        )
    return questions


# --------------------------------------------------------------------------- #
# Official v1.1 metric
# --------------------------------------------------------------------------- #


def normalize_answer(s: str) -> str:
    """Normalise an answer as the official script does.

    Lower-case, drop ASCII punctuation, replace the whole words ``a``, ``an``
    and ``the`` by a space, and collapse runs of whitespace to single spaces.
    """
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """Return whether the two answers are equal after normalisation."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Return the token-level F1 (0..1) of the normalised answers.

    Tokens are compared as multisets. As in the official script the score is
    0 when no token is shared, including when both answers are empty.
    """
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], T],
    prediction: str,
    ground_truths: Sequence[str],
) -> T:
    """Return the best ``metric_fn(prediction, truth)`` over the ground truths.

    Raises:
        ValueError: if ``ground_truths`` is empty.
    """
    if not ground_truths:
        raise ValueError("no ground-truth answers to compare the prediction with")
    return max(metric_fn(prediction, truth) for truth in ground_truths)


def evaluate(questions: Sequence[SquadQuestion], predictions: Mapping[str, str]) -> SquadScores:
    """Score ``predictions`` (question id -> answer text) with the v1.1 metric.

    Questions without a prediction score 0 and are counted in ``missing``;
    predictions for ids that are not among ``questions`` are ignored.

    Raises:
        ValueError: if ``questions`` is empty or a question has no answers.
    """
    if not questions:
        raise ValueError("cannot evaluate on an empty list of questions")
    exact_match = f1 = 0.0
    answered = 0
    for question in questions:
        if not question.answers:
            raise ValueError(f"question {question.id!r} has no gold answers")
        if question.id not in predictions:
            continue
        answered += 1
        prediction = predictions[question.id]
        exact_match += metric_max_over_ground_truths(exact_match_score, prediction, question.answers)
        f1 += metric_max_over_ground_truths(f1_score, prediction, question.answers)
    total = len(questions)
    return SquadScores(
        exact_match=100.0 * exact_match / total,
        f1=100.0 * f1 / total,
        total=total,
        answered=answered,
        missing=total - answered,
    )


# --------------------------------------------------------------------------- #
# Prediction files
# --------------------------------------------------------------------------- #


def read_predictions(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read an official predictions file, a JSON object ``{id: answer_text}``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a JSON object mapping ids to strings.
    """
    predictions = _read_json_file(path)
    if not isinstance(predictions, dict):
        raise ValueError(
            f"{path}: predictions should be a JSON object {{id: answer_text}}, got {type(predictions).__name__}"
        )
    for key, value in predictions.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}: prediction for id {key!r} should be a string, got {type(value).__name__}")
    return predictions


def write_predictions(predictions: Mapping[str, str], path: str | os.PathLike[str]) -> None:
    """Write predictions as an official UTF-8 JSON object ``{id: answer_text}``, atomically.

    Raises:
        TypeError: if an id or an answer is not a string.
    """
    for key, value in predictions.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"predictions must map str ids to str answers, got "
                f"{type(key).__name__} -> {type(value).__name__} for {key!r}"
            )
    write_json(path, dict(predictions), indent=1)  # whole or not at all


def predict(answerer: Any, questions: Sequence[SquadQuestion], progress: bool = False) -> dict[str, str]:
    """Predictions ``{id: answer text}`` of a :class:`distilqa.pipeline.QuestionAnswerer` (or any
    callable with its signature), in the official predictions format."""
    answers = answerer([q.question for q in questions], [q.context for q in questions], progress=progress)
    return {q.id: answer["answer"] for q, answer in zip(questions, answers)}
