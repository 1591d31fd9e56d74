"""BERT WordPiece tokenization of (question, context) pairs into overlapping windows.

Uses the ``tokenizers`` library, the same Rust code behind transformers' fast tokenizers, so the
windows, offsets and word ids are exactly those the transformers pipeline saw.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Encoding, Tokenizer, decoders
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import TemplateProcessing

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Tokens a model's tokenizer must have, and a sentence any vocabulary for English text reads without [UNK].
REQUIRED_TOKENS = ("[CLS]", "[SEP]", "[PAD]")
PROBE_TEXT = "The university was founded in Paris in 1998, and 42 students study there today."
CONFIGURED_COPIES = 8  # window settings kept configured at once (one tokenizer copy each, ~30 ms to make)


def build_wordpiece_tokenizer(vocab_file: str | os.PathLike, lowercase: bool = False) -> Tokenizer:
    """The BERT tokenizer for a ``vocab.txt`` (one token a line, id = line number), built as
    transformers builds ``BertTokenizerFast`` from the same file."""
    lines = Path(vocab_file).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last token, it starts no new one
    vocab = {token: index for index, token in enumerate(lines)}
    if missing := [token for token in SPECIAL_TOKENS if token not in vocab]:
        raise ValueError(f"{vocab_file} lacks the special token(s) {', '.join(missing)}")
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = BertPreTokenizer()
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def write_tokenizer_files(directory: str | os.PathLike, vocab_file: str | os.PathLike, lowercase: bool = False) -> None:
    """Give a checkpoint folder the tokenizer files the published one has: ``vocab.txt``,
    ``tokenizer_config.json`` and ``tokenizer.json``, built from ``vocab_file``."""
    directory = Path(directory)
    vocab = Path(vocab_file).read_bytes()
    (directory / "vocab.txt").write_bytes(vocab)
    config = {"do_lower_case": lowercase, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    build_wordpiece_tokenizer(directory / "vocab.txt", lowercase).save(str(directory / "tokenizer.json"))


@dataclass
class QuestionContextTokenizer:
    """Splits (question, context) pairs into model windows: ``[CLS] question [SEP] context [SEP]``.

    Only the context is cut; consecutive windows of one context share ``doc_stride`` tokens, which
    is the meaning of ``stride`` in tokenizers and in the transformers pipeline.

    Safe to share between threads: ``tokenizer`` is never reconfigured. Each (max_seq_len,
    doc_stride) is encoded by a private copy configured once for it (the truncation settings of a
    ``tokenizers.Tokenizer`` are state of the object, so one shared object would let two threads
    window each other's pairs). Treat ``tokenizer`` as read-only after the first call: copies are
    made from it then.
    """

    tokenizer: Tokenizer
    model_max_length: int = 512
    _copies: OrderedDict[tuple[int, int] | None, Tokenizer] = field(
        default_factory=OrderedDict, init=False, repr=False, compare=False
    )
    _copies_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> QuestionContextTokenizer:
        """Load ``tokenizer.json``, or build the tokenizer from ``vocab.txt`` and
        ``tokenizer_config.json`` (``do_lower_case``, default true as in BERT)."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        if (directory / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "vocab.txt").exists():
            tokenizer = build_wordpiece_tokenizer(directory / "vocab.txt", config.get("do_lower_case", True))
        else:
            raise FileNotFoundError(
                f"{directory} has no tokenizer: it needs tokenizer.json, or vocab.txt (+ tokenizer_config.json)"
            )
        return cls(tokenizer, int(config.get("model_max_length", 512)))

    @property
    def id_count(self) -> int:
        """One more than the largest token id: the embedding rows the tokenizer's ids need."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def fit_problems(self, vocab_size: int, pad_token_id: int) -> list[str]:
        """Why this tokenizer cannot feed a model whose embedding table has ``vocab_size`` rows and
        whose padding id is ``pad_token_id``, one sentence each; empty when it fits. Checked: ids
        beyond the table, missing or disagreeing special tokens, and a vocabulary that reads plain
        English as [UNK] while the model has embeddings for more ids than it has (another model's
        tokenizer, or a stub; a small vocabulary of the model's own size is taken as meant)."""
        problems = []
        if self.id_count > vocab_size:
            problems.append(
                f"the tokenizer has ids up to {self.id_count - 1} but the model's embedding table has "
                f"{vocab_size} rows (vocab_size): ids from {vocab_size} on cannot be embedded"
            )
        if missing := [token for token in REQUIRED_TOKENS if self.tokenizer.token_to_id(token) is None]:
            problems.append(f"the tokenizer lacks the special token(s) {', '.join(missing)}")
        pad = self.tokenizer.token_to_id("[PAD]")
        if pad is not None and pad != pad_token_id:
            problems.append(f"the tokenizer's [PAD] is id {pad} but the model's pad_token_id is {pad_token_id}")
        unk = self.tokenizer.token_to_id("[UNK]")
        ids = self.tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids
        if self.id_count < vocab_size and unk is not None and 2 * ids.count(unk) > len(ids):
            problems.append(
                f"the tokenizer reads {ids.count(unk)} of the {len(ids)} tokens of a plain English sentence as "
                f"[UNK] ({self.id_count} ids for an embedding table of {vocab_size}): it is not this model's vocabulary"
            )
        return problems

    @property
    def cls_token_id(self) -> int:
        return self.tokenizer.token_to_id("[CLS]")

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.token_to_id("[PAD]")

    def encode_windows(
        self,
        questions: Sequence[str],
        contexts: Sequence[str],
        max_seq_len: int,
        doc_stride: int,
        first_index: int = 0,
    ) -> list[list[Encoding]]:
        """For each pair, its windows in context order. Each ``Encoding`` keeps ids, character
        offsets, sequence ids (0 question, 1 context) and word ids of every token. Errors name a
        pair by its position plus ``first_index``."""
        self._check_room_for_context(questions, contexts, max_seq_len, doc_stride, first_index)
        encodings = self._configured((max_seq_len, doc_stride)).encode_batch(list(zip(questions, contexts)))
        return [[encoding, *encoding.overflowing] for encoding in encodings]

    def _configured(self, windows: tuple[int, int] | None) -> Tokenizer:
        """A private copy of ``tokenizer`` without padding and with truncation to windows of
        (max_seq_len, doc_stride), or with no truncation for ``None``; made once, then reused. The
        lock guards only the cache: encoding runs outside it, on a copy no other setting touches."""
        with self._copies_lock:
            configured = self._copies.get(windows)
            if configured is None:
                configured = copy.deepcopy(self.tokenizer)
                configured.no_padding()
                if windows is None:
                    configured.no_truncation()
                else:
                    configured.enable_truncation(windows[0], stride=windows[1], strategy="only_second")
                self._copies[windows] = configured
                if len(self._copies) > CONFIGURED_COPIES:
                    self._copies.popitem(last=False)  # least recently used
            else:
                self._copies.move_to_end(windows)
            return configured

    def __getstate__(self) -> dict:
        """Pickles (for worker processes) without the lock and the copies, which are rebuilt on use."""
        return {"tokenizer": self.tokenizer, "model_max_length": self.model_max_length}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _check_room_for_context(
        self, questions: Sequence[str], contexts: Sequence[str], max_seq_len: int, doc_stride: int, first_index: int
    ) -> None:
        """Raise ``ValueError`` for a pair whose context must be cut into windows but whose question
        leaves no more than ``doc_stride`` context tokens per window (tokenizers would panic)."""
        # A token covers at least one character of the *normalized* text (lowercasing can decompose one
        # character into several tokens), so a question shorter than this always leaves room.
        normalize = self.tokenizer.normalizer.normalize_str if self.tokenizer.normalizer is not None else str
        risky = [i for i, question in enumerate(questions) if len(normalize(question)) + 3 + doc_stride >= max_seq_len]
        if not risky:
            return
        whole = self._configured(None)
        for i in risky:
            question_tokens = len(whole.encode(questions[i], add_special_tokens=False).ids)
            room = max(max_seq_len - question_tokens - 3, 0)  # [CLS] question [SEP] context [SEP]
            if room > doc_stride or len(whole.encode(questions[i], contexts[i]).ids) <= max_seq_len:
                continue
            raise ValueError(
                f"question {first_index + i} has {question_tokens} tokens, which leaves {room} context tokens "
                f"per window of max_seq_len={max_seq_len}, but its context needs several windows that overlap by "
                f"doc_stride={doc_stride} tokens: shorten the question, or raise max_seq_len / lower doc_stride"
            )
