"""Finding, reading, checking and writing checkpoints (safetensors only; nothing is ever unpickled).

A checkpoint is a folder holding ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), as transformers writes it. Where a hub repo id's folder is found
(the Hugging Face cache, ``weights/``, a download) is :mod:`distilqa.hub`'s business.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from distilqa.attention import AttentionFunction
from distilqa.config import DistilBertConfig
from distilqa.hardware import resolve_device, resolve_dtype

# Re-exported: finding checkpoints lives in distilqa.hub (torch-free, so the CLI starts fast).
from distilqa.hub import (  # noqa: F401
    CONFIG_FILE,
    DEFAULT_REPO_ID,
    DOWNLOAD_FILES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX_FILE,
    TOKENIZER_FILES,
    CheckpointError,
    WeightsNotFoundError,
    download,
    resolve_checkpoint,
    weights_dir,
)
from distilqa.tokenization import QuestionContextTokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# How keys found in checkpoints map onto this model's names (which are the published ones).
# Checkpoints of the bare encoder (DistilBertModel) have no "distilbert." prefix; checkpoints
# converted from TensorFlow-era code name LayerNorm parameters gamma and beta.
KEY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"\.gamma$", ".weight"),
    (r"\.beta$", ".bias"),
    (r"^(?!distilbert\.|qa_outputs\.)", "distilbert."),
)
# Keys that carry no weights: a buffer older transformers releases stored.
IGNORED_KEYS = re.compile(r"(^|\.)position_ids$")


def read_state_dict(directory: Path) -> dict[str, Tensor]:
    """All tensors of the safetensors file(s) in ``directory``, keys as stored."""
    single, index = directory / SAFETENSORS_FILE, directory / SAFETENSORS_INDEX_FILE
    if single.exists():
        return _read_safetensors(single)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index} is not a valid safetensors index ({error})") from None
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_safetensors(directory / shard))
        if missing := sorted(set(weight_map) - set(state)):
            raise CheckpointError(f"{index} lists tensors that no shard holds: {', '.join(missing)}")
        return state
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle checkpoint(s) ({', '.join(pickles)}); distilqa never unpickles, "
            "because loading a pickle can run arbitrary code. Convert it once, where you trust the file:\n"
            '  python -c "import torch; from safetensors.torch import save_file; '
            f"save_file(torch.load('{directory / pickles[0]}', weights_only=True), "
            f"'{directory / SAFETENSORS_FILE}', metadata={{'format': 'pt'}})\""
        )
    raise CheckpointError(f"{directory} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX_FILE}")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, RuntimeError, ValueError) as error:  # not OSError: a permission error says so itself
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt: download it again"
        ) from None


def convert_state_dict(stored: dict[str, Tensor], expected: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """Rename stored keys to the model's (see KEY_RENAMES) and check that they match it exactly:
    every problem found (missing, unexpected, duplicated, wrong shape, not floating point) is
    reported at once, naming the keys."""
    converted: dict[str, Tensor] = {}
    problems: list[str] = []
    for key, tensor in stored.items():
        if IGNORED_KEYS.search(key):
            continue
        name = key
        for pattern, replacement in KEY_RENAMES:
            name = re.sub(pattern, replacement, name)
        if name in converted:
            problems.append(f"two stored keys map to {name!r} (one is {key!r})")
        converted[name] = tensor
    if missing := sorted(expected.keys() - converted.keys()):
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected := sorted(converted.keys() - expected.keys()):
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    for name in sorted(converted.keys() & expected.keys()):
        tensor, want = converted[name], expected[name]
        if tensor.shape != want.shape:
            problems.append(f"{name}: shape {tuple(tensor.shape)} in the checkpoint, {tuple(want.shape)} in the model")
        elif not tensor.dtype.is_floating_point:
            problems.append(f"{name}: dtype {tensor.dtype} is not a floating-point type")
    if problems:
        raise CheckpointError(f"{source} does not match DistilBertForQuestionAnswering:\n  " + "\n  ".join(problems))
    return converted


def checkpoint_config(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[Path, DistilBertConfig]:
    """The checkpoint's folder (:func:`resolve_checkpoint`) and the configuration in its config.json."""
    directory = resolve_checkpoint(name_or_path, revision)
    if not (directory / CONFIG_FILE).exists():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}")
    return directory, DistilBertConfig.from_json_file(directory / CONFIG_FILE)


def load_pretrained(
    model_class: type,
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | AttentionFunction = "sdpa",
    linear_backend: str = "aten",
):
    """Build ``model_class`` from a checkpoint, strictly: see :func:`convert_state_dict`. The model
    is returned in eval mode, in ``dtype`` (default float32, exact; bfloat16, float16, or "auto": a name
    as distilqa.hardware.resolve_dtype reads it) on ``device`` (default CPU), its linear layers on
    ``linear_backend`` ("aten", the default, reproduces transformers bit for bit)."""
    device = torch.device(device or "cpu")
    dtype = resolve_dtype(dtype, device)
    directory, config = checkpoint_config(name_or_path, revision)
    with torch.device("meta"):  # no time spent initialising weights the checkpoint replaces
        model = model_class(config, attn_implementation=attn_implementation)
    state = convert_state_dict(read_state_dict(directory), model.state_dict(), directory)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.set_linear_backend(linear_backend)
    return model


@dataclass
class Checkpoint:
    """A loaded checkpoint: its folder, the model (eval mode) and the tokenizer checked to fit it
    (None only from ``load_checkpoint(fit_tokenizer=False)`` on a folder without tokenizer files)."""

    directory: Path
    model: Any  # an instance of the model_class given to load_checkpoint
    tokenizer: QuestionContextTokenizer | None


def check_tokenizer(tokenizer: QuestionContextTokenizer, config: DistilBertConfig, source: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` when ``tokenizer`` cannot feed a model of ``config`` (see
    :meth:`QuestionContextTokenizer.fit_problems`), naming ``source``."""
    if problems := tokenizer.fit_problems(config.vocab_size, config.pad_token_id):
        raise CheckpointError(
            f"{os.fspath(source)}: the tokenizer does not fit the model: {'; '.join(problems)}. "
            "Put the model's own tokenizer files (tokenizer.json or vocab.txt) beside its weights"
        )


def load_checkpoint(
    model_class: type,
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | AttentionFunction = "sdpa",
    linear_backend: str = "aten",
    fit_tokenizer: bool = True,
) -> Checkpoint:
    """The one way to load a checkpoint with its tokenizer: find the folder (:func:`resolve_checkpoint`),
    check the device, read the tokenizer and check it fits the model's configuration, then build
    ``model_class.from_pretrained(folder, ...)``. Every problem is found before the weights are read.
    ``fit_tokenizer=False`` (``distilqa verify``, which reports misfits instead) skips the check and
    accepts a folder without tokenizer files (``tokenizer`` None)."""
    device = resolve_device(device)
    directory, config = checkpoint_config(name_or_path, revision)
    has_tokenizer = any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt"))
    tokenizer = QuestionContextTokenizer.from_pretrained(directory) if fit_tokenizer or has_tokenizer else None
    if fit_tokenizer:
        check_tokenizer(tokenizer, config, directory)
    model = model_class.from_pretrained(
        directory, device=device, dtype=dtype, attn_implementation=attn_implementation, linear_backend=linear_backend
    )
    return Checkpoint(directory, model, tokenizer)


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` in the layout transformers reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(directory / CONFIG_FILE)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, directory / SAFETENSORS_FILE, metadata={"format": "pt"})
