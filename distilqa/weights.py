"""Finding, reading, checking and writing checkpoints (safetensors only; nothing is ever unpickled).

A checkpoint is a folder holding ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), as transformers writes it. A hub repo id is downloaded with
huggingface_hub into ``weights/<repo id>/`` first.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from distilqa.attention import AttentionFunction
from distilqa.config import DistilBertConfig

DEFAULT_REPO_ID = "distilbert/distilbert-base-cased-distilled-squad"
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
DOWNLOAD_FILES = (CONFIG_FILE, SAFETENSORS_FILE, *TOKENIZER_FILES)
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


class CheckpointError(ValueError):
    """The files exist but are not a loadable DistilBERT question-answering checkpoint."""


class WeightsNotFoundError(FileNotFoundError):
    """No checkpoint where one was asked for, and it could not be downloaded."""


def weights_dir() -> Path:
    """Where downloaded checkpoints live: $DISTILQA_WEIGHTS_DIR, else the project's ``weights/``
    folder in a source checkout, else ``./weights``."""
    if "DISTILQA_WEIGHTS_DIR" in os.environ:
        return Path(os.environ["DISTILQA_WEIGHTS_DIR"]).expanduser()
    project_weights = Path(__file__).resolve().parents[1] / "weights"
    return project_weights if (project_weights / "README.md").exists() else Path("weights").resolve()


def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith(".")


def download(repo_id: str = DEFAULT_REPO_ID, revision: str | None = None) -> Path:
    """Download a checkpoint's files from the hub into ``weights/<repo_id>/`` and return that folder."""
    from huggingface_hub import snapshot_download

    target = weights_dir() / repo_id
    try:
        snapshot_download(repo_id, revision=revision, local_dir=target, allow_patterns=list(DOWNLOAD_FILES))
    except Exception as error:
        raise WeightsNotFoundError(
            f"could not download {repo_id!r}{f' at revision {revision}' if revision else ''} from the "
            f"Hugging Face hub ({type(error).__name__}: {str(error).splitlines()[0]}).\n"
            f"On a machine with network access run `distilqa download {repo_id}`, or put the files "
            f"{', '.join(DOWNLOAD_FILES)} into {target}/ by hand."
        ) from None
    if not (target / SAFETENSORS_FILE).exists() and not (target / SAFETENSORS_INDEX_FILE).exists():
        raise WeightsNotFoundError(f"{repo_id!r} has no {SAFETENSORS_FILE}; distilqa loads safetensors only")
    return target


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A checkpoint folder for a local path or a hub repo id (using ``weights/`` before the network)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds {CONFIG_FILE} and {SAFETENSORS_FILE}")
    name = str(name_or_path)
    if not _looks_like_repo_id(name):
        raise WeightsNotFoundError(f"no checkpoint folder at {path}")
    local = weights_dir() / name
    if revision is None and (local / CONFIG_FILE).exists():
        return local
    return download(name, revision)


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
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
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


def load_pretrained(
    model_class: type,
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | AttentionFunction = "sdpa",
):
    """Build ``model_class`` from a checkpoint, strictly: see :func:`convert_state_dict`. The model
    is returned in eval mode, in ``dtype`` (default float32) on ``device`` (default CPU)."""
    directory = resolve_checkpoint(name_or_path, revision)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}")
    config = DistilBertConfig.from_json_file(config_path)
    with torch.device("meta"):  # no time spent initialising weights the checkpoint replaces
        model = model_class(config, attn_implementation=attn_implementation)
    state = convert_state_dict(read_state_dict(directory), model.state_dict(), directory)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` in the layout transformers reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(directory / CONFIG_FILE)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, directory / SAFETENSORS_FILE, metadata={"format": "pt"})
