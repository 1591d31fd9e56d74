"""Where a checkpoint's files are: a folder, the Hugging Face cache, ``weights/``, or the hub.

A model name (hub repo id) resolves, in this order, to
1. its snapshot in a Hugging Face cache: the ``cache_dir`` argument (``distilqa download --cache-dir``), then
   ``$DISTILQA_HOME``, then huggingface_hub's own cache (``$HF_HUB_CACHE``, default
   ``~/.cache/huggingface/hub``), where transformers and ``hf download`` keep their files;
2. ``weights/<repo id>/`` of a source checkout (or ``$DISTILQA_WEIGHTS_DIR/<repo id>/``), when no
   revision is asked for;
3. a download into the first of those caches that is set (the default one otherwise).

The same for editable and wheel installs. Nothing here imports torch: ``distilqa --help`` stays fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_REPO_ID = "distilbert/distilbert-base-cased-distilled-squad"
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
DOWNLOAD_FILES = (CONFIG_FILE, SAFETENSORS_FILE, *TOKENIZER_FILES)
# What a download fetches: the files above and the shards of a sharded checkpoint (never pickles).
DOWNLOAD_PATTERNS = (*DOWNLOAD_FILES, SAFETENSORS_INDEX_FILE, "model-*.safetensors")
HOME_VARIABLE = "DISTILQA_HOME"


class CheckpointError(ValueError):
    """The files exist but are not a loadable DistilBERT question-answering checkpoint."""


class WeightsNotFoundError(FileNotFoundError):
    """No checkpoint where one was asked for, and it could not be downloaded."""


def weights_dir() -> Path:
    """The ``weights/`` folder of a source checkout, or ``$DISTILQA_WEIGHTS_DIR``: checkpoints kept by
    hand as ``<folder>/<repo id>/``. Looked in only when it exists (a wheel install has none)."""
    if "DISTILQA_WEIGHTS_DIR" in os.environ:
        return Path(os.environ["DISTILQA_WEIGHTS_DIR"]).expanduser()
    return Path(__file__).resolve().parents[1] / "weights"


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face cache that downloads go to: ``cache_dir``, else ``$DISTILQA_HOME``, else
    huggingface_hub's own (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(HOME_VARIABLE):
        return Path(os.environ[HOME_VARIABLE]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _caches_to_search(cache_dir: str | os.PathLike | None) -> list[Path]:
    """The caches looked in, in order and without repeats: the download cache, then huggingface_hub's."""
    from huggingface_hub import constants

    caches = [hub_cache_dir(cache_dir), hub_cache_dir(None), Path(constants.HF_HUB_CACHE)]
    return list(dict.fromkeys(path.resolve() for path in caches))


def _missing_files(directory: Path) -> list[str]:
    """What a checkpoint folder lacks for distilqa: config, safetensors weights, a tokenizer."""
    missing = [CONFIG_FILE] if not (directory / CONFIG_FILE).is_file() else []
    if not any((directory / name).is_file() for name in (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE)):
        missing.append(SAFETENSORS_FILE)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        missing.append("tokenizer.json or vocab.txt")
    return missing


def _hub_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "the hub could not be reached, or refused": offline, no network, no such
    repo or revision, an invalid repo id. Never a local failure such as a full disk or a permission."""
    from huggingface_hub import errors

    # huggingface_hub's HTTP errors derive from its HTTP library's base error (httpx's in 1.x, httpx2's in
    # 2.x), which is also what a connection that drops in the middle of a download raises.
    transport = tuple(base for base in errors.HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError")
    return (
        errors.LocalEntryNotFoundError,
        errors.OfflineModeIsEnabled,
        errors.HfHubHTTPError,
        errors.HFValidationError,
        *transport,
    )


def find_local_checkpoint(
    repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> tuple[Path | None, list[str]]:
    """The folder of ``repo_id`` already on this machine (see the module docstring for the order),
    without any network access, and one line per place looked in saying what was found there."""
    from huggingface_hub import snapshot_download

    looked = []
    at = f" at revision {revision}" if revision else ""
    for cache in _caches_to_search(cache_dir):
        try:
            folder = Path(
                snapshot_download(
                    repo_id, revision=revision, cache_dir=cache, local_files_only=True, allow_patterns=DOWNLOAD_PATTERNS
                )
            )
        except _hub_errors():
            looked.append(f"Hugging Face cache {cache}: no snapshot of {repo_id}{at}")
            continue
        if missing := _missing_files(folder):
            looked.append(f"Hugging Face cache {cache}: snapshot {folder} lacks {', '.join(missing)}")
            continue
        return folder, looked
    local = weights_dir() / repo_id
    if not weights_dir().is_dir():
        pass  # a wheel install, or $DISTILQA_WEIGHTS_DIR naming no folder
    elif revision is not None:
        looked.append(f"weights folder {local}: skipped, it records no revision")
    else:
        if not local.is_dir():
            looked.append(f"weights folder {local}: not there")
        elif missing := _missing_files(local):
            looked.append(f"weights folder {local}: lacks {', '.join(missing)}")
        else:
            return local, looked
    return None, looked


def download(
    repo_id: str = DEFAULT_REPO_ID, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Download (or bring up to date) a checkpoint's files into a Hugging Face cache (see
    :func:`hub_cache_dir`) and return its snapshot folder. Files already there are not fetched again;
    offline, a complete cached snapshot is returned as it is."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir(cache_dir)
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=list(DOWNLOAD_PATTERNS))
    except _hub_errors() as error:
        found, looked = find_local_checkpoint(repo_id, revision, cache_dir)
        if found is not None:  # offline, but another cache (or weights/) has it all
            return found
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        raise WeightsNotFoundError(
            f"could not download {repo_id!r}{f' at revision {revision}' if revision else ''} from the Hugging Face "
            f"hub ({reason}), and it is not on this machine. Looked in:\n"
            + "".join(f"  - {line}\n" for line in looked)
            + f"On a machine with network access run `distilqa download {repo_id}` (or `hf download {repo_id}`) "
            f"and copy its cache folder here, then point ${HOME_VARIABLE} or $HF_HUB_CACHE at it; or pass "
            f"--model FOLDER, a folder holding {', '.join(DOWNLOAD_FILES)}."
        ) from None
    folder = Path(folder)
    if not (folder / SAFETENSORS_FILE).exists() and not (folder / SAFETENSORS_INDEX_FILE).exists():
        raise WeightsNotFoundError(f"{repo_id!r} has no {SAFETENSORS_FILE}; distilqa loads safetensors only")
    return folder


def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith(".")


def check_model_name(name_or_path: str | os.PathLike) -> None:
    """Raise as :func:`resolve_checkpoint` would for a name that is neither a checkpoint folder nor a
    hub repo id, without looking anything up: for callers whose loading happens elsewhere (Ray workers)."""
    path = Path(name_or_path).expanduser()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the folder that holds {CONFIG_FILE} and {SAFETENSORS_FILE}")
    if not path.is_dir() and not _looks_like_repo_id(str(name_or_path)):
        raise WeightsNotFoundError(f"no checkpoint folder at {path}")


def resolve_checkpoint(
    name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A checkpoint folder for a local path or a hub repo id: the files already on this machine
    (Hugging Face cache, then ``weights/``), else downloaded into the cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    check_model_name(name_or_path)
    name = str(name_or_path)
    found, _ = find_local_checkpoint(name, revision, cache_dir)
    return found if found is not None else download(name, revision, cache_dir)
