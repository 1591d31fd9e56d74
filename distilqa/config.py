"""The model's configuration, with the field names of the checkpoint's ``config.json``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from distilqa.validate import positive_int

ACTIVATIONS = ("gelu", "relu")


@dataclass
class DistilBertConfig:
    """Hyper-parameters of DistilBERT; the defaults are those of the published checkpoint
    ``distilbert/distilbert-base-cased-distilled-squad``."""

    vocab_size: int = 28996
    dim: int = 768  # width of every hidden state
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072  # width of the feed-forward layer
    max_position_embeddings: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.1
    qa_dropout: float = 0.1
    activation: str = "gelu"  # "gelu" is the exact erf GELU
    sinusoidal_pos_embds: bool = True  # only initialises a fresh model; a checkpoint's table wins
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # Heads removed by prune_heads, numbered as in the unpruned layer: {layer: [heads]}. config.json
    # stores the layers as string keys, as transformers v4 did.
    pruned_heads: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.pruned_heads, dict):  # JSON object keys are strings: "0" -> 0
            self.pruned_heads = {
                _as_int(layer): sorted(heads) if isinstance(heads, (list, tuple, set)) else heads
                for layer, heads in self.pruned_heads.items()
            }
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_position_embeddings"):
            positive_int(f"config: {name}", getattr(self, name))
        if self.dim % self.n_heads != 0:
            raise ValueError(
                f"config: dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                "so that every head has the same width"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"config: unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        for name in ("dropout", "attention_dropout", "qa_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"config: {name} must be a probability in [0, 1), got {value!r}")
        if (
            isinstance(self.pad_token_id, bool)
            or not isinstance(self.pad_token_id, int)
            or not 0 <= self.pad_token_id < self.vocab_size
        ):
            raise ValueError(
                f"config: pad_token_id must be an id in [0, vocab_size={self.vocab_size}), got {self.pad_token_id!r}"
            )
        self._validate_pruned_heads()

    def _validate_pruned_heads(self) -> None:
        if not isinstance(self.pruned_heads, dict):
            raise ValueError(f"config: pruned_heads must map layers to lists of heads, got {self.pruned_heads!r}")
        for layer, heads in self.pruned_heads.items():
            if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
                raise ValueError(f"config: pruned_heads names layer {layer!r}; layers are 0..{self.n_layers - 1}")
            if not isinstance(heads, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) and 0 <= h < self.n_heads for h in heads
            ):
                raise ValueError(
                    f"config: pruned_heads[{layer}] must be a list of heads in 0..{self.n_heads - 1}, got {heads!r}"
                )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistilBertConfig:
        """Build from a ``config.json`` dictionary; keys this model does not use are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> DistilBertConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content, with the fields transformers needs to load it too."""
        values = asdict(self)
        values["pruned_heads"] = {str(layer): heads for layer, heads in sorted(self.pruned_heads.items())}
        return {"architectures": ["DistilBertForQuestionAnswering"], "model_type": "distilbert", **values}

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _as_int(value: object) -> object:
    """A JSON key such as "3" as the int 3; anything else unchanged, for validate() to report."""
    return int(value) if isinstance(value, str) and value.isdigit() else value
