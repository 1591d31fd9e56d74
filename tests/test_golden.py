"""Golden answers of the REAL distilbert/distilbert-base-cased-distilled-squad checkpoint.

These run only when the published weights are in weights/ (``distilqa download``); the values come
from the model card and from the transformers question-answering pipeline's own tests. Nothing here
is faked with random weights: without the checkpoint every test is skipped.
"""

from __future__ import annotations

import json
import zipfile

import pytest
from conftest import SQUAD_FILE

from distilqa.hub import DEFAULT_REPO_ID, find_local_checkpoint

# Wherever `distilqa download` (or transformers) put them: the Hugging Face cache, then weights/.
CHECKPOINT, LOOKED_IN = find_local_checkpoint(DEFAULT_REPO_ID)
HAVE_WEIGHTS = CHECKPOINT is not None

NO_WEIGHTS = (
    "the published weights are not on this machine (looked in: " + "; ".join(LOOKED_IN) + "): "
    "run `distilqa download` to enable the golden-answer tests"
)
requires_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason=NO_WEIGHTS)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# (question, context, answer, score, start, end, score tolerance). Note the leading and trailing
# newline of the model card's contexts: the offsets count them.
GOLDEN = [
    (
        "What is a good example of a question answering dataset?",
        "\nExtractive Question Answering is the task of extracting an answer from a text given a question. An "
        "example of a\nquestion answering dataset is the SQuAD dataset, which is entirely based on that task. If "
        "you would like to fine-tune\na model on a SQuAD task, you may leverage the "
        "examples/pytorch/question-answering/run_squad.py script.\n",
        "SQuAD dataset",
        0.5152,
        147,
        160,
        5e-5,
    ),
    (
        "Who is the CEO?",
        "\nAlice is sitting on the bench. Bob is sitting next to her.\n",
        "Bob",
        0.7527,
        32,
        35,
        5e-5,
    ),
    (
        "Where was HuggingFace founded ?",
        "HuggingFace was founded in Paris.",
        "Paris",
        0.979,
        27,
        32,
        5e-4,
    ),
]
IDS = ["model-card-squad", "model-card-ceo", "pipeline-test-paris"]


@pytest.fixture(scope="module")
def answerer():
    from distilqa.pipeline import QuestionAnswerer

    return QuestionAnswerer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.pipeline("question-answering", model=str(CHECKPOINT), tokenizer=str(CHECKPOINT), device="cpu")


def test_golden_offsets_are_consistent():
    """The expected values themselves: each answer is its context's text at (start, end)."""
    for _, context, answer, _, start, end, _ in GOLDEN:
        assert context[start:end] == answer


@pytest.mark.weights
@requires_weights
@pytest.mark.parametrize(("question", "context", "answer", "score", "start", "end", "tolerance"), GOLDEN, ids=IDS)
def test_golden_answer(answerer, question, context, answer, score, start, end, tolerance):
    got = answerer(question=question, context=context)
    assert (got["answer"], got["start"], got["end"]) == (answer, start, end)
    assert abs(got["score"] - score) <= tolerance, got["score"]


@pytest.mark.weights
@requires_weights
def test_golden_answers_batched(answerer):
    """The three pairs in one batch (padded together) give the same golden answers."""
    got = answerer([g[0] for g in GOLDEN], [g[1] for g in GOLDEN])
    for answer, (_, _, text, score, start, end, tolerance) in zip(got, GOLDEN):
        assert (answer["answer"], answer["start"], answer["end"]) == (text, start, end)
        assert abs(answer["score"] - score) <= tolerance


@pytest.mark.weights
@requires_weights
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize(("question", "context", "answer", "score", "start", "end", "tolerance"), GOLDEN, ids=IDS)
def test_golden_matches_transformers_pipeline(
    answerer, reference, top_k, question, context, answer, score, start, end, tolerance
):
    ours = answerer(question=question, context=context, top_k=top_k)
    expected = reference(question=question, context=context, top_k=top_k)
    ours, expected = (ours, expected) if top_k > 1 else ([ours], [expected])
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert (a["answer"], a["start"], a["end"]) == (b["answer"], b["start"], b["end"])
        assert abs(a["score"] - float(b["score"])) <= 2e-5 * float(b["score"])  # as tests/test_pipeline_parity.py
    assert (ours[0]["answer"], ours[0]["start"], ours[0]["end"]) == (answer, start, end)


@pytest.mark.weights
@requires_weights
def test_cli_default_model_answers_golden(capsys):
    """``distilqa ask`` without --model uses the downloaded default checkpoint."""
    from distilqa.cli import main

    question, context, answer, score, start, end, tolerance = GOLDEN[2]
    assert main(["ask", "--question", question, "--context", context, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["answer"], got["start"], got["end"]) == (answer, start, end)
    assert abs(got["score"] - score) <= tolerance


@pytest.mark.weights
@requires_weights
@pytest.mark.slow
@pytest.mark.skipif(not SQUAD_FILE.exists(), reason=f"SQuAD dev set not found at {SQUAD_FILE}")
def test_squad_predictions_match_transformers_pipeline(answerer, reference):
    """The first 24 SQuAD dev questions: the same answers as the transformers pipeline."""
    data = json.loads(zipfile.ZipFile(SQUAD_FILE).read("dev-v1.1.json"))["data"]
    pairs = [(qa["question"], p["context"]) for a in data for p in a["paragraphs"] for qa in p["qas"]][:24]
    ours = answerer([q for q, _ in pairs], [c for _, c in pairs])
    for (question, context), answer in zip(pairs, ours):
        expected = reference(question=question, context=context)
        assert (answer["answer"], answer["start"], answer["end"]) == (
            expected["answer"],
            expected["start"],
            expected["end"],
        )
        assert abs(answer["score"] - float(expected["score"])) <= 2e-5 * float(expected["score"])
