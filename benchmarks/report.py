"""Pictures and docs tables from the committed results: for every ``results/<name>.json`` the PNG beside
it, by the ``plot`` of the script that wrote it; in ``docs/*.md`` each table between ``<!-- table:
<name>.json [function] -->`` and ``<!-- end table -->``, by its ``table`` (or ``function``)."""

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: `benchmarks` importable

from benchmarks.common import RESULTS, ROOT

DOCS = ROOT / "docs"
TABLE = re.compile(r"(<!-- table: (?P<name>[\w.-]+)(?: (?P<function>\w+))? -->\n).*?(<!-- end table -->)", re.S)


def load(path: Path) -> tuple[dict, object]:
    """A result and the module of the script that wrote it."""
    payload = json.loads(path.read_text(encoding="utf-8"))
    return payload, importlib.import_module(f"benchmarks.{payload['benchmark']}")


def tables(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked table made anew from the JSON it names."""

    def fill(match: re.Match) -> str:
        path = results / match["name"]
        if path.exists():
            payload, script = load(path)
            table = getattr(script, match["function"] or "table")(payload)
        else:  # not measured yet
            table = f"(No results yet: `benchmarks/results/{path.name}` is written by `benchmarks/run_all.sh`.)"
        return f"{match[1]}\n{table}\n\n{match[4]}"

    return TABLE.sub(fill, text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Redraw the PNGs of benchmarks/results and the tables of docs/.")
    parser.add_argument("--check", action="store_true", help="exit 1 if a table in docs/ is not what the JSON gives")
    check = parser.parse_args().check
    pages = {page: page.read_text(encoding="utf-8") for page in sorted(DOCS.glob("*.md"))}
    stale = {page: new for page, text in pages.items() if (new := tables(text)) != text}
    if check:
        names = ", ".join(f"docs/{page.name}" for page in stale)
        print(f"stale tables in {names}: run python benchmarks/report.py" if stale else "ok")
        sys.exit(1 if stale else 0)
    for path in sorted(RESULTS.glob("*.json")):
        payload, script = load(path)
        if hasattr(script, "plot"):
            print(f"wrote {script.plot(payload, path.with_suffix('.png'))}")
    for page, text in stale.items():
        page.write_text(text, encoding="utf-8")
        print(f"wrote {page}")
