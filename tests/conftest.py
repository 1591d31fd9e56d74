"""Shared fixtures: checkpoints built by transformers itself (random weights), and tokenizer files.

The real checkpoint cannot be downloaded here, so the reference model is transformers'
``DistilBertForQuestionAnswering`` with random weights at the published configuration, saved
with safetensors. The real cased vocabulary is used when the shared data folder is present; otherwise
a WordPiece vocabulary trained at test time, so a fresh clone still runs every parity test.

The shared data folder (vocabulary, SQuAD v1.1 dev) is ``$DISTILQA_DATA`` when set, else
``../shared/data`` beside the repository. Tests that need it skip with a reason naming the path.

Fixture names mean one thing across the suite:
- ``published_checkpoint``: random weights at the published configuration (span probabilities ~1e-4,
  as random weights give); for logit-level comparisons.
- ``peaked_checkpoint``: the same, with a span head sharpened so that the best span has probability
  0.01-0.63 (median 0.21) like a trained model's; for answer and score comparisons, where flat scores
  would make every score check pass.
- ``tiny_checkpoint``: 1 layer of width 32; for the pipeline's mechanics.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from synthetic_qa import synthetic_task, trained_model  # noqa: F401 (session fixtures of test_train, test_heads)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SHARED_DATA = Path(os.environ.get("DISTILQA_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
VOCAB_FILE = SHARED_DATA / "vocab" / "bert-base-cased-vocab.txt"
SQUAD_FILE = SHARED_DATA / "squad" / "dev-v1.1.json.zip"
# The configuration of distilbert/distilbert-base-cased-distilled-squad.
PUBLISHED_CONFIG = dict(
    vocab_size=28996,
    dim=768,
    n_layers=6,
    n_heads=12,
    hidden_dim=3072,
    max_position_embeddings=512,
    sinusoidal_pos_embds=True,
    activation="gelu",
)


def save_reference_checkpoint(directory: Path, seed: int = 0, span_head_sharpness: float = 0.0, **overrides) -> Path:
    """A random transformers checkpoint (safetensors) at the published configuration with ``overrides``;
    ``span_head_sharpness`` > 0 sharpens its span head (see distilqa.testing.save_reference_checkpoint).
    Skips the calling test when transformers is not installed."""
    pytest.importorskip("transformers")
    from distilqa import DistilBertConfig
    from distilqa.testing import save_reference_checkpoint as save

    config = DistilBertConfig(**{**PUBLISHED_CONFIG, **overrides})
    return save(directory, config, seed, span_head_sharpness=span_head_sharpness)


def fallback_corpus(n_sentences: int = 3000) -> list[str]:
    """Deterministic English-like sentences to train a vocabulary when the real one is absent."""
    words = (  # noqa: SIM905 (a paragraph reads better than a list of 150 strings)
        "the of and to in a is was for on as with by he it at from his an were are which this be or "
        "has had not first one their its new after who they have her she two been other when there "
        "all during into school time may years more most only over city some world would where later "
        "up such used many can state about national out known university united then made through "
        "also century government between american before while war north south river called three "
        "since team year part de however being well these people against both family Paris London "
        "Denver Broncos Super Bowl Normandy Victoria Warsaw Amazon forest Tesla energy water force "
        "oxygen computer science economic inequality Newcastle Harvard Luther "
    ).split()
    rng = random.Random(0)
    sentences = []
    for _ in range(n_sentences):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
        sentences.append(sentence.capitalize() + rng.choice([".", "?", "!", ", 1998.", " (2010)."]))
    return sentences


def write_vocab(path: Path) -> Path:
    """The real cased vocabulary when present, else one trained on :func:`fallback_corpus`."""
    if VOCAB_FILE.exists():
        path.write_bytes(VOCAB_FILE.read_bytes())
        return path
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from tokenizers.trainers import WordPieceTrainer

    from distilqa.tokenization import SPECIAL_TOKENS

    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = BertNormalizer(lowercase=False, strip_accents=None)
    tokenizer.pre_tokenizer = BertPreTokenizer()
    trainer = WordPieceTrainer(vocab_size=3000, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(fallback_corpus(), trainer)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    path.write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
    return path


def write_tokenizer_files(directory: Path) -> Path:
    """vocab.txt, tokenizer_config.json (cased) and tokenizer.json, as the published checkpoint has.

    tokenizer.json is written by transformers (its BertTokenizer built from vocab.txt), not by
    distilqa: the tokenizer the tests compare against is then the reference's own, not a copy of
    ours. Without transformers, distilqa's writer is the fallback (no parity test runs then)."""
    vocab = write_vocab(directory / "vocab.txt")
    try:
        import transformers
    except ImportError:
        from distilqa.tokenization import write_tokenizer_files as write

        write(directory, vocab, lowercase=False)
        return directory
    config = {"do_lower_case": False, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    transformers.AutoTokenizer.from_pretrained(directory).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def auto_linear_backend_is_aten():
    """The "auto" GEMM backend is whichever library a quick measurement finds faster: on a machine busy
    with other work that choice (and so which code path a test runs, and its last-digit rounding) could
    change from run to run. In tests the measurement is a tie, so "auto" is PyTorch's default, "aten";
    tests of the oneDNN path ask for it by name. The "auto" attention core likewise runs "sdpa".
    (Commands run in subprocesses still measure.)"""
    from distilqa import attention, linear

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear, "gemm_throughput", lambda *args, **kwargs: dict.fromkeys(linear.LINEAR_BACKENDS, 1.0))
        patch.setattr(attention, "fastest_cpu_attention", lambda *args, **kwargs: "sdpa")
        linear.fastest_linear_backend.cache_clear()
        yield
    linear.fastest_linear_backend.cache_clear()


@pytest.fixture(scope="session")
def published_checkpoint(tmp_path_factory) -> Path:
    """A random checkpoint at the published configuration saved by transformers, plus tokenizer files:
    config.json, model.safetensors, vocab.txt, tokenizer_config.json, tokenizer.json."""
    return write_tokenizer_files(save_reference_checkpoint(tmp_path_factory.mktemp("published")))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint (1 layer of width 32) with the same tokenizer files: for tests of the
    pipeline's mechanics, where the model's size does not matter and speed does."""
    directory = save_reference_checkpoint(tmp_path_factory.mktemp("tiny"), dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    return write_tokenizer_files(directory)


# A trained model's best span has probability ~0.1-0.9; random weights give ~1e-4 (the start and end
# logits are nearly flat and uncorrelated). This sharpness gives a best span of probability 0.013 to
# 0.63 (median 0.21) on the 544 SQuAD pairs of test_pipeline_parity, measured; see
# distilqa.testing.save_reference_checkpoint.
PEAKED_SPAN_HEAD = 20.0


@pytest.fixture(scope="session")
def peaked_checkpoint(tmp_path_factory) -> Path:
    """Random weights at the published configuration with a sharpened span head: span scores look like
    a trained model's, so score tolerances and near ties mean something. Same tokenizer files."""
    directory = save_reference_checkpoint(tmp_path_factory.mktemp("peaked"), span_head_sharpness=PEAKED_SPAN_HEAD)
    return write_tokenizer_files(directory)


def pytest_report_header(config) -> str:
    """The versions this run tested (pyproject.toml's lower bounds are the oldest ones run)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "safetensors", "numpy"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} absent")
    return "distilqa tested with: " + ", ".join(found)
