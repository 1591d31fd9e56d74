"""The page of ``distilqa serve`` (``GET /``): its files, and the SQuAD contexts it offers to pick from.

``index.html``, ``app.js`` and ``style.css`` beside this module are the whole page: no CDN, no external
font or script, nothing fetched from anywhere but the service that served it.

Example contexts come from the SQuAD v1.1 dev set when it is found: ``$DISTILQA_DATA/squad/dev-v1.1.json.zip``
when the ``DISTILQA_DATA`` variable is set, else ``shared/data/squad/dev-v1.1.json.zip`` beside the source
checkout (where the tests find it), or the file given to ``create_app(examples=...)``. Without it the page
simply has no picker.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
SQUAD_DEV = Path("squad") / "dev-v1.1.json.zip"
EXAMPLE_COUNT = 8  # contexts in the picker: the first question of as many articles


def asset(name: str) -> bytes:
    """The bytes of one of the page's files (a name of ``ASSETS``)."""
    if name not in ASSETS:
        raise KeyError(f"no page file named {name!r}; the page has {', '.join(ASSETS)}")
    return resources.files(__package__).joinpath(name).read_bytes()


def default_examples_file() -> Path | None:
    """Where the SQuAD dev set is looked for (see the module docstring), or None when it is not there."""
    data = os.environ.get("DISTILQA_DATA")
    root = Path(data) if data else Path(__file__).resolve().parents[3] / "shared" / "data"
    path = root / SQUAD_DEV
    return path if path.is_file() else None


def load_examples(path: str | os.PathLike | None, count: int = EXAMPLE_COUNT) -> list[dict]:
    """``[{"title", "question", "context"}]``: the first question of the first ``count`` articles of a
    SQuAD v1.1 file; [] when ``path`` is None."""
    if path is None:
        return []
    from distilqa.squad import read_squad

    examples: dict[str, dict] = {}
    for question in read_squad(path):
        if question.title not in examples:
            examples[question.title] = {
                "title": question.title.replace("_", " "),
                "question": question.question,
                "context": question.context,
            }
            if len(examples) == count:
                break
    return list(examples.values())
