"""Pictures as files: matplotlib on its file-only backend, and figures saved whole or not at all.

Torch-free; imports nothing from distilqa but the bottom-layer :mod:`distilqa.files`. matplotlib is
optional (the ``explain`` extra): :func:`require_matplotlib` says what to install when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from distilqa.files import atomic_write

INSTALL_HINT = 'pip install "distilqa[explain]"  (or: pip install matplotlib)'


def require_matplotlib(command: str = "distilqa") -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend, or an ImportError naming ``command``
    (e.g. "distilqa heads") and what to install. Call it before long work, to fail at once."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"{command} draws its pictures with matplotlib, which is missing: {INSTALL_HINT}") from None
    matplotlib.use("Agg")  # files only: never open a window, work without a display
    import matplotlib.pyplot as pyplot

    return pyplot


def save_figure(figure: Any, path: str | os.PathLike, **savefig_options: Any) -> Path:
    """Save ``figure`` as a PNG at ``path`` atomically (see :func:`distilqa.files.atomic_write`) and
    close it; ``savefig_options`` go to ``figure.savefig`` (dpi, ...)."""
    import matplotlib.pyplot as pyplot

    try:
        return atomic_write(path, lambda partial: figure.savefig(partial, format="png", **savefig_options))
    finally:
        pyplot.close(figure)
