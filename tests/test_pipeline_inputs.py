"""Bad inputs and invariants of QuestionAnswerer.

Issue: "Empty or whitespace-only question or context, None or non-string values, mismatched list
lengths, a question so long that no context token fits in a window, a context of 1 MB, text with
control characters, zero-width characters, emoji, CJK, combining accents and \\r\\n: each gives a
clear ValueError/TypeError or a correct answer. A returned answer always satisfies
answer == context[start:end] with 0 <= start <= end <= len(context); nothing is silently dropped
from a batch."

Most tests use a tiny random checkpoint (fast); padding and the comparison with the transformers
pipeline use the published-size ``peaked_checkpoint`` (span scores like a trained model's, so relative
score tolerances mean something) with short inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fallback_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distilqa.pipeline as pipeline_module
from distilqa import linear
from distilqa.pipeline import PairError, QuestionAnswerer

# numpy 2 warns about the transformers pipeline's np.array(torch tensor); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ODD_CONTEXTS = {
    "control": "Bob\x07 is\x00 sitting\x1b on the\x7f bench\x0c in Paris.",
    "zero-width": "Bob\u200b is\u200c sitting\u200d on\ufeff the bench in Paris.",
    "emoji": "Bob 🧑‍🍳 is sitting 🪑 on the bench in 🇫🇷 Paris 🗼.",
    "cjk": "鲍勃坐在巴黎的长凳上。Bob is sitting on the bench in 東京.",
    "combining": "Bo\u0301b is sitting on the be\u0300nch in Pa\u0308ris, said Zoë.",
    "crlf": "Bob is sitting\r\non the bench\r\n\r\nin Paris.\r\n",
    "special-tokens": "Bob [SEP] is sitting [CLS] on the bench [PAD] in Paris [MASK].",
    "nbsp": "Bob\u00a0is\u2003sitting\u3000on the bench in Paris.",
}
SUPER_BOWL = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football League "
    "(NFL) for the 2015 season. The American Football Conference (AFC) champion Denver Broncos defeated the "
    "National Football Conference (NFC) champion Carolina Panthers 24–10 to earn their third Super Bowl title. "
    "The game was played on February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at Santa Clara, "
    "California. As this was the 50th Super Bowl, the league emphasized the golden anniversary."
)
ANSWER_KEYS = {"score", "start", "end", "answer"}


def check_answer(answer: dict, context: str, allow_empty: bool = False) -> None:
    """The span invariants every returned answer must satisfy."""
    assert isinstance(answer, dict) and set(answer) == ANSWER_KEYS, answer
    start, end, score = answer["start"], answer["end"], answer["score"]
    assert type(start) is int and type(end) is int, answer
    assert isinstance(score, float) and math.isfinite(score) and score >= 0.0, answer
    assert 0 <= start <= end <= len(context), answer
    assert answer["answer"] == context[start:end], answer
    if answer["answer"] == "":
        assert allow_empty and (start, end) == (0, 0), answer


def check_ranked(answers: list, context: str, top_k: int, allow_empty: bool = False) -> None:
    assert isinstance(answers, list) and 1 <= len(answers) <= top_k
    for answer in answers:
        check_answer(answer, context, allow_empty)
    scores = [answer["score"] for answer in answers]
    assert scores == sorted(scores, reverse=True)
    texts = [answer["answer"].lower() for answer in answers]
    assert len(set(texts)) == len(texts), "equal answers are merged"


def answers_agree(a: dict, b: dict, relative_tolerance: float) -> None:
    assert (a["answer"], a["start"], a["end"]) == (b["answer"], b["start"], b["end"])
    assert abs(a["score"] - b["score"]) <= relative_tolerance * b["score"], (a, b)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> QuestionAnswerer:
    return QuestionAnswerer.from_pretrained(tiny_checkpoint, batch_size=8)


@pytest.fixture(scope="module")
def peaked(peaked_checkpoint) -> QuestionAnswerer:
    return QuestionAnswerer.from_pretrained(peaked_checkpoint)


@pytest.fixture(scope="module")
def peaked_padded(peaked_checkpoint) -> QuestionAnswerer:
    return QuestionAnswerer.from_pretrained(peaked_checkpoint, packed=False)


# --------------------------------------------------------------------------- #
# Bad values: clear errors naming what is wrong
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("question", "context", "message"),
    [
        ("", "Bob is here.", r"question 0 is empty"),
        (" \t\n\r ", "Bob is here.", r"question 0 is empty or only whitespace"),
        ("Who?", "", r"context 0 is empty"),
        ("Who?", "\n\u3000 \u00a0\t", r"context 0 is empty or only whitespace"),
        (["Who?", "  "], ["Bob.", "Alice."], r"question 1 is empty"),
        (["Who?", "Where?"], ["Bob.", "\r\n"], r"context 1 is empty"),
        (["Who?", "Where?", "When?"], "", r"context 0 is empty"),
        (["Who?", "Where?"], ["Bob.", "Alice.", "Eve."], r"2 questions but 3 contexts"),
        ([], [], r"no questions"),
        ([], "Bob.", r"no questions"),
    ],
)
def test_empty_and_mismatched_inputs_raise_value_error(tiny, question, context, message):
    with pytest.raises(ValueError, match=message):
        tiny(question, context)


@pytest.mark.parametrize(
    ("question", "context", "message"),
    [
        (None, "Bob is here.", r"question must be a string"),
        ("Who?", None, r"context must be one string"),
        (42, "Bob is here.", r"question must be a string.*int"),
        (["Who?", None], ["Bob.", "Alice."], r"question 1 must be a string, got NoneType"),
        (["Who?", "Where?"], ["Bob.", 3.5], r"context 1 must be a string, got float"),
        (["Who?"], None, r"context must be a string or a list"),
        (["Who?"], 7, r"context must be a string or a list.*int"),
        ("Who?", ["Bob.", "Alice."], r"context must be one string"),
        (b"Who?", "Bob.", r"question 0 must be a string"),
        ({"question": "Who?"}, "Bob.", r"question must be a string.*dict"),
    ],
)
def test_non_string_inputs_raise_type_error(tiny, question, context, message):
    with pytest.raises(TypeError, match=message):
        tiny(question, context)


@pytest.mark.parametrize(
    ("question", "context", "message"),
    [
        ("\u200b\u200c\u200d", "Bob is here.", r"question 0 has no tokens"),
        ("Who?", "\u200b\ufeff\u200c\x00\x07\x1b", r"context 0 has no tokens"),
        (["Who?", "Who?", "Who?"], ["Bob.", "Alice.", "\x00\x01\x02\u200b"], r"context 2 has no tokens"),
        (["Who?", "\x7f\u200d"], ["Bob.", "Alice."], r"question 1 has no tokens"),
    ],
)
def test_inputs_without_tokens_raise_value_error(tiny, question, context, message):
    with pytest.raises(ValueError, match=message):
        tiny(question, context)


def test_question_leaving_no_room_for_context_raises_value_error(tiny):
    question = "Why " * 500 + "?"
    with pytest.raises(ValueError, match=r"question 0 has \d+ tokens.*max_seq_len=384"):
        tiny(question, SUPER_BOWL)
    with pytest.raises(ValueError, match=r"question 1 has \d+ tokens.*shorten the question"):
        tiny(["Who won?", "Who " * 60], [SUPER_BOWL, SUPER_BOWL], max_seq_len=64, doc_stride=16)


def test_long_question_with_context_fitting_one_window_is_answered(tiny):
    question = "Who won the game " * 20  # 80 tokens: room for the context in one 384-token window
    check_answer(tiny(question, "Bob won the game in Paris."), "Bob won the game in Paris.")


def test_too_long_question_is_named_by_its_index_beyond_the_first_chunk(tiny, monkeypatch):
    """Pairs are tokenized in chunks (PAIRS_PER_CHUNK); errors still name the caller's index."""
    monkeypatch.setattr(pipeline_module, "PAIRS_PER_CHUNK", 2)
    questions = ["Who won?", "Who won?", "Who won?", "Who " * 60]
    with pytest.raises(ValueError, match=r"question 3 has"):
        tiny(questions, SUPER_BOWL, max_seq_len=64, doc_stride=16)
    with pytest.raises(ValueError, match=r"context 4 has no tokens"):
        tiny(["Who won?"] * 5, ["Bob.", "Bob.", "Bob.", "Bob.", "\u200b"])


def test_lone_surrogate_raises_a_clear_error_not_a_crash(tiny):
    with pytest.raises((TypeError, ValueError)):
        tiny("Who\ud800?", "Bob is here.")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(top_k=0), r"top_k must be an integer >= 1"),
        (dict(top_k=-2), r"top_k"),
        (dict(top_k=1.5), r"top_k"),
        (dict(top_k="3"), r"top_k"),
        (dict(top_k=True), r"top_k"),
        (dict(max_answer_len=0), r"max_answer_len must be an integer >= 1"),
        (dict(max_answer_len=2.0), r"max_answer_len"),
        (dict(doc_stride=-1), r"doc_stride must be an integer >= 0"),
        (dict(doc_stride="16"), r"doc_stride"),
        (dict(max_seq_len=64, doc_stride=64), r"doc_stride \(64\) must be smaller"),
        (dict(max_seq_len=64, doc_stride=200), r"doc_stride \(200\)"),
        (dict(max_seq_len=513), r"max_seq_len \(513\) exceeds the model's 512 positions"),
        (dict(max_seq_len=4096, doc_stride=128), r"max_seq_len \(4096\)"),
        (dict(max_seq_len=2), r"max_seq_len must be an integer >= 4"),
        (dict(max_seq_len=384.0), r"max_seq_len"),
        (dict(max_seq_len="384"), r"max_seq_len"),
    ],
)
def test_invalid_options_raise_value_error(tiny, options, message):
    with pytest.raises(ValueError, match=message):
        tiny("Who?", "Bob is here.", **options)


def test_the_answerer_keeps_freed_memory_on_the_cpu(monkeypatch, tiny):
    """Each forward pass reuses the memory the last one freed (hardware.keep_freed_memory, process-wide)."""
    from distilqa import hardware

    calls = []
    monkeypatch.setattr(hardware, "keep_freed_memory", lambda: calls.append(True) or True)
    QuestionAnswerer(tiny.model, tiny.tokenizer)
    assert calls == [True]


def test_batch_size_must_be_positive(tiny):
    for bad in (0, -1, 2.5, None):
        with pytest.raises(ValueError, match="batch_size"):
            QuestionAnswerer(tiny.model, tiny.tokenizer, batch_size=bad)


# --------------------------------------------------------------------------- #
# Odd text: a correct answer
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", sorted(ODD_CONTEXTS))
def test_odd_text_gives_valid_answers(tiny, name):
    context = ODD_CONTEXTS[name]
    for align_to_words in (True, False):
        check_answer(tiny("Who is sitting?", context, align_to_words=align_to_words), context)
        check_ranked(tiny("Where\u200b is\r\n🧑 Bob?", context, top_k=5, align_to_words=align_to_words), context, 5)
    # A small window forces several overlapping windows over the odd characters.
    check_ranked(tiny("Where?", context * 3, top_k=3, max_seq_len=24, doc_stride=6), context * 3, 3)


def test_odd_text_with_published_model(peaked):
    contexts = list(ODD_CONTEXTS.values())
    answers = peaked(["Who is sitting on the bench?"] * len(contexts), contexts, top_k=2)
    assert len(answers) == len(contexts)
    for ranked, context in zip(answers, contexts):
        check_ranked(ranked, context, 2)


def test_one_megabyte_context_is_answered_in_bounded_batches(tiny_checkpoint, monkeypatch):
    answerer = QuestionAnswerer.from_pretrained(tiny_checkpoint, batch_size=64)
    rows: list[int] = []
    forward = answerer.model.forward

    def recording_forward(input_ids, **kwargs):
        lengths = kwargs["window_lengths"]
        rows.append(len(lengths))
        assert max(lengths) <= 384 and input_ids.numel() == sum(lengths)
        return forward(input_ids, **kwargs)

    monkeypatch.setattr(answerer.model, "forward", recording_forward)
    text = " ".join(fallback_corpus())
    context = (text * (1_000_000 // len(text) + 1))[:1_000_000]
    assert len(context) == 1_000_000
    answer = answerer("Where is Paris?", context)
    check_answer(answer, context)
    assert sum(rows) > 500, "a 1 MB context needs hundreds of windows"
    assert max(rows) <= 64, "windows go through the model in batches of at most batch_size"
    assert len(rows) >= sum(rows) // 64


# --------------------------------------------------------------------------- #
# Lists, top_k, and padding
# --------------------------------------------------------------------------- #


def test_list_results_keep_input_order_and_length(tiny):
    contexts = [ODD_CONTEXTS["crlf"], SUPER_BOWL, "Alice is sitting on the bench.", ODD_CONTEXTS["cjk"], SUPER_BOWL]
    questions = ["Where?", "Who won Super Bowl 50?", "Who is sitting?", "Who?", "When was the game?"]
    batched = tiny(questions, contexts)
    assert isinstance(batched, list) and len(batched) == len(questions)
    for question, context, answer in zip(questions, contexts, batched):
        check_answer(answer, context)
        answers_agree(answer, tiny(question, context), 1e-5)
    assert tiny(tuple(questions), tuple(contexts)) == batched  # any sequence, not only lists


def test_several_questions_about_one_context(tiny):
    questions = ["Who won?", "When was the game?", "Where was the game played?"]
    answers = tiny(questions, SUPER_BOWL)
    assert len(answers) == 3
    for question, answer in zip(questions, answers):
        answers_agree(answer, tiny(question, SUPER_BOWL), 1e-5)
    assert tiny(["Who won?"], SUPER_BOWL)[0] == tiny("Who won?", SUPER_BOWL)  # a list of one gives a list


def test_top_k_shapes(tiny):
    single = tiny("Who won?", SUPER_BOWL)
    assert isinstance(single, dict)
    ranked = tiny("Who won?", SUPER_BOWL, top_k=4)
    check_ranked(ranked, SUPER_BOWL, 4)
    assert len(ranked) == 4  # the paragraph has many more than 4 different spans
    many = tiny(["Who won?", "When?"], [SUPER_BOWL, "Bob."], top_k=3)
    assert len(many) == 2 and all(isinstance(r, list) for r in many)
    check_ranked(many[0], SUPER_BOWL, 3)
    check_ranked(many[1], "Bob.", 3)
    assert {a["answer"] for a in many[1]} <= {"Bob", ".", "Bob."}  # the only spans of 2 tokens


def test_one_bad_pair_fails_the_whole_batch(tiny):
    good = ["Who won?", "When?"]
    with pytest.raises(ValueError, match="question 2"):
        tiny([*good, ""], [SUPER_BOWL, SUPER_BOWL, SUPER_BOWL])
    with pytest.raises(ValueError, match="context 1 has no tokens"):
        tiny(good, [SUPER_BOWL, "\u200b"])
    with pytest.raises(TypeError, match="context 1"):
        tiny(good, [SUPER_BOWL, None])


@pytest.mark.parametrize("path", ["peaked_padded", "peaked"], ids=["padded", "packed"])
def test_batching_does_not_change_answers(request, monkeypatch, path):
    """A pair answered alone and in a batch of pairs of other lengths (padded, or packed end to end)
    gives the same answer. Measured: scores within 1.0e-5 relative (padded; packed less): float32
    rounding of batches of other shapes, amplified by the peaked span head's large logits."""
    answerer = request.getfixturevalue(path)
    padding = []
    forward = answerer.model.forward

    def recording_forward(input_ids, attention_mask=None, **kwargs):
        padding.append(attention_mask is not None and not bool(attention_mask.all()))
        return forward(input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(answerer.model, "forward", recording_forward)
    questions = ["Who?", "Where was HuggingFace founded ?", "Who won Super Bowl 50?", "What is sitting?"]
    contexts = ["Bob.", "HuggingFace was founded in Paris.", SUPER_BOWL, ODD_CONTEXTS["emoji"]]
    options = dict(top_k=2, max_seq_len=48, doc_stride=12)
    batched = answerer(questions, contexts, **options)
    assert padding[0] == (path == "peaked_padded"), "the padded path pads this batch; the packed one never does"
    for question, context, ranked in zip(questions, contexts, batched):
        alone = answerer(question, context, **options)
        check_ranked(ranked, context, 2)
        assert len(alone) == len(ranked)
        for a, b in zip(alone, ranked):
            answers_agree(a, b, 5e-5)


def test_windows_of_different_lengths_are_packed_without_padding(peaked, monkeypatch):
    calls = []
    forward = peaked.model.forward

    def recording_forward(input_ids, **kwargs):
        calls.append((input_ids.numel(), list(kwargs["window_lengths"])))
        return forward(input_ids, **kwargs)

    monkeypatch.setattr(peaked.model, "forward", recording_forward)
    peaked(["Who?", "Who won?"], ["Bob.", SUPER_BOWL[:200]])
    assert len(calls) == 1
    tokens, lengths = calls[0]
    assert len(set(lengths)) == 2 and tokens == sum(lengths)  # two lengths, not one padded length


def test_readable_model_pads_and_masks(peaked_padded, monkeypatch):
    """With packed=False the windows run as a padded batch with an attention mask."""
    readable = peaked_padded
    masks = []
    forward = readable.model.forward

    def recording_forward(input_ids, attention_mask=None, *args, **kwargs):
        masks.append(attention_mask)
        return forward(input_ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(readable.model, "forward", recording_forward)
    answers = readable(["Who?", "Who won?"], ["Bob.", SUPER_BOWL[:200]])
    assert len(masks) == 1 and masks[0] is not None and not bool(masks[0].all())
    check_answer(answers[0], "Bob.")


# --------------------------------------------------------------------------- #
# Impossible answers and scores
# --------------------------------------------------------------------------- #


def test_handle_impossible_answer_can_return_the_empty_answer(tiny, monkeypatch):
    forward = tiny.model.forward

    def prefers_no_answer(input_ids, **kwargs):
        output = forward(input_ids, **kwargs)
        lengths = kwargs["window_lengths"]
        first_tokens = [sum(lengths[:i]) for i in range(len(lengths))]  # each window's CLS: "no answer"
        output.start_logits[0, first_tokens] = 30.0
        output.end_logits[0, first_tokens] = 30.0
        return output

    monkeypatch.setattr(tiny.model, "forward", prefers_no_answer)
    answer = tiny("Who is the CEO?", "Alice is sitting on the bench.", handle_impossible_answer=True)
    assert {k: answer[k] for k in ("answer", "start", "end")} == {"answer": "", "start": 0, "end": 0}
    assert 0.99 < answer["score"] <= 1.0
    without = tiny("Who is the CEO?", "Alice is sitting on the bench.")
    check_answer(without, "Alice is sitting on the bench.")  # never empty without the option


def test_no_answer_scores_the_lowest_window(tiny, monkeypatch):
    """With handle_impossible_answer, "no answer" competes with the LOWEST CLS score over a pair's windows
    (the reference's rule): one window that sees an answer is enough to outscore it."""
    context = " ".join(["Alice is sitting on the bench next to Bob in Paris."] * 12)
    options = dict(handle_impossible_answer=True, max_seq_len=32, doc_stride=8)
    forward = tiny.model.forward
    for confident_windows in ("all", "all but the first"):

        def cls_heavy(input_ids, confident_windows=confident_windows, **kwargs):
            output = forward(input_ids, **kwargs)
            lengths = kwargs["window_lengths"]
            starts = [sum(lengths[:i]) for i in range(len(lengths))]  # each window's CLS
            assert len(starts) >= 3, "the context spans several windows"
            chosen = starts if confident_windows == "all" else starts[1:]
            output.start_logits[0, chosen] = 30.0
            output.end_logits[0, chosen] = 30.0
            return output

        monkeypatch.setattr(tiny.model, "forward", cls_heavy)
        answer = tiny("Who is sitting?", context, **options)
        assert (answer["answer"] == "") == (confident_windows == "all"), (confident_windows, answer)


def test_the_cls_token_never_starts_or_ends_an_answer(tiny, monkeypatch):
    """CLS stands for "no answer" only: even with overwhelming start and end logits there, the answer
    is the span chosen without them (their softmax mass is dropped, not the order of the others)."""
    context = "Alice is sitting on the bench. Bob is sitting next to her in Paris."
    question = "Who is sitting next to Alice?"
    expected = tiny(question, context, top_k=3)
    forward = tiny.model.forward
    for name in ("start_logits", "end_logits"):

        def cls_heavy(input_ids, name=name, **kwargs):
            output = forward(input_ids, **kwargs)
            lengths = kwargs["window_lengths"]
            getattr(output, name)[0, [sum(lengths[:i]) for i in range(len(lengths))]] = 30.0  # each window's CLS
            return output

        monkeypatch.setattr(tiny.model, "forward", cls_heavy)
        got = tiny(question, context, top_k=3)
        assert [(a["answer"], a["start"], a["end"]) for a in got] == [
            (a["answer"], a["start"], a["end"]) for a in expected
        ], name


def test_empty_answer_competes_by_score(tiny):
    context = "Alice is sitting."
    ranked = tiny("Who?", context, top_k=20, handle_impossible_answer=True)
    check_ranked(ranked, context, 20, allow_empty=True)
    assert any(a == {"score": a["score"], "start": 0, "end": 0, "answer": ""} for a in ranked)
    assert all(a["answer"] for a in tiny("Who?", context, top_k=20))


def test_scores_are_probabilities_within_one_window(peaked):
    for context in ("Alice is sitting on the bench.", SUPER_BOWL, ODD_CONTEXTS["cjk"]):
        ranked = peaked("Who is sitting?", context, top_k=5)
        check_ranked(ranked, context, 5)
        assert 0.0 < sum(a["score"] for a in ranked) <= 1.0 + 1e-6  # distinct spans of one softmax pair


# --------------------------------------------------------------------------- #
# Property test: arbitrary Unicode
# --------------------------------------------------------------------------- #

non_blank = st.text(min_size=1, max_size=200).filter(lambda s: s.strip())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    question=st.text(min_size=1, max_size=40).filter(lambda s: s.strip()),
    context=non_blank,
    top_k=st.sampled_from([1, 3]),
    align_to_words=st.booleans(),
    handle_impossible_answer=st.booleans(),
    window=st.sampled_from([(None, None), (24, 6), (48, 0)]),
)
def test_arbitrary_unicode_gives_valid_answers_or_clear_errors(
    tiny, question, context, top_k, align_to_words, handle_impossible_answer, window
):
    max_seq_len, doc_stride = window
    try:
        result = tiny(
            question,
            context,
            top_k=top_k,
            align_to_words=align_to_words,
            handle_impossible_answer=handle_impossible_answer,
            max_seq_len=max_seq_len,
            doc_stride=doc_stride,
        )
    except ValueError as error:
        assert "question 0" in str(error) or "context 0" in str(error), error
        return
    if top_k == 1:
        check_answer(result, context, allow_empty=handle_impossible_answer)
    else:
        check_ranked(result, context, top_k, allow_empty=handle_impossible_answer)


# --------------------------------------------------------------------------- #
# The reference's merging of equal answers, against the transformers pipeline
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def reference_pipeline(peaked_checkpoint):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    return transformers.pipeline(
        "question-answering", model=str(peaked_checkpoint), tokenizer=str(peaked_checkpoint), device="cpu"
    )


# 112 tokens: 3 windows of 64. With one-token answers there are only 6 different texts ("the", "denver",
# "broncos", "won", "in", "."), fewer than the candidates: equal answers must be merged.
REPEATED = "The Denver Broncos won in Denver. " * 16


@pytest.mark.parametrize(
    ("context", "options"),
    [
        (SUPER_BOWL, dict(top_k=1)),
        (SUPER_BOWL, dict(top_k=3)),
        (REPEATED, dict(top_k=1, max_answer_len=1)),
        (REPEATED, dict(top_k=3, max_answer_len=1)),
        (REPEATED, dict(top_k=3, max_answer_len=1, align_to_words=False, handle_impossible_answer=True)),
    ],
    ids=["paragraph-top1", "paragraph-top3", "repeated-top1", "repeated-top3", "repeated-tokens-impossible"],
)
def test_summed_scores_of_equal_answers_match_reference(peaked, reference_pipeline, monkeypatch, context, options):
    """Answers of equal text, found in several windows (or places), are merged by summing their scores,
    exactly as the transformers pipeline does."""
    seen: list[list[tuple[float, int, int]]] = []
    merge = pipeline_module.merge_answers

    def recording_merge(context_text, candidates, null_score, top_k):
        seen.append(list(candidates))
        return merge(context_text, candidates, null_score, top_k)

    monkeypatch.setattr(pipeline_module, "merge_answers", recording_merge)
    question = "Who won the game?"
    ours = peaked(question, context, max_seq_len=64, doc_stride=16, **options)
    expected = reference_pipeline(question=question, context=context, max_seq_len=64, doc_stride=16, **options)
    ours_list = ours if isinstance(ours, list) else [ours]
    expected_list = expected if isinstance(expected, list) else [expected]
    assert isinstance(ours, dict) == (options["top_k"] == 1)
    assert len(ours_list) == len(expected_list)
    for a, b in zip(ours_list, expected_list):
        # Measured: up to 2.1e-5 relative (with the fallback vocabulary of a clone without ../shared);
        # the batched and unbatched forwards round differently. A wrong merge is off by far more.
        answers_agree(a, {**b, "score": float(b["score"])}, 1e-4)
        check_answer(a, context, allow_empty=options.get("handle_impossible_answer", False))
    (candidates,) = seen
    if context is REPEATED:
        texts = [context[start:end].lower() for _, start, end in candidates]
        assert len(set(texts)) < len(texts), "equal answers were found and merged"


# --------------------------------------------------------------------------- #
# The public API: structured errors, from_pretrained's arguments, save_pretrained, exports
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("questions", "contexts", "index", "field", "reason"),
    [
        (["Who?", "  "], ["Bob.", "Alice."], 1, "question", "is empty or only whitespace"),
        (["Who?"] * 3, ["Bob.", "Alice.", "\u200b"], 2, "context", "has no tokens"),
        (["Who?", "\x7f\u200d"], ["Bob.", "Alice."], 1, "question", "has no tokens"),
        (["Who won?", "Who " * 60], [SUPER_BOWL, SUPER_BOWL], 1, "question", "has 60 tokens"),
    ],
)
def test_a_bad_pair_is_named_by_a_structured_error(tiny, questions, contexts, index, field, reason):
    with pytest.raises(PairError) as error:
        tiny(questions, contexts, max_seq_len=64, doc_stride=16)
    assert (error.value.index, error.value.field) == (index, field)
    assert error.value.reason.startswith(reason), error.value.reason
    assert str(error.value) == f"{field} {index} {error.value.reason}"
    assert isinstance(error.value, ValueError)


def test_save_pretrained_writes_a_folder_that_answers(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "saved")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        path.name for path in (tmp_path / "saved").iterdir()
    }
    again = QuestionAnswerer.from_pretrained(tmp_path / "saved")
    questions = ["Who is sitting?", "When was the game?"]
    contexts = [ODD_CONTEXTS["emoji"], SUPER_BOWL]
    assert again(questions, contexts, top_k=3) == tiny(questions, contexts, top_k=3)


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
def test_from_pretrained_honours_every_argument(tiny_checkpoint):
    qa = QuestionAnswerer.from_pretrained(
        tiny_checkpoint,
        device="cpu",
        dtype="bfloat16",
        batch_size=7,
        attn_implementation="eager",
        linear_backend="aten",
        packed=False,
        compile=True,
    )
    model = qa.model
    assert (qa.batch_size, qa.packed) == (7, False)
    assert (model.device.type, model.dtype, model.attn_implementation, model.linear_backend) == (
        "cpu",
        torch.bfloat16,
        "eager",
        "aten",
    )
    assert all(block._compiled_call_impl is not None for block in model.distilbert.transformer.layer)
    quantized = QuestionAnswerer.from_pretrained(tiny_checkpoint, quantize="int8", linear_backend="aten").model
    assert type(quantized.distilbert.transformer.layer[0].ffn.lin1) is torch.ao.nn.quantized.dynamic.Linear
    if linear.onednn_int8_available():  # on oneDNN: its int8 GEMM, with the post-ops; the span head stays float32
        quantized = QuestionAnswerer.from_pretrained(tiny_checkpoint, quantize="int8", linear_backend="onednn").model
        assert linear.linear_backend(quantized.distilbert.transformer) == "onednn-int8"
        assert type(quantized.qa_outputs) is linear.OneDNNLinear


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(packed="no"), TypeError, "packed must be True or False"),
        (dict(compile=1), TypeError, "compile must be True or False"),
        (dict(quantize="int4"), ValueError, "quantize"),
        (dict(revision="main"), ValueError, "local folder"),
        (dict(dtype="float64"), ValueError, "float64"),
        (dict(attn_implementation="flash"), ValueError, "unknown attention implementation"),
        (dict(linear_backend="mkl"), ValueError, "mkl"),
        (dict(quantize="int8", dtype="bfloat16"), ValueError, "float32"),
    ],
)
def test_from_pretrained_rejects_what_it_cannot_honour(tiny_checkpoint, arguments, error, message):
    with pytest.raises(error, match=message):
        QuestionAnswerer.from_pretrained(tiny_checkpoint, **arguments)


def test_public_names_build_an_answerer(tiny_checkpoint):
    """Everything a user passes to the public constructors is importable from distilqa itself."""
    import distilqa

    for name in ("Answer", "PairError", "QuestionContextTokenizer", "DistilBertConfig", "QuestionAnswerer"):
        assert name in distilqa.__all__ and getattr(distilqa, name) is not None
    assert set(distilqa.Answer.__annotations__) == ANSWER_KEYS
    model = distilqa.DistilBertForQuestionAnswering(
        distilqa.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    )
    tokenizer = distilqa.QuestionContextTokenizer.from_pretrained(tiny_checkpoint)
    check_answer(distilqa.QuestionAnswerer(model, tokenizer)("Who?", "Bob is here."), "Bob is here.")


def test_from_pretrained_refuses_a_device_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown device 'nonsense'"):
        QuestionAnswerer.from_pretrained(tmp_path / "not-even-a-checkpoint", device="nonsense")
