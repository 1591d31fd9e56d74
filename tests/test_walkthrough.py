"""docs/walkthrough.md is generated from docs/walkthrough.in.md, the code it quotes and a real run:
regenerating it must give the committed file, so a change to a quoted line fails here until
``python docs/build_walkthrough.py`` is rerun."""

from __future__ import annotations

import importlib.util
import json
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
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


builder = load_builder()
pytestmark = pytest.mark.skipif(
    not builder.VOCAB_FILE.exists(),
    reason=f"the walkthrough tokenizes with the real cased vocabulary, {builder.VOCAB_FILE}, which is absent",
)


@pytest.fixture(scope="module")
def values():
    """One run of the example through the published-size model (random weights, seeded)."""
    return builder.collect_run()


def test_committed_walkthrough_is_what_the_code_gives(values):
    assert builder.render(values) == COMMITTED.read_text(encoding="utf-8"), (
        "docs/walkthrough.md is stale: run `python docs/build_walkthrough.py` and commit the result"
    )


def copy_of_the_source(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "distilqa", tmp_path / "distilqa", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_editing_a_quoted_line_of_the_model_makes_it_stale(values, tmp_path):
    """On a copy of the source: the real model.py is left alone."""
    source = copy_of_the_source(tmp_path)
    model = source / "distilqa" / "model.py"
    quoted = "x = self.sa_layer_norm(attended)"
    text = model.read_text(encoding="utf-8")
    assert text.count(quoted) == 1 and quoted in COMMITTED.read_text(encoding="utf-8")
    model.write_text(text.replace(quoted, "x = self.sa_layer_norm(attended * 2)"), encoding="utf-8")
    generated = builder.render(values, source)
    assert generated != COMMITTED.read_text(encoding="utf-8")
    assert "x = self.sa_layer_norm(attended * 2)" in generated


def test_lines_added_above_a_quote_move_its_line_numbers(values, tmp_path):
    source = copy_of_the_source(tmp_path)
    pipeline = source / "distilqa" / "pipeline.py"
    pipeline.write_text("# a new first line\n" + pipeline.read_text(encoding="utf-8"), encoding="utf-8")
    generated = builder.render(values, source)
    committed = re.findall(r"distilqa/pipeline\.py:(\d+)", COMMITTED.read_text(encoding="utf-8"))
    assert re.findall(r"distilqa/pipeline\.py:(\d+)", generated) == [str(int(n) + 1) for n in committed]


def test_a_vanished_symbol_or_line_is_a_clear_error(values, tmp_path):
    source = copy_of_the_source(tmp_path)
    model = source / "distilqa" / "model.py"
    text = model.read_text(encoding="utf-8")
    model.write_text(text.replace("def eager_attention(", "def written_out_attention("), encoding="utf-8")
    with pytest.raises(ValueError, match=r"'eager_attention' not found in distilqa/model.py"):
        builder.render(values, source)
    model.write_text(text.replace("weights = F.softmax(scores", "weights = torch.softmax(scores"), encoding="utf-8")
    assert "torch.softmax(scores" in builder.render(values, source), "a line inside a quoted range follows"
    model.write_text(text.replace("scores = torch.matmul", "scores = query @ key"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 'scores = torch.matmul' not found in distilqa/model.py:\d+-\d+"):
        builder.render(values, source)


def test_every_quote_is_the_source_at_the_stated_lines():
    """Read the committed page as a reader would: each `file:first-last` heading is followed by
    exactly those lines of that file (dedented)."""
    page = COMMITTED.read_text(encoding="utf-8")
    quotes = re.findall(r"\[`([\w/.]+):(\d+)(?:-(\d+))?`\]\([^)]*\)\n\n```python\n(.*?)\n```", page, flags=re.S)
    assert len(quotes) >= 12
    for path, first, last, code in quotes:
        lines = (ROOT / path).read_text(encoding="utf-8").split("\n")[int(first) - 1 : int(last or first)]
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        assert code == "\n".join(line[indent:] for line in lines), f"{path}:{first} is not what the page quotes"


def test_the_page_goes_from_the_command_to_the_softmax_and_back(values):
    page = COMMITTED.read_text(encoding="utf-8")
    files = re.findall(r"\[`(distilqa/\w+\.py):", page)
    assert files[0] == "distilqa/cli.py" and files[1] == "distilqa/pipeline.py", "it starts at `distilqa ask`"
    softmax = page.index("weights = F.softmax(scores, dim=-1)")
    assert page.index("## 1. The command") < page.index("self.distilbert(") < softmax < page.index("def merge_answers")
    # Shapes of the published configuration, as the run measured them.
    lengths = json.loads(values["lengths"].strip("`"))
    assert len(lengths) > 1 and max(lengths) <= builder.MAX_SEQ_LEN, "several windows, packed"
    assert values["ids"] == f"`(1, {sum(lengths)})`" and values["lin1"] == f"`(1, {sum(lengths)}, 3072)`"
    assert values["softmax_input"] == f"`(1, 12, {lengths[0]}, {lengths[0]})`", "the first window's scores"
    assert "{{" not in page and "@quote" not in page


def test_check_mode_says_whether_the_page_is_current(values, monkeypatch, capsys):
    monkeypatch.setattr(builder, "collect_run", lambda vocab: values)
    assert builder.main(["--check"]) == 0
    assert "current" in capsys.readouterr().out
