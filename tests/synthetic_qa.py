"""A generated extractive question-answering task, small enough to learn on a CPU in a minute.

Each context describes a few made-up countries, each with a capital, a founder and a founding
year, in shuffled order and with varied templates; each question asks for one fact. Every other
fact in the context is a distractor: the same relation of another country, or another relation
of the same country (founder and year both follow "founded"). Names are made of two-letter
syllables ("Tovira" = "To ##vi ##ra"), so the held-out split can use new countries, capitals,
founders and years whose every token was still seen in training: the model must read the
question and copy from the context, not recall names.

Files are written in SQuAD v1.1 format; the vocabulary holds exactly the task's tokens.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = [c + v for c in CONSONANTS for v in VOWELS]  # 70
# relation: (value kind, fact template, question templates). Relations of one kind are each other's
# distractors: a context names several places, people and years of its country. Questions
# paraphrase the facts (no relation word is shared), as SQuAD's questions often do.
RELATIONS = {
    "capital": (
        "place",
        "{e} has the capital {v}.",
        ("Which town governs {e}?", "Where does the government of {e} sit?"),
    ),
    "largest": (
        "place",
        "{e} has the largest city {v}.",
        ("What is the biggest town in {e}?", "Where do most people of {e} live?"),
    ),
    "port": ("place", "{e} has the main port {v}.", ("Where do ships dock in {e}?", "Which harbour serves {e}?")),
    "founder": ("person", "{e} was founded by {v}.", ("Who created {e}?", "Who established {e}?")),
    "king": ("person", "{e} had the first king {v}.", ("Who ruled {e} first?", "Who was the earliest ruler of {e}?")),
    "founded": ("year", "{e} was founded in {v}.", ("When was {e} created?", "In which year was {e} established?")),
    "independent": ("year", "{e} is independent since {v}.", ("Since when is {e} free?", "When did {e} gain freedom?")),
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def vocabulary() -> list[str]:
    """Special tokens, the templates' words and punctuation, syllables (word-initial and ``##``), digits."""
    words = set()
    for _, fact, questions in RELATIONS.values():
        for template in (fact, *questions):
            text = template.replace("{e}", " ").replace("{v}", " ")
            words.update(text.replace(".", " . ").replace("?", " ? ").replace(",", " , ").split())
    syllables = [s.capitalize() for s in SYLLABLES] + [f"##{s}" for s in SYLLABLES]
    digits = [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]
    return [*SPECIAL_TOKENS, *sorted(words), *syllables, *digits]


def write_vocab(path: Path) -> Path:
    path.write_text("".join(token + "\n" for token in vocabulary()), encoding="utf-8")
    return path


def random_name(rng: random.Random, kind: str) -> str:
    """A country or place (two syllables: "Tovi"), a person (two such words) or a year."""
    if kind == "year":
        return str(rng.randint(1000, 1999))
    if kind == "person":
        return f"{random_name(rng, 'place')} {random_name(rng, 'place')}"
    return (rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize()


def make_split(rng: random.Random, draw, n_contexts: int, prefix: str) -> dict:
    """SQuAD v1.1 ``data`` of ``n_contexts`` paragraphs about one country each, with 5 of the 7
    facts in random order, and one or two questions each. ``draw(kind)`` gives a name."""
    paragraphs = []
    for index in range(n_contexts):
        country = draw("country")
        relations = rng.sample(list(RELATIONS), 5)
        values: dict[str, str] = {}
        for relation in relations:  # distinct values, so every answer is unambiguous
            while (value := draw(RELATIONS[relation][0])) in values.values() or value == country:
                pass
            values[relation] = value
        context, starts = "", {}
        for relation in relations:
            before, after = RELATIONS[relation][1].replace("{e}", country).split("{v}")
            context += (" " if context else "") + before
            starts[relation] = len(context)
            context += values[relation] + after
        qas = []
        for q, relation in enumerate(rng.sample(relations, rng.choice((1, 2)))):
            qas.append(
                {
                    "id": f"{prefix}-{index}-{q}",
                    "question": rng.choice(RELATIONS[relation][2]).format(e=country),
                    "answers": [{"text": values[relation], "answer_start": starts[relation]}],
                }
            )
        paragraphs.append({"context": context, "qas": qas})
    return {"version": "1.1", "data": [{"title": prefix, "paragraphs": paragraphs}]}


def write_task(directory: Path, n_train: int = 3000, n_heldout: int = 150, seed: int = 0) -> dict[str, Path]:
    """Write ``train.json`` and ``heldout.json`` (SQuAD v1.1) and ``vocab.txt``; return their paths.
    Held-out countries, places, people and years are drawn first and never used in training."""
    rng = random.Random(seed)
    heldout: dict[str, list[str]] = {}
    for kind in ("country", "place", "person", "year"):
        heldout[kind] = []
        while len(heldout[kind]) < 40:
            if (name := random_name(rng, kind)) not in heldout[kind]:
                heldout[kind].append(name)
    taken = {name for names in heldout.values() for name in names}
    taken |= {word for name in heldout["person"] for word in name.split()}

    def fresh(kind: str) -> str:
        while (name := random_name(rng, kind)) in taken or any(word in taken for word in name.split()):
            pass
        return name

    directory.mkdir(parents=True, exist_ok=True)
    paths = {"train": directory / "train.json", "heldout": directory / "heldout.json"}
    for split, draw, count in (
        ("heldout", lambda kind: rng.choice(heldout[kind]), n_heldout),
        ("train", fresh, n_train),
    ):
        paths[split].write_text(json.dumps(make_split(rng, draw, count, split), indent=1), encoding="utf-8")
    paths["vocab"] = write_vocab(directory / "vocab.txt")
    return paths


# --------------------------------------------------------------------------- #
# The trained test model, shared by test_train.py and test_heads.py (imported by conftest.py)
# --------------------------------------------------------------------------- #

# A small DistilBERT that learns the task from scratch in about 570 steps: 4 layers of width 128 and
# 4 heads. Dropout is off (the task has endless fresh names, nothing to overfit), a wider initial
# spread (0.1) than BERT's 0.02 suits the small width, and the positions start as a sinusoidal table
# scaled to the word embeddings' size, so relative offsets are easy to learn.
TASK_CONFIG = dict(
    dim=128,
    n_layers=4,
    n_heads=4,
    hidden_dim=256,
    max_position_embeddings=128,
    dropout=0.0,
    attention_dropout=0.0,
    qa_dropout=0.0,
    sinusoidal_pos_embds=False,
    initializer_range=0.1,
)
MAX_SEQ_LEN, DOC_STRIDE = 128, 64
TRAIN_ARGS = ["--max-seq-len", str(MAX_SEQ_LEN), "--doc-stride", str(DOC_STRIDE), "--batch-size", "32"]


def write_initial_checkpoint(directory: Path, vocab_file: Path, seed: int = 0, **overrides) -> Path:
    """A folder with config.json, freshly initialised weights and tokenizer files (model_max_length
    = the model's positions, so the pipeline's default windows fit)."""
    from distilqa import DistilBertConfig, DistilBertForQuestionAnswering
    from distilqa.model import sinusoidal_position_table
    from distilqa.tokenization import write_tokenizer_files

    config = DistilBertConfig(vocab_size=len(vocabulary()), **{**TASK_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = DistilBertForQuestionAnswering(config)
    table = sinusoidal_position_table(config.max_position_embeddings, config.dim)
    model.distilbert.embeddings.position_embeddings.weight.data.copy_(0.3 * table)
    model.save_pretrained(directory)
    write_tokenizer_files(directory, vocab_file, lowercase=False)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["model_max_length"] = config.max_position_embeddings
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return directory


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Train on one thread: on a shared 2-core machine two threads per process oversubscribe the
    cores and a step gets many times slower, while one thread loses little at this size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory) -> dict[str, Path]:
    """train.json (3000 contexts), heldout.json (150 contexts, other names) and vocab.txt."""
    return write_task(tmp_path_factory.mktemp("synthetic_qa"))


@pytest.fixture(scope="session")
def trained_model(synthetic_task, tmp_path_factory) -> Path:
    """The output folder of ``distilqa train`` on the task, from random initialisation (4 epochs)."""
    from distilqa.cli import main

    root = tmp_path_factory.mktemp("trained")
    initial = write_initial_checkpoint(root / "initial", synthetic_task["vocab"])
    output = root / "run"
    arguments = ["train", "--model", str(initial), "--data", str(synthetic_task["train"]), "--output", str(output)]
    arguments += ["--epochs", "4", "--learning-rate", "2e-3", "--seed", "0", *TRAIN_ARGS]
    arguments += ["--eval-data", str(synthetic_task["heldout"]), "--eval-every", "200"]
    with single_threaded():
        assert main(arguments) == 0
    return output
