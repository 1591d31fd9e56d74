"""Accuracy of the published checkpoint on the full SQuAD v1.1 dev set (slow; needs the real weights).

The model card reports EM 79.5998 and F1 86.9965 for distilbert/distilbert-base-cased-distilled-squad
with the reference pipeline's decoding; distilqa must reproduce them within 0.1.
"""

from __future__ import annotations

import pytest
from conftest import SQUAD_FILE

from distilqa.hub import DEFAULT_REPO_ID, find_local_checkpoint

PUBLISHED_EXACT_MATCH = 79.5998
PUBLISHED_F1 = 86.9965


@pytest.mark.slow
@pytest.mark.weights
def test_published_checkpoint_reproduces_reported_accuracy():
    checkpoint, looked_in = find_local_checkpoint(DEFAULT_REPO_ID)
    if checkpoint is None:
        pytest.skip(f"published weights not on this machine ({'; '.join(looked_in)}): run `distilqa download`")
    if not SQUAD_FILE.exists():
        pytest.skip(f"SQuAD v1.1 dev set not found at {SQUAD_FILE}")
    from distilqa.pipeline import QuestionAnswerer
    from distilqa.squad import evaluate, predict, read_squad

    questions = read_squad(SQUAD_FILE)
    assert len(questions) == 10570
    scores = evaluate(questions, predict(QuestionAnswerer.from_pretrained(checkpoint), questions))
    assert abs(scores.exact_match - PUBLISHED_EXACT_MATCH) <= 0.1, scores
    assert abs(scores.f1 - PUBLISHED_F1) <= 0.1, scores
