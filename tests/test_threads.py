"""One QuestionAnswerer shared by several threads: every call answers exactly as it does alone.

A web server's first move is to load the model once and answer from a thread pool; calls then run
at the same time with different window settings (``max_seq_len``, ``doc_stride``) and ``top_k``.
"""

from __future__ import annotations

import contextlib
import pickle
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import fallback_corpus

from distilqa.pipeline import QuestionAnswerer

THREADS = 8
ROUNDS = 4  # each job runs this many times, interleaved with all the others
# (max_seq_len, doc_stride, top_k): short windows cut the contexts into many, long ones into one or two.
SETTINGS = [(384, 128, 1), (48, 8, 3), (32, 0, 1), (64, 24, 2), (40, 16, 1), (128, 64, 3)]


@pytest.fixture(scope="module")
def answerer(tiny_checkpoint) -> QuestionAnswerer:
    return QuestionAnswerer.from_pretrained(tiny_checkpoint, batch_size=4)  # the default linear backend


def jobs() -> list[tuple[list[str], list[str], dict]]:
    """(questions, contexts, options) per call: each of SETTINGS on its own texts."""
    sentences = fallback_corpus(400)
    rng = random.Random(1)
    calls = []
    for max_seq_len, doc_stride, top_k in SETTINGS:
        contexts = [" ".join(rng.sample(sentences, rng.randint(4, 12))) for _ in range(3)]
        questions = [rng.choice(sentences)[:40] for _ in contexts]
        calls.append((questions, contexts, dict(max_seq_len=max_seq_len, doc_stride=doc_stride, top_k=top_k)))
    return calls


def run_together(call, arguments: list) -> list:
    """``call(argument)`` for each argument from THREADS threads at once; an exception is returned as its repr."""
    start_together = threading.Barrier(THREADS)

    def run(argument):
        # Calls start in groups of THREADS at the same moment; the last group, smaller, waits out the timeout.
        with contextlib.suppress(threading.BrokenBarrierError):
            start_together.wait(timeout=1)
        try:
            return call(argument)
        except Exception as error:
            return f"raised {error!r}"

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(run, arguments))


def assert_same_as_alone(order: list[int], alone: list, together: list) -> None:
    wrong = [(index, got) for index, got in zip(order, together) if got != alone[index]]
    raised = [got for _, got in wrong if isinstance(got, str)]
    assert not wrong, (
        f"{len(wrong)} of {len(order)} concurrent calls differ from the same call alone ({len(raised)} raised); "
        f"first (settings {SETTINGS[wrong[0][0]]}): alone {str(alone[wrong[0][0]])[:150]}..., "
        f"concurrently {str(wrong[0][1])[:150]}"
    )


def test_concurrent_calls_answer_as_sequential_calls(answerer):
    calls = jobs()
    alone = [answerer(questions, contexts, **options) for questions, contexts, options in calls]
    order = [index for _ in range(ROUNDS) for index in range(len(calls))]
    random.Random(2).shuffle(order)

    def answer(index: int):
        questions, contexts, options = calls[index]
        return answerer(questions, contexts, **options)

    assert_same_as_alone(order, alone, run_together(answer, order))


def test_concurrent_windows_are_sequential_windows(answerer):
    """The tokenizer alone, where threads overlap most: windows of each setting exactly as computed alone."""
    calls = jobs()

    def windows(index: int) -> list[list[list[int]]]:
        questions, contexts, options = calls[index]
        pairs = answerer.tokenizer.encode_windows(questions, contexts, options["max_seq_len"], options["doc_stride"])
        return [[window.ids for window in pair] for pair in pairs]

    alone = [windows(index) for index in range(len(calls))]
    order = [index for _ in range(20) for index in range(len(calls))]
    assert_same_as_alone(order, alone, run_together(windows, order))


def test_tokenizer_pickles_without_its_lock(answerer):
    """Worker processes receive the tokenizer pickled: the lock and the configured copies stay behind."""
    questions, contexts, options = jobs()[1]
    windows = answerer.tokenizer.encode_windows(questions, contexts, options["max_seq_len"], options["doc_stride"])
    copied = pickle.loads(pickle.dumps(answerer.tokenizer))
    again = copied.encode_windows(questions, contexts, options["max_seq_len"], options["doc_stride"])
    assert [[w.ids for w in pair] for pair in again] == [[w.ids for w in pair] for pair in windows]
    assert answerer.tokenizer.tokenizer.truncation is None, "the shared tokenizer is never reconfigured"
