"""docs/walkthrough.md is generated from the code it quotes: regenerating it must give the committed
file, so a change to a quoted line (or to the lines above one) fails here until
``python docs/build_walkthrough.py`` is rerun."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "walkthrough.md"


def load_builder():
    spec = importlib.util.spec_from_file_location("build_walkthrough", ROOT / "docs" / "build_walkthrough.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


builder = load_builder()
pytestmark = pytest.mark.skipif(
    not builder.VOCAB_FILE.exists(),
    reason=f"the walkthrough tokenizes with the real cased vocabulary, {builder.VOCAB_FILE}, which is absent",
)


@pytest.fixture(scope="module")
def run():
    """One run of the example through the published-size model (random weights, seeded)."""
    return builder.collect_run()


def test_committed_walkthrough_is_what_the_code_gives(run):
    generated = builder.render(run, ROOT)
    assert generated == COMMITTED.read_text(encoding="utf-8"), (
        "docs/walkthrough.md is stale: run `python docs/build_walkthrough.py` and commit the result"
    )


def copy_of_the_source(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "distilqa", tmp_path / "distilqa", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_editing_a_quoted_line_of_the_model_makes_it_stale(run, tmp_path):
    """On a copy of the source: the real model.py is left alone."""
    source = copy_of_the_source(tmp_path)
    model = source / "distilqa" / "model.py"
    quoted = "x = self.sa_layer_norm(attended + x)"
    text = model.read_text(encoding="utf-8")
    assert text.count(quoted) == 1 and quoted in COMMITTED.read_text(encoding="utf-8")
    model.write_text(text.replace(quoted, "x = self.sa_layer_norm(x + attended)"), encoding="utf-8")
    generated = builder.render(run, source)
    assert generated != COMMITTED.read_text(encoding="utf-8")
    assert "x = self.sa_layer_norm(x + attended)" in generated


def test_a_vanished_anchor_is_a_clear_error(run, tmp_path):
    source = copy_of_the_source(tmp_path)
    pipeline = source / "distilqa" / "pipeline.py"
    text = pipeline.read_text(encoding="utf-8")
    pipeline.write_text(text.replace("EXCLUDED_LOGIT = -10000.0", "EXCLUDED = -10000.0"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"anchor 'EXCLUDED_LOGIT = -10000.0' not found in distilqa/pipeline.py"):
        builder.render(run, source)


def test_every_quote_is_the_source_at_the_stated_lines():
    """Read the committed page as a reader would: each `file:first-last` heading is followed by
    exactly those lines of that file (dedented)."""
    page = COMMITTED.read_text(encoding="utf-8")
    quotes = re.findall(r"\[`([\w/.]+):(\d+)(?:-(\d+))?`\]\([^)]*\)\n\n```python\n(.*?)\n```", page, flags=re.S)
    assert len(quotes) >= 15
    for path, first, last, code in quotes:
        lines = (ROOT / path).read_text(encoding="utf-8").split("\n")[int(first) - 1 : int(last or first)]
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        assert code == "\n".join(line[indent:] for line in lines), f"{path}:{first} is not what the page quotes"


def test_the_page_follows_every_stage(run):
    page = COMMITTED.read_text(encoding="utf-8")
    for stage in ("WordPiece", "Windows", "Embeddings", "transformer blocks", "span head", "probabilities",
                  "best span", "characters", "Merging"):  # fmt: skip
        assert re.search(rf"^## .*{stage}", page, flags=re.M | re.I), stage
    for why in ("post-LN", "eps 1e-12", "sinusoidal table", "dropout before the head", "-10000", "[CLS] stays",
                "Why sum"):  # fmt: skip
        assert why in page, why
    # Shapes of the published configuration, as the run measured them.
    assert f"{(1, run.shapes['packed_ids'][1], 3072)}" in page and "(1, 12, 40, 40)" in page
