"""Tests for distilqa.tokenization: windows, offsets and word ids exactly as transformers' BertTokenizerFast.

The reference is ``transformers.BertTokenizerFast(vocab_file, do_lower_case=False)`` called as the
question-answering pipeline calls it (``truncation="only_second"``, ``stride``, overflowing tokens,
offsets). Pairs come from the SQuAD v1.1 dev set when ../shared/data has it, plus hand-made text with
the characters that usually break tokenizers.
"""

from __future__ import annotations

import functools
import itertools
import json
import unicodedata
import zipfile
from pathlib import Path

import pytest
from conftest import SQUAD_FILE, VOCAB_FILE, write_vocab
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Encoding

from distilqa.tokenization import (
    CONFIGURED_COPIES,
    SPECIAL_TOKENS,
    QuestionContextTokenizer,
    build_wordpiece_tokenizer,
)

# transformers' BertTokenizerFast builds its WordPiece model in a way tokenizers deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Deprecated in 0.9.0:DeprecationWarning")

WINDOW_SETTINGS = [(384, 128), (64, 16)]

HAND_MADE = [
    "北京是中国的首都。東京タワーは1958年に完成した。",
    "I love 🍕 and 🐍! The 👩‍👩‍👧 family flew from 🇫🇷 to 🇯🇵.",
    "Cafe\u0301 de\u0301ja\u0300 vu: Zoë's naïve façade, Ångström and Øresund.",
    "zero\u200bwidth\u200c non\u200djoiner\ufeff and a soft\u00adhyphen",
    "bell\x07 null\x00 escape\x1b tab\t delete\x7f form\x0cfeed vertical\x0btab",
    "line one\r\nline two\r\n\r\nline three\rcarriage\nnewline",
    "The tokens [CLS] and [SEP] are special; so are [MASK], [PAD] and [UNK]. [CLS][SEP]",
    "\u00a0no-break\u2003em space\u3000ideographic space\u2028line separator",
    "مرحبا بالعالم and नमस्ते दुनिया and 한국어 문장입니다 and Ελληνικά",
    "a" * 150 + " is a word longer than max_input_chars_per_word, 1,000,000.5 isn't",
    "Denver Broncos defeated the Carolina Panthers 24–10 to earn their third Super Bowl title.",
]
HAND_QUESTIONS = [
    "What is [CLS]?",
    "Who won Super Bowl 50?",
    "北京是什么？",
    "Was ist 🍕 und Cafe\u0301?",
    "zero\u200bwidth\r\nquestion\x07?",
]


@functools.cache
def squad_pairs(limit: int = 200) -> list[tuple[str, str]]:
    """(question, context) pairs spread over the whole SQuAD v1.1 dev set, or none without it."""
    if not SQUAD_FILE.exists():
        return []
    data = json.loads(zipfile.ZipFile(SQUAD_FILE).read("dev-v1.1.json"))["data"]
    paragraphs = [paragraph for article in data for paragraph in article["paragraphs"]]
    step = max(1, len(paragraphs) // limit)
    return [(p["qas"][0]["question"], p["context"]) for p in paragraphs[::step][:limit]]


def hand_made_pairs() -> list[tuple[str, str]]:
    long_context = " ".join(HAND_MADE)
    pairs = [(q, c) for q in HAND_QUESTIONS for c in HAND_MADE]
    pairs += [(q, long_context) for q in HAND_QUESTIONS]
    pairs += [(c[:40], long_context + " " + c) for c in HAND_MADE]  # odd text in the question too
    return pairs


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> Path:
    return write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


@pytest.fixture(scope="module")
def reference(vocab_file):
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizerFast(str(vocab_file), do_lower_case=False)


@pytest.fixture(scope="module")
def ours(vocab_file) -> QuestionContextTokenizer:
    return QuestionContextTokenizer(build_wordpiece_tokenizer(vocab_file, lowercase=False))


def question_tokens(tokenizer: QuestionContextTokenizer, question: str) -> int:
    tokenizer.tokenizer.no_truncation()
    return len(tokenizer.tokenizer.encode(question, add_special_tokens=False).ids)


def reference_windows(reference, questions, contexts, max_seq_len, doc_stride) -> list[list[dict]]:
    """The reference's windows grouped per pair: ids, offsets, sequence ids, word ids."""
    encoded = reference(
        text=list(questions),
        text_pair=list(contexts),
        truncation="only_second",
        max_length=max_seq_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    grouped: list[list[dict]] = [[] for _ in questions]
    for i, pair in enumerate(encoded["overflow_to_sample_mapping"]):
        grouped[pair].append(
            {
                "ids": encoded["input_ids"][i],
                "offsets": [tuple(offset) for offset in encoded["offset_mapping"][i]],
                "sequence_ids": encoded.sequence_ids(i),
                "word_ids": encoded.word_ids(i),
            }
        )
    return grouped


def as_dict(encoding: Encoding) -> dict:
    return {
        "ids": encoding.ids,
        "offsets": [tuple(offset) for offset in encoding.offsets],
        "sequence_ids": encoding.sequence_ids,
        "word_ids": encoding.word_ids,
    }


def compare_with_reference(ours, reference, pairs, max_seq_len, doc_stride) -> int:
    """Assert identical windows for every pair the reference can encode; returns the windows compared."""
    fits = [(q, c) for q, c in pairs if question_tokens(ours, q) + 3 + doc_stride < max_seq_len]
    questions, contexts = [q for q, _ in fits], [c for _, c in fits]
    expected = reference_windows(reference, questions, contexts, max_seq_len, doc_stride)
    got = ours.encode_windows(questions, contexts, max_seq_len, doc_stride)
    assert len(got) == len(expected)
    for i, (ours_windows, reference_pair) in enumerate(zip(got, expected)):
        assert [as_dict(w) for w in ours_windows] == reference_pair, f"pair {i}: {questions[i]!r}"
    return sum(len(windows) for windows in got)


# --------------------------------------------------------------------------- #
# Same windows as the reference
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(not SQUAD_FILE.exists(), reason=f"SQuAD dev set not found at {SQUAD_FILE}")
@pytest.mark.parametrize(("max_seq_len", "doc_stride"), WINDOW_SETTINGS)
def test_squad_windows_match_reference(ours, reference, max_seq_len, doc_stride):
    pairs = squad_pairs()
    assert len(pairs) >= 150
    windows = compare_with_reference(ours, reference, pairs, max_seq_len, doc_stride)
    assert windows >= len(pairs)
    if max_seq_len == 64:
        assert windows > 2 * len(pairs)  # most contexts need several windows: overflow is exercised


@pytest.mark.parametrize(("max_seq_len", "doc_stride"), WINDOW_SETTINGS)
def test_hand_made_windows_match_reference(ours, reference, max_seq_len, doc_stride):
    pairs = hand_made_pairs()
    windows = compare_with_reference(ours, reference, pairs, max_seq_len, doc_stride)
    assert windows > len(pairs) // 2


@pytest.mark.parametrize("text", [*HAND_MADE, *HAND_QUESTIONS, "Hello, my dog is cute"])
def test_single_sequence_matches_reference(vocab_file, reference, text):
    ours = build_wordpiece_tokenizer(vocab_file, lowercase=False).encode(text)
    expected = reference(text, return_offsets_mapping=True)
    assert ours.ids == expected["input_ids"]
    assert [tuple(o) for o in ours.offsets] == [tuple(o) for o in expected["offset_mapping"]]
    assert ours.word_ids == expected.word_ids()


@pytest.mark.parametrize("text", [*HAND_MADE, "HELLO Hello hello ÉCOLE École"])
def test_lowercase_matches_uncased_reference(vocab_file, text):
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertTokenizerFast(str(vocab_file), do_lower_case=True)
    ours = build_wordpiece_tokenizer(vocab_file, lowercase=True).encode(text)
    expected = reference(text, return_offsets_mapping=True)
    assert ours.ids == expected["input_ids"]
    assert [tuple(o) for o in ours.offsets] == [tuple(o) for o in expected["offset_mapping"]]


def test_literal_special_tokens_in_text_are_special(ours, reference):
    """ "[CLS]" typed in a context is the [CLS] token to both tokenizers (as in the reference)."""
    (window,) = ours.encode_windows(["Why?"], ["a [CLS] b [SEP] c"], 64, 16)[0]
    cls, sep = ours.cls_token_id, ours.tokenizer.token_to_id("[SEP]")
    context_ids = [i for i, s in zip(window.ids, window.sequence_ids) if s == 1]
    assert cls in context_ids and sep in context_ids
    assert window.ids == reference("Why?", "a [CLS] b [SEP] c")["input_ids"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    question=st.text(min_size=1, max_size=30),
    context=st.text(min_size=1, max_size=300),
    max_seq_len=st.integers(16, 80),
    stride_fraction=st.floats(0.0, 0.5),
)
def test_arbitrary_text_matches_reference(ours, reference, question, context, max_seq_len, stride_fraction):
    doc_stride = int(max_seq_len * stride_fraction)
    if question_tokens(ours, question) + 3 + doc_stride >= max_seq_len:
        # No room for the context; ours must refuse cleanly (when it cannot fit) rather than panic.
        try:
            windows = ours.encode_windows([question], [context], max_seq_len, doc_stride)
        except ValueError as error:
            assert "question 0" in str(error)
        else:
            assert all(len(w.ids) <= max_seq_len for w in windows[0])
        return
    compare_with_reference(ours, reference, [(question, context)], max_seq_len, doc_stride)


# --------------------------------------------------------------------------- #
# Real vocabulary facts
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(not VOCAB_FILE.exists(), reason=f"the real cased vocabulary is not at {VOCAB_FILE}")
def test_real_vocabulary_facts():
    tokenizer = build_wordpiece_tokenizer(VOCAB_FILE, lowercase=False)
    assert tokenizer.encode("Hello, my dog is cute").ids == [101, 8667, 117, 1139, 3676, 1110, 10509, 102]
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 100, 101, 102, 103]
    assert tokenizer.token_to_id("the") == 1103 and tokenizer.token_to_id("The") == 1109
    assert tokenizer.get_vocab_size() == 28996
    wrapped = QuestionContextTokenizer(tokenizer)
    assert (wrapped.cls_token_id, wrapped.pad_token_id) == (101, 0)


def test_vocabulary_without_special_tokens_is_refused(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        build_wordpiece_tokenizer(vocab)


# --------------------------------------------------------------------------- #
# from_pretrained
# --------------------------------------------------------------------------- #


def test_from_pretrained_tokenizer_json(tmp_path, vocab_file):
    build_wordpiece_tokenizer(vocab_file, lowercase=False).save(str(tmp_path / "tokenizer.json"))
    tokenizer = QuestionContextTokenizer.from_pretrained(tmp_path)
    assert tokenizer.model_max_length == 512  # no tokenizer_config.json: the BERT default
    assert tokenizer.tokenizer.normalizer.normalize_str("HeLLo") == "HeLLo"
    expected = build_wordpiece_tokenizer(vocab_file).encode("Hello, Paris!", "Denver [SEP] 1998.")
    assert tokenizer.tokenizer.encode("Hello, Paris!", "Denver [SEP] 1998.").ids == expected.ids


def test_from_pretrained_prefers_tokenizer_json(tmp_path, vocab_file):
    """tokenizer.json wins over vocab.txt + tokenizer_config.json, as in transformers."""
    write_vocab(tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "model_max_length": 300}))
    build_wordpiece_tokenizer(vocab_file, lowercase=True).save(str(tmp_path / "tokenizer.json"))
    tokenizer = QuestionContextTokenizer.from_pretrained(tmp_path)
    assert tokenizer.tokenizer.normalizer.normalize_str("HeLLo") == "hello"
    assert tokenizer.model_max_length == 300


def test_from_pretrained_cased_vocab_and_config(tmp_path):
    write_vocab(tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "model_max_length": 256}))
    tokenizer = QuestionContextTokenizer.from_pretrained(tmp_path)
    assert tokenizer.tokenizer.normalizer.normalize_str("HeLLo") == "HeLLo"
    assert tokenizer.model_max_length == 256
    expected = build_wordpiece_tokenizer(tmp_path / "vocab.txt", lowercase=False).encode("Hello Paris").ids
    assert tokenizer.tokenizer.encode("Hello Paris").ids == expected


def test_from_pretrained_vocab_alone_lowercases(tmp_path):
    write_vocab(tmp_path / "vocab.txt")
    tokenizer = QuestionContextTokenizer.from_pretrained(tmp_path)
    assert tokenizer.tokenizer.normalizer.normalize_str("HeLLo") == "hello"  # BERT's default do_lower_case
    assert tokenizer.model_max_length == 512
    expected = build_wordpiece_tokenizer(tmp_path / "vocab.txt", lowercase=True).encode("Hello Paris").ids
    assert tokenizer.tokenizer.encode("Hello Paris").ids == expected


def test_from_pretrained_without_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        QuestionContextTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value)
    assert "vocab.txt" in str(error.value) and "tokenizer.json" in str(error.value)


# --------------------------------------------------------------------------- #
# Windows: overlap and coverage
# --------------------------------------------------------------------------- #


def context_offsets(encoding: Encoding) -> list[tuple[int, int]]:
    return [tuple(o) for o, s in zip(encoding.offsets, encoding.sequence_ids) if s == 1]


def assert_windows_tile_context(tokenizer, question, context, max_seq_len, doc_stride):
    windows = tokenizer.encode_windows([question], [context], max_seq_len, doc_stride)[0]
    tokenizer.tokenizer.no_truncation()
    everything = [tuple(o) for o in tokenizer.tokenizer.encode(context, add_special_tokens=False).offsets]
    n_question = question_tokens(tokenizer, question)
    for window in windows:
        assert len(window.ids) <= max_seq_len
        assert window.sequence_ids == [None, *[0] * n_question, None, *[1] * (len(window.ids) - n_question - 3), None]
        assert window.ids[0] == tokenizer.cls_token_id
    joined = context_offsets(windows[0])
    for previous, current in itertools.pairwise(windows):
        before, after = context_offsets(previous), context_offsets(current)
        assert len(before) > doc_stride
        if doc_stride:
            assert before[-doc_stride:] == after[:doc_stride], "consecutive windows share doc_stride tokens"
        joined += after[doc_stride:]
    assert joined == everything, "the windows, less their overlaps, are exactly the context's tokens"
    return windows


@pytest.mark.parametrize(("max_seq_len", "doc_stride"), [(64, 16), (384, 128), (32, 0), (40, 20), (24, 1)])
def test_windows_overlap_by_doc_stride_and_cover_context(ours, max_seq_len, doc_stride):
    context = " ".join(HAND_MADE) * 3
    windows = assert_windows_tile_context(ours, "Who won?", context, max_seq_len, doc_stride)
    assert len(windows) >= 2


def test_settings_in_any_order_on_one_tokenizer_match_reference(ours, reference):
    """Window settings share one tokenizer object, one configured copy each: every call gets its own
    max_seq_len and doc_stride, whatever ran before, also after more settings than copies are kept."""
    pairs = [(question, " ".join(HAND_MADE)) for question in HAND_QUESTIONS[:2]]
    settings = [(64, 16), (64, 0), (48, 16), (64, 30), (48, 0)]
    settings += [(32 + i, i) for i in range(CONFIGURED_COPIES)] + settings  # evicts the first ones, then revisits
    for max_seq_len, doc_stride in settings:
        assert compare_with_reference(ours, reference, pairs, max_seq_len, doc_stride) > 2 * len(pairs)
    assert ours.tokenizer.truncation is None and ours.tokenizer.padding is None, "the shared object stays as built"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(context=st.text(min_size=1, max_size=400), max_seq_len=st.integers(16, 64), stride=st.integers(0, 30))
def test_windows_tile_arbitrary_context(ours, context, max_seq_len, stride):
    room = max_seq_len - 3 - question_tokens(ours, "Who won?")  # context tokens per window
    assert_windows_tile_context(ours, "Who won?", context, max_seq_len, min(stride, room - 1))


# --------------------------------------------------------------------------- #
# Questions that leave no room for the context
# --------------------------------------------------------------------------- #


# Words of conftest.fallback_corpus, so one token each with the real and with the fallback vocabulary.
LONG_QUESTION = "the " * 100  # 100 tokens
LONG_CONTEXT = "the city " * 100  # 200 tokens


def test_question_longer_than_window_raises_value_error(ours):
    with pytest.raises(ValueError, match=r"question 0 has 100 tokens.*max_seq_len=64"):
        ours.encode_windows([LONG_QUESTION], ["the city"], 64, 16)
    with pytest.raises(ValueError, match=r"question 0 has 100 tokens"):
        ours.encode_windows([LONG_QUESTION], [LONG_CONTEXT], 64, 16)


def test_question_leaving_at_most_doc_stride_room_raises(ours):
    # 110 - 100 - 3 = 7 context tokens per window: fine for doc_stride 6, not for 7.
    windows = ours.encode_windows([LONG_QUESTION], [LONG_CONTEXT], 110, 6)[0]
    assert len(windows) > 100
    assert_windows_tile_context(ours, LONG_QUESTION, LONG_CONTEXT, 110, 6)
    with pytest.raises(ValueError, match=r"leaves 7 context tokens.*doc_stride=7"):
        ours.encode_windows([LONG_QUESTION], [LONG_CONTEXT], 110, 7)


def test_bad_question_is_named_by_its_index(ours):
    with pytest.raises(ValueError, match=r"question 2 has 100 tokens"):
        ours.encode_windows(["ok?", "fine?", LONG_QUESTION], ["a b", "c d", LONG_CONTEXT], 64, 16)


def test_long_question_with_context_fitting_one_window_works(ours):
    (window,) = ours.encode_windows([LONG_QUESTION], ["the city"], 384, 128)[0]
    assert len(window.ids) == 100 + 2 + 3
    (window,) = ours.encode_windows([LONG_QUESTION], ["the city"], 105, 100)[0]  # exactly full
    assert context_offsets(window) == [(0, 3), (4, 8)]


def test_question_with_more_tokens_than_characters_raises_value_error(tmp_path):
    """Lowercasing decomposes a Hangul syllable into two jamo, each a token: the question has more
    tokens than characters, and must still be refused with ValueError rather than a Rust panic."""
    jamo = unicodedata.normalize("NFD", "가")
    vocab = [*SPECIAL_TOKENS, jamo[0], jamo[1], "##" + jamo[0], "##" + jamo[1], "a", "##a"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = QuestionContextTokenizer(build_wordpiece_tokenizer(tmp_path / "vocab.txt", lowercase=True))
    question = "가" * 20  # 20 characters, 40 tokens
    assert question_tokens(tokenizer, question) == 40
    for max_seq_len, doc_stride in ((53, 10), (32, 8)):
        with pytest.raises(ValueError, match="question 0 has 40 tokens"):
            tokenizer.encode_windows([question], ["a " * 200], max_seq_len, doc_stride)
    assert len(tokenizer.encode_windows([question], ["a " * 200], 60, 8)[0]) > 1


def test_the_real_vocabulary_fits_a_model_of_its_size(ours):
    assert ours.fit_problems(ours.id_count, ours.pad_token_id) == []
    assert ours.fit_problems(ours.id_count + 64, ours.pad_token_id) == []  # a padded embedding table is fine


def test_misfits_are_named(ours, tmp_path):
    (bigger,) = ours.fit_problems(ours.id_count - 1, ours.pad_token_id)
    assert f"ids up to {ours.id_count - 1}" in bigger and f"{ours.id_count - 1} rows" in bigger
    (pad,) = ours.fit_problems(ours.id_count, ours.pad_token_id + 1)
    assert f"[PAD] is id {ours.pad_token_id} but the model's pad_token_id is {ours.pad_token_id + 1}" in pad
    stub_vocab = tmp_path / "vocab.txt"
    stub_vocab.write_text("".join(f"{token}\n" for token in SPECIAL_TOKENS), encoding="utf-8")
    stub = QuestionContextTokenizer(build_wordpiece_tokenizer(stub_vocab))
    (unknown,) = stub.fit_problems(28996, 0)
    assert "as [UNK]" in unknown and "5 ids for an embedding table of 28996" in unknown
    assert stub.fit_problems(5, 0) == []  # a vocabulary of the model's own size is taken as meant


def test_a_tokenizer_without_required_special_tokens_is_named(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    bare = QuestionContextTokenizer(Tokenizer(WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]")))
    assert any("lacks the special token(s) [CLS], [SEP], [PAD]" in problem for problem in bare.fit_problems(2, 0))
