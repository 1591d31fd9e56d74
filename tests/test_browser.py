"""The page of `distilqa serve`, used in a real browser: Debian's chromium (/usr/bin/chromium) driven by
Playwright, as a user would (fields found by their labels, the Answer button pressed). Nothing is
downloaded at test time; without chromium or Playwright these tests skip and say why.

Each test records every request the page makes and checks that none left the service on 127.0.0.1.
Screenshots go to the test's tmp path (the README's are made by docs/build_explain_example.py).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy
import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright drives the browser: pip install playwright")
Image = pytest.importorskip("PIL.Image", reason="Pillow (a matplotlib dependency) reads the screenshots")

from conftest import SQUAD_FILE, save_reference_checkpoint, write_tokenizer_files  # noqa: E402

from distilqa.pipeline import QuestionAnswerer  # noqa: E402
from distilqa.serve import create_app  # noqa: E402
from distilqa.testing import serve_in_thread  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed (apt-get update && apt-get install -y chromium)",
)
QUESTION = "Where was HuggingFace founded?"
CONTEXT = (
    "HuggingFace was founded in Paris in 2016 by three French entrepreneurs. Its R&D team later moved "
    "to New York, and it now hosts thousands of models."
)
VIEWPORT = {"width": 1366, "height": 900}  # a laptop screen


@pytest.fixture(scope="module")
def answerer(tmp_path_factory) -> QuestionAnswerer:
    """2 layers x 4 heads of width 32: a real layer x head grid, fast."""
    directory = tmp_path_factory.mktemp("browser-model")
    save_reference_checkpoint(directory, seed=5, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    return QuestionAnswerer.from_pretrained(write_tokenizer_files(directory), linear_backend="aten")


@pytest.fixture(scope="module")
def url(answerer) -> str:
    examples = SQUAD_FILE if SQUAD_FILE.exists() else None
    with serve_in_thread(create_app(answerer, "random weights (2 layers, width 32)", examples=examples)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url):
    """A fresh page on the service; ``page.requests`` lists every URL it asked for, ``page.errors`` its
    script errors."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda request: page.requests.append(request.url))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(url)
    yield page
    context.close()
    assert all(seen.startswith(f"{url}/") for seen in page.requests), page.requests
    assert not page.errors, page.errors


def ask(page, question: str, context: str) -> None:
    page.get_by_label("Question").fill(question)
    page.get_by_label("Context").fill(context)
    page.get_by_role("button", name="Answer").click()


def drawn_fraction(path: Path) -> float:
    """The fraction of pixels of a screenshot that are not white."""
    with Image.open(path) as image:
        pixels = numpy.asarray(image.convert("RGB")).reshape(-1, 3)  # (pixels, 3)
    return float((pixels < 245).any(axis=1).mean())


def test_answer_is_marked_in_the_context(page, answerer, url, tmp_path):
    ask(page, QUESTION, CONTEXT)
    mark = page.locator("#highlighted mark")
    mark.wait_for()
    direct = answerer(QUESTION, CONTEXT)
    assert mark.inner_text() == direct["answer"]
    assert page.locator("#highlighted").inner_text() == CONTEXT
    shown = re.search(r"score ([0-9.e+-]+),", page.locator("#answer-line").inner_text()).group(1)
    assert float(shown) == pytest.approx(direct["score"], rel=5e-3) and len(shown.lstrip("0.")) == 3  # 3 digits
    alternatives = page.locator("#alternatives li")
    top = answerer(QUESTION, CONTEXT, top_k=5)
    assert alternatives.count() == len(top)
    assert [text.rsplit(" — ", 1)[0] for text in alternatives.all_inner_texts()] == [a["answer"] for a in top]
    # The pictures: bars over the context's tokens, the layer x head cells, the lens, the head's map.
    page.locator("#probabilities rect").first.wait_for()
    assert page.locator("#probabilities rect").count() == 2 * len(
        [
            sid
            for sid in answerer.tokenizer.encode_windows([QUESTION], [CONTEXT], 384, 128)[0][0].sequence_ids
            if sid == 1
        ]
    )
    assert page.locator("#overview rect.cell").count() == 2 * 4
    assert page.locator("#lens circle").count() >= 3
    painted = page.evaluate(
        """() => { const c = document.getElementById('head-map');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 250) n++; return n; }"""
    )
    assert painted > 10, "the attention map is blank"
    screenshot = tmp_path / "page.png"
    page.screenshot(path=screenshot, full_page=True)
    assert drawn_fraction(screenshot) > 0.05


def test_keyboard_alone_asks_and_chooses_a_head(page):
    page.get_by_label("Question").focus()
    page.keyboard.type(QUESTION)
    page.keyboard.press("Tab")
    page.keyboard.type(CONTEXT)
    page.keyboard.press("Tab")  # to the Answer button
    page.keyboard.press("Enter")
    page.locator("#highlighted mark").wait_for()
    page.locator("#overview rect.cell").first.wait_for()
    cell = page.get_by_role("button", name="layer 1, head 3:")
    cell.focus()
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('head-title').textContent.includes('layer 1, head 3')")
    assert "chosen with --head" in page.locator("#head-title").inner_text()
    token = page.locator("#tokens button").nth(3)
    token.focus()
    assert token.get_attribute("aria-pressed") == "true"
    assert "looks most at" in page.locator("#token-detail").inner_text()


def test_a_refused_pair_shows_the_services_message(page, url):
    import httpx

    ask(page, QUESTION, "   ")
    alert = page.get_by_role("alert")
    alert.wait_for()
    expected = httpx.post(url, json={"inputs": {"question": QUESTION, "context": "   "}}).json()["error"]
    assert alert.inner_text() == expected
    assert page.locator("#result").is_hidden()


def test_examples_fill_the_fields(page):
    if not SQUAD_FILE.exists():
        pytest.skip(f"SQuAD dev set not found at {SQUAD_FILE}")
    picker = page.get_by_label("SQuAD example")
    picker.wait_for()
    picker.select_option(index=1)
    from distilqa.squad import read_squad

    first = read_squad(SQUAD_FILE)[0]
    assert page.get_by_label("Question").input_value() == first.question
    assert page.get_by_label("Context").input_value() == first.context


def test_explain_view_screenshot(page, tmp_path):
    ask(page, QUESTION, CONTEXT)
    page.locator("#lens-table tr").nth(1).wait_for()
    inside = page.locator("#inside")
    screenshot = tmp_path / "inside.png"
    inside.screenshot(path=screenshot)
    with Image.open(screenshot) as image:
        assert image.size[1] > 600
    assert drawn_fraction(screenshot) > 0.05
    # The lens table's last row is the model's own output: it answers what the page marked.
    last = page.locator("#lens-table tr").last.locator("td").all_inner_texts()
    assert last[1] == page.locator("#highlighted mark").inner_text() and last[3] == "1"
