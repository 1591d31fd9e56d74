"""Tests for distilqa.squad: SQuAD v1.1 reading and the official v1.1 metric."""

from __future__ import annotations

import json
import re
import string
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import SQUAD_FILE
from hypothesis import given, settings
from hypothesis import strategies as st

from distilqa.squad import (
    SquadQuestion,
    SquadScores,
    evaluate,
    exact_match_score,
    f1_score,
    load_squad_dataset,
    metric_max_over_ground_truths,
    normalize_answer,
    read_predictions,
    read_squad,
    write_predictions,
)

DEV_PATH = SQUAD_FILE  # $DISTILQA_DATA or ../shared/data (conftest)
DEV_MEMBER = "dev-v1.1.json"


# --------------------------------------------------------------------------- #
# Independent reference: the official evaluate-v1.1.py functions, verbatim
# (modulo names), written from the script's definition.
# --------------------------------------------------------------------------- #


def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def official_exact_match_score(prediction, ground_truth):
    return official_normalize_answer(prediction) == official_normalize_answer(ground_truth)


def official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


def official_evaluate(dataset, predictions):
    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue  # the official script prints a message here
                ground_truths = [x["text"] for x in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += official_metric_max_over_ground_truths(
                    official_exact_match_score, prediction, ground_truths
                )
                f1 += official_metric_max_over_ground_truths(official_f1_score, prediction, ground_truths)
    exact_match = 100.0 * exact_match / total
    f1 = 100.0 * f1 / total
    return {"exact_match": exact_match, "f1": f1}


# --------------------------------------------------------------------------- #
# Hand-built metric cases
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Denver Broncos", "denver broncos"),
        ("a cat and an apple", "cat and apple"),
        ("THE An A", ""),
        # Articles only as whole words.
        ("the theatre is another place", "theatre is another place"),
        ("Anthem then thereafter", "anthem then thereafter"),
        ("banana", "banana"),
        # Punctuation is removed before articles: "the-end" becomes one word.
        ("the-end", "theend"),
        ("the, end", "end"),
        ("(the) end.", "end"),
        ("a_b", "ab"),
        ("l'avion", "lavion"),
        # Unicode punctuation is not in string.punctuation and stays.
        ("“Hello,” she said — ¿qué? «oui»", "“hello” she said — ¿qué «oui»"),
        ("l’avion", "l’avion"),
        ("“the” answer", "“ ” answer"),
        # Whitespace of any kind is collapsed.
        ("  New\tYork\n\nCity  ", "new york city"),
        ("New\u00a0York\u3000City", "new york city"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_answer_cases(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_cases() -> None:
    assert exact_match_score("the Denver Broncos!", "Denver   Broncos")
    assert exact_match_score("Theatre", "theatre.")
    assert not exact_match_score("theatre", "atre")
    assert not exact_match_score("Denver", "Denver Broncos")
    assert not exact_match_score("¿qué?", "qué")  # the inverted mark is kept


def test_empty_prediction_scores_zero() -> None:
    assert exact_match_score("", "Paris") is False
    assert f1_score("", "Paris") == 0.0
    assert f1_score("Paris", "") == 0.0


def test_both_empty_is_exact_match_but_zero_f1() -> None:
    # As in the official code: EM compares strings, F1 is 0 when nothing is shared.
    assert exact_match_score("", "") is True
    assert f1_score("", "") == 0.0
    assert exact_match_score("the", "a.") is True
    assert f1_score("the", "a.") == 0.0


def test_f1_partial_overlap() -> None:
    # precision 2/3, recall 2/4 -> F1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = 4/7
    assert f1_score("red dog runs", "a big red dog sleeps") == pytest.approx(4 / 7, abs=1e-15)
    assert f1_score("Denver", "Denver Broncos") == pytest.approx(2 / 3, abs=1e-15)
    assert f1_score("Denver Broncos", "denver broncos.") == 1.0


def test_f1_counts_repeated_tokens_as_a_multiset() -> None:
    # "cat" x3 vs "cat" x2: 2 shared tokens -> precision 2/3, recall 2/3.
    assert f1_score("the cat cat cat", "cat cat dog") == pytest.approx(2 / 3, abs=1e-15)
    # One shared token only: precision 1/3, recall 1 -> F1 1/2.
    assert f1_score("go go go", "go") == pytest.approx(1 / 2, abs=1e-15)


def test_max_over_several_ground_truths() -> None:
    truths = ["Broncos", "Denver Broncos", "the Denver Broncos team"]
    # F1 against each: 2/3, 1/2, 4/5 -> max 4/5.
    assert metric_max_over_ground_truths(f1_score, "Broncos team", truths) == pytest.approx(0.8, abs=1e-15)
    assert metric_max_over_ground_truths(exact_match_score, "denver broncos", truths) is True
    assert metric_max_over_ground_truths(exact_match_score, "Broncos team", truths) is False
    with pytest.raises(ValueError, match="no ground-truth"):
        metric_max_over_ground_truths(f1_score, "x", [])


def _question(qid: str, *answers: str) -> SquadQuestion:
    return SquadQuestion(
        id=qid,
        title="T",
        context=" ".join(answers),
        question=f"question {qid}?",
        answers=answers,
        answer_starts=tuple(range(len(answers))),
    )


def test_evaluate_counts_missing_predictions_as_zero() -> None:
    questions = [
        _question("q1", "Paris"),
        _question("q2", "Denver Broncos", "Broncos"),
        _question("q3", "1990"),
    ]
    # q1 exact, q2 best F1 2/3 (vs "Broncos": precision 1/2, recall 1), q3 missing.
    predictions = {"q1": "paris.", "q2": "Broncos team", "unknown": "ignored"}
    scores = evaluate(questions, predictions)
    assert scores.total == 3
    assert scores.answered == 2
    assert scores.missing == 1
    assert scores.exact_match == pytest.approx(100 / 3, abs=1e-12)
    assert scores.f1 == pytest.approx(100 * (1 + 2 / 3) / 3, abs=1e-12)
    assert scores.to_dict() == {
        "exact_match": scores.exact_match,
        "f1": scores.f1,
        "total": 3,
        "answered": 2,
        "missing": 1,
    }
    assert evaluate(questions, {}) == SquadScores(0.0, 0.0, 3, 0, 3)


def test_evaluate_rejects_empty_inputs() -> None:
    with pytest.raises(ValueError, match="empty"):
        evaluate([], {"q": "x"})
    with pytest.raises(ValueError, match="'q0'"):
        evaluate([_question("q0")], {"q0": "x"})


# --------------------------------------------------------------------------- #
# Property tests against the verbatim official implementation
# --------------------------------------------------------------------------- #

_TRICKY_CHARS = (
    string.ascii_letters
    + string.digits
    + string.punctuation
    + " \t\n\r\x0b\x0c\u00a0\u2003\u3000"
    + "“”‘’—–«»¿¡…·•éÉßİıﬁ東京"
)
_WORDS = [
    "a", "an", "the", "A", "An", "The", "THE", "tHe",
    "theatre", "another", "then", "anthem", "banana", "atheist",
    "a.", "(the)", "an,", "the-end", "“the”", "«a»", "¿an?", "the’s", "l'a",
    "cat", "dog", "cat", "Éa", "ﬁ", "1", "",
]  # fmt: skip
_SEPARATORS = ["", " ", "  ", "\t", "\n", "-", ".", "'", "\u00a0", "\u3000", "—", "_"]

texts = st.one_of(
    st.text(),
    st.text(alphabet=_TRICKY_CHARS, max_size=40),
    st.lists(st.sampled_from(_WORDS + _SEPARATORS), max_size=16).map("".join),
    st.lists(st.sampled_from(_WORDS), max_size=10).map(" ".join),
)


@settings(deadline=None)
@given(texts)
def test_normalize_matches_official(text: str) -> None:
    assert normalize_answer(text) == official_normalize_answer(text)


@settings(deadline=None)
@given(texts, texts)
def test_scores_match_official(prediction: str, ground_truth: str) -> None:
    assert exact_match_score(prediction, ground_truth) == official_exact_match_score(prediction, ground_truth)
    assert f1_score(prediction, ground_truth) == pytest.approx(
        official_f1_score(prediction, ground_truth), rel=1e-12, abs=1e-12
    )


@settings(deadline=None, max_examples=50)
@given(
    st.lists(
        st.tuples(st.lists(texts, min_size=1, max_size=3), st.one_of(st.none(), texts)),
        min_size=1,
        max_size=6,
    )
)
def test_evaluate_matches_official(items: list[tuple[list[str], str | None]]) -> None:
    questions = [_question(f"q{i}", *truths) for i, (truths, _) in enumerate(items)]
    predictions = {f"q{i}": pred for i, (_, pred) in enumerate(items) if pred is not None}
    dataset = [
        {
            "title": "T",
            "paragraphs": [
                {"context": "", "qas": [{"id": q.id, "answers": [{"text": t} for t in q.answers]}]} for q in questions
            ],
        }
    ]
    expected = official_evaluate(dataset, predictions)
    scores = evaluate(questions, predictions)
    assert scores.exact_match == pytest.approx(expected["exact_match"], abs=1e-9)
    assert scores.f1 == pytest.approx(expected["f1"], abs=1e-9)
    assert scores.answered == len(predictions)
    assert scores.missing == len(items) - len(predictions)


# --------------------------------------------------------------------------- #
# Reading SQuAD files (small hand-built files)
# --------------------------------------------------------------------------- #

MINI_SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Zürich",
            "paragraphs": [
                {
                    "context": "Zürich is a city in Switzerland.",
                    "qas": [
                        {
                            "id": "z1",
                            "question": "Where is Zürich?",
                            "answers": [
                                {"text": "Switzerland", "answer_start": 20},
                                {"text": "in Switzerland", "answer_start": 17},
                            ],
                        },
                        {
                            "id": "z2",
                            "question": "What is Zürich?",
                            "answers": [{"text": "a city", "answer_start": 10}],
                        },
                    ],
                }
            ],
        },
        {
            "title": "東京",
            "paragraphs": [
                {"context": "no questions here", "qas": []},
                {
                    "context": "東京は日本の首都です。",
                    "qas": [{"id": "t1", "question": "首都は?", "answers": [{"text": "東京", "answer_start": 0}]}],
                },
            ],
        },
    ],
}

MINI_EXPECTED = [
    SquadQuestion(
        "z1",
        "Zürich",
        "Zürich is a city in Switzerland.",
        "Where is Zürich?",
        ("Switzerland", "in Switzerland"),
        (20, 17),
    ),
    SquadQuestion("z2", "Zürich", "Zürich is a city in Switzerland.", "What is Zürich?", ("a city",), (10,)),
    SquadQuestion("t1", "東京", "東京は日本の首都です。", "首都は?", ("東京",), (0,)),
]


def _write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def _write_zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def test_read_squad_hand_built_json_and_zip(tmp_path: Path) -> None:
    json_path = _write_json(tmp_path / "mini.json", MINI_SQUAD)
    zip_path = _write_zip(
        tmp_path / "mini.zip",
        {"notes/README.txt": "hello", "sub/mini.json": json.dumps(MINI_SQUAD, ensure_ascii=False)},
    )
    assert read_squad(json_path) == MINI_EXPECTED
    assert read_squad(str(zip_path)) == MINI_EXPECTED
    assert load_squad_dataset(zip_path) == MINI_SQUAD["data"]
    for question in MINI_EXPECTED:
        for text, start in zip(question.answers, question.answer_starts, strict=True):
            assert question.context[start : start + len(text)] == text


def test_read_squad_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_squad(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        read_squad(tmp_path)  # a directory is not a file


def test_read_squad_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*JSON"):
        read_squad(path)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"data": [], "x": "Zürich"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(str(latin1))):
        read_squad(latin1)
    zipped = _write_zip(tmp_path / "bad.zip", {"bad.json": "not json"})
    with pytest.raises(ValueError, match=re.escape(str(zipped)) + ".*bad.json"):
        read_squad(zipped)


def test_read_squad_zip_without_single_json(tmp_path: Path) -> None:
    none = _write_zip(tmp_path / "none.zip", {"readme.txt": "{}", "data/": ""})
    with pytest.raises(ValueError, match=re.escape(str(none)) + r".*exactly one \.json.*none"):
        read_squad(none)
    two = _write_zip(tmp_path / "two.zip", {"a.json": "{}", "b.json": "{}"})
    with pytest.raises(ValueError, match=re.escape(str(two)) + r".*a\.json, b\.json"):
        read_squad(two)


def _mutated(mutate) -> dict:
    document = json.loads(json.dumps(MINI_SQUAD))
    mutate(document)
    return document


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        ([MINI_SQUAD], "top-level object should be an object, got list"),
        ({"version": "1.1"}, "top-level object has no 'data'"),
        ({"data": {"title": "x"}}, r"data should be an array, got dict"),
        (_mutated(lambda d: d["data"].append("article")), r"data\[2\] should be an object, got str"),
        (_mutated(lambda d: d["data"][0].pop("title")), r"data\[0\] has no 'title'"),
        (_mutated(lambda d: d["data"][1].pop("paragraphs")), r"data\[1\] has no 'paragraphs'"),
        (
            _mutated(lambda d: d["data"][1]["paragraphs"][1].pop("qas")),
            r"data\[1\]\.paragraphs\[1\] has no 'qas'",
        ),
        (
            _mutated(lambda d: d["data"][0]["paragraphs"][0].update(context=None)),
            r"paragraphs\[0\]\.context should be a string, got NoneType",
        ),
        (
            _mutated(lambda d: d["data"][0]["paragraphs"][0]["qas"][1].pop("id")),
            r"qas\[1\] has no 'id'",
        ),
        (
            _mutated(lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][1].update(answer_start="17")),
            r"qas\[0\]\.answers\[1\]\.answer_start should be an integer, got str",
        ),
        (
            _mutated(lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=True)),
            r"answers\[0\]\.answer_start should be an integer, got bool",
        ),
        (
            _mutated(lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(text=3)),
            r"answers\[0\]\.text should be a string, got int",
        ),
    ],
)
def test_read_squad_wrong_structure(tmp_path: Path, document: object, detail: str) -> None:
    path = _write_json(tmp_path / "wrong.json", document)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*SQuAD format.*" + detail):
        read_squad(path)


# --------------------------------------------------------------------------- #
# Prediction files
# --------------------------------------------------------------------------- #


def test_predictions_round_trip_with_non_ascii(tmp_path: Path) -> None:
    predictions = {"id1": "Zürich", "id2": "“quoted” — 東京", "id3": "", "ü-id": "naïve café"}
    path = tmp_path / "predictions.json"
    write_predictions(predictions, path)
    raw = path.read_bytes()
    assert "東京".encode() in raw  # written as UTF-8, not \\u escapes
    assert b"\\u" not in raw
    assert json.loads(raw.decode("utf-8")) == predictions
    assert read_predictions(path) == predictions
    assert list(read_predictions(str(path))) == list(predictions)  # order kept


def test_read_predictions_errors(tmp_path: Path) -> None:
    not_object = _write_json(tmp_path / "list.json", ["a", "b"])
    with pytest.raises(ValueError, match=re.escape(str(not_object)) + ".*JSON object.*list"):
        read_predictions(not_object)
    not_string = _write_json(tmp_path / "numbers.json", {"q1": "ok", "q2": 7})
    with pytest.raises(ValueError, match=re.escape(str(not_string)) + ".*'q2'.*int"):
        read_predictions(not_string)
    with pytest.raises(FileNotFoundError, match=r"absent\.json"):
        read_predictions(tmp_path / "absent.json")


def test_write_predictions_rejects_non_strings(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    with pytest.raises(TypeError, match="'q1'"):
        write_predictions({"q1": 3}, path)  # type: ignore[dict-item]
    assert not path.exists()


# --------------------------------------------------------------------------- #
# The official dev set
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def dev_raw() -> dict:
    if not DEV_PATH.is_file():
        pytest.skip(f"SQuAD v1.1 dev set not found at {DEV_PATH}; the metric's hand-built tests still run")
    return json.loads(zipfile.ZipFile(DEV_PATH).read(DEV_MEMBER))


@pytest.fixture(scope="module")
def dev_questions(dev_raw: dict) -> list[SquadQuestion]:
    return read_squad(DEV_PATH)


def test_dev_set_reading(dev_raw: dict, dev_questions: list[SquadQuestion]) -> None:
    questions = dev_questions
    assert len(dev_raw["data"]) == 48
    assert len(questions) == 10570
    assert len({q.id for q in questions}) == 10570
    assert len({q.context for q in questions}) == 2067
    assert sum(len(q.answers) for q in questions) == 34726
    raw_ids = [qa["id"] for a in dev_raw["data"] for p in a["paragraphs"] for qa in p["qas"]]
    assert [q.id for q in questions] == raw_ids  # dataset order kept
    for q in questions:
        assert q.answers
        assert len(q.answers) == len(q.answer_starts)
        for text, start in zip(q.answers, q.answer_starts, strict=True):
            assert q.context[start : start + len(text)] == text, q.id
    assert load_squad_dataset(DEV_PATH) == dev_raw["data"]


def test_dev_set_gold_answers_score_100(dev_questions: list[SquadQuestion]) -> None:
    scores = evaluate(dev_questions, {q.id: q.answers[0] for q in dev_questions})
    assert scores == SquadScores(exact_match=100.0, f1=100.0, total=10570, answered=10570, missing=0)


def test_dev_set_baseline_matches_official(dev_raw: dict, dev_questions: list[SquadQuestion]) -> None:
    # Deterministic baseline: the first three whitespace words of the context.
    predictions = {
        qa["id"]: " ".join(p["context"].split()[:3])
        for a in dev_raw["data"]
        for p in a["paragraphs"]
        for qa in p["qas"]
    }
    expected = official_evaluate(dev_raw["data"], predictions)
    scores = evaluate(dev_questions, predictions)
    assert 0.0 < expected["exact_match"] < expected["f1"] < 100.0
    assert scores.exact_match == pytest.approx(expected["exact_match"], abs=1e-9)
    assert scores.f1 == pytest.approx(expected["f1"], abs=1e-9)
    assert (scores.total, scores.answered, scores.missing) == (10570, 10570, 0)

    # Every other question left unanswered.
    partial = {qid: text for i, (qid, text) in enumerate(predictions.items()) if i % 2 == 0}
    expected = official_evaluate(dev_raw["data"], partial)
    scores = evaluate(dev_questions, partial)
    assert scores.exact_match == pytest.approx(expected["exact_match"], abs=1e-9)
    assert scores.f1 == pytest.approx(expected["f1"], abs=1e-9)
    assert (scores.answered, scores.missing) == (5285, 5285)


def test_dev_set_plain_json_path(tmp_path: Path, dev_questions: list[SquadQuestion]) -> None:
    path = tmp_path / DEV_MEMBER
    path.write_bytes(zipfile.ZipFile(DEV_PATH).read(DEV_MEMBER))
    assert read_squad(path) == dev_questions


def test_write_predictions_replaces_a_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "predictions.json"
    path.write_text("old", encoding="utf-8")
    write_predictions({"q1": "Denver Broncos"}, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"q1": "Denver Broncos"}
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.json"]  # no temporary file left
