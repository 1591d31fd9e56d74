"""Pictures and docs tables from the committed results, so that neither can drift from the JSON: for
every ``benchmarks/results/<name>.json`` the PNG beside it, drawn by the ``plot`` of the script that
wrote it, and in ``docs/*.md`` each table between ``<!-- table: <name>.json [function] -->`` and
``<!-- end table -->``, made by that script's ``table`` (or ``function``).

    python benchmarks/report.py            # redraw the PNGs, rewrite the tables in docs/
    python benchmarks/report.py --check    # exit 1 if a table in docs/ is not what the JSON gives
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/report.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT

DOCS = ROOT / "docs"
TABLE = re.compile(r"(<!-- table: (?P<name>[\w.-]+)(?: (?P<function>\w+))? -->\n).*?(<!-- end table -->)", re.S)


def script(payload: dict):
    return importlib.import_module(f"benchmarks.{payload['benchmark']}")


def tables(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked table made anew from the JSON it names."""

    def fill(match: re.Match) -> str:
        path = results / match["name"]
        if path.exists():
            payload = json.loads(path.read_text(encoding="utf-8"))
            table = getattr(script(payload), match["function"] or "table")(payload)
        else:  # not measured yet
            table = f"(No results yet: `benchmarks/results/{path.name}` is written by `benchmarks/run_all.sh`.)"
        return f"{match[1]}\n{table}\n\n{match[4]}"

    return TABLE.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check docs/speed.md against the JSON")
    args = parser.parse_args(argv)
    pages = {page: page.read_text(encoding="utf-8") for page in sorted(DOCS.glob("*.md"))}
    stale = [page.name for page, text in pages.items() if tables(text) != text]
    if args.check:
        print(f"stale tables in docs/{', docs/'.join(stale)}: run python benchmarks/report.py" if stale else "ok")
        return 1 if stale else 0
    for path in sorted(RESULTS.glob("*.json")):
        payload = json.loads(path.read_text(encoding="utf-8"))
        if hasattr(script(payload), "plot"):
            print(f"wrote {script(payload).plot(payload, path.with_suffix('.png'))}")
    for page, text in pages.items():
        if tables(text) != text:
            page.write_text(tables(text), encoding="utf-8")
            print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
