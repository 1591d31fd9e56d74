"""Reading and writing files safely: the one place for atomic writes, output checks and JSON Lines.

Torch-free and importing nothing from distilqa, so every layer (cli, bulk, serve, train, explain,
heads, export) can use it. The output policy of every command that writes:

* an existing output is refused unless ``overwrite=True`` (``--overwrite``);
* an output may never be one of the inputs;
* the destination is checked (its folder exists or can be made, and is writable) before any work;
* a file appears whole or not at all: written under a temporary name beside it, then renamed.

Errors are :class:`OutputError` / ``ValueError`` whose messages name the path as the user typed it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any


class OutputError(ValueError):
    """An output that cannot or must not be written; the message says what to do."""


def check_output(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    directory: bool = False,
    option: str = "--output",
) -> Path:
    """Check before any work that ``path`` may be written (a file, or a folder with ``directory``):
    not an input, not existing unless ``overwrite``, its parent a writable folder (made if missing)."""
    path = Path(path)
    shown = f"{option} {os.fspath(path)}"
    for source in inputs:
        if source is not None and _same_place(path, Path(source)):
            raise OutputError(f"{shown} is also an input; write the output to another path")
    if path.exists():
        if not overwrite:
            raise OutputError(f"{shown} already exists; pass --overwrite to replace it, or choose another path")
        if directory != path.is_dir():
            kind = "a folder" if path.is_dir() else "a file"
            raise OutputError(f"{shown} is {kind}; name {'a folder' if directory else 'a file'}")
    parent = path.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{shown}: cannot create its folder ({error.strerror or error})") from None
    if not parent.is_dir():
        raise OutputError(f"{shown}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: the folder {parent} is not writable")
    return path


def _same_place(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary_path)``, then rename the result onto ``path``: readers see the old file
    or the whole new one, never half. Works for a file or a folder that ``write`` creates."""
    path = Path(path)
    with _temporary_beside(path) as partial:
        write(partial)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # a folder cannot be renamed over a non-empty one
        os.replace(partial, path)
    return path


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A path to write in a hidden temporary folder beside ``path`` (same file system, so the final
    rename is atomic); the folder is removed afterwards, whatever happened."""
    parent = path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".partial", dir=parent) as temporary:
        yield Path(temporary) / path.name


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> Path:
    """Write ``value`` as JSON (UTF-8, trailing newline) to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def open_output(path: str | os.PathLike | None) -> Iterator[IO[str]]:
    """Standard output, or a text file that replaces ``path`` only once the block ends without error."""
    if path is None:
        yield sys.stdout
        return
    path = Path(path)
    with _temporary_beside(path) as partial:
        with partial.open("w", encoding="utf-8") as out:
            yield out
        os.replace(partial, path)


def read_text(path: str | os.PathLike) -> str:
    """The file's text as stored ("\\r\\n" kept, so character offsets index the file); UTF-8 only."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{os.fspath(path)} is not UTF-8 text ({error})") from None
    except FileNotFoundError:
        raise ValueError(f"{os.fspath(path)} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{os.fspath(path)} is a folder; name a file") from None


def read_pairs(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, {"question", "context"[, "id"]}) for each object of a JSON Lines file, checked line by line."""
    pairs = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):  # not splitlines: U+2028 is JSON text
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{os.fspath(path)}:{number}: not valid JSON ({error})") from None
        if not isinstance(pair, dict) or not all(isinstance(pair.get(key), str) for key in ("question", "context")):
            raise ValueError(f'{os.fspath(path)}:{number}: expected an object with string "question" and "context"')
        if not (pair["question"].strip() and pair["context"].strip()):
            raise ValueError(f"{os.fspath(path)}:{number}: the question or the context is empty")
        pairs.append((number, pair))
    if not pairs:
        raise ValueError(f"{os.fspath(path)} holds no question")
    return pairs


def write_jsonl_line(out: IO[str], value: Any) -> None:
    """One JSON object on its own line (non-ASCII kept as is)."""
    out.write(json.dumps(value, ensure_ascii=False) + "\n")
