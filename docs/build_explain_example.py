"""Make the `distilqa explain` pictures and the screenshots of the `distilqa serve` page shown in the
README, with a random published-size checkpoint.

    python docs/build_explain_example.py    # writes docs/images/explain-*.png and serve-page*.png

The screenshots need Playwright and Debian's chromium (/usr/bin/chromium); without them only the
explain pictures are made.

The real weights cannot be downloaded where these pictures were made, so the model is distilqa's own
DistilBertForQuestionAnswering at the published configuration with random weights (seed 0), saved as
a checkpoint with the real cased vocabulary; every picture says "random weights". The same command,
`distilqa explain`, draws the real pictures wherever the trained checkpoint is.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
from build_walkthrough import CONTEXT, QUESTION, VOCAB_FILE  # noqa: E402 (the walkthrough's example)

IMAGES = ROOT / "docs" / "images"
LABEL = "random weights (published configuration, seed 0), not the trained model"
PICTURES = ("probabilities", "attention_grid", "attention_head", "logit_lens")
CHROMIUM = Path("/usr/bin/chromium")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=IMAGES, help=f"folder for the PNGs (default {IMAGES})")
    parser.add_argument("--vocab", type=Path, default=VOCAB_FILE, help="the cased vocab.txt")
    parser.add_argument("--html", type=Path, help="also keep the HTML page here")
    args = parser.parse_args(argv)

    from distilqa.config import DistilBertConfig
    from distilqa.explain import write_explanation
    from distilqa.model import DistilBertForQuestionAnswering
    from distilqa.pipeline import QuestionAnswerer
    from distilqa.tokenization import QuestionContextTokenizer, write_tokenizer_files

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint, pictures = Path(scratch) / "checkpoint", Path(scratch) / "pictures"
        torch.manual_seed(0)
        DistilBertForQuestionAnswering(DistilBertConfig()).save_pretrained(checkpoint)
        write_tokenizer_files(checkpoint, args.vocab, lowercase=False)
        model = DistilBertForQuestionAnswering.from_pretrained(checkpoint)
        answerer = QuestionAnswerer(model, QuestionContextTokenizer.from_pretrained(checkpoint))
        result = write_explanation(answerer, QUESTION, CONTEXT, pictures, label=LABEL)
        args.out.mkdir(parents=True, exist_ok=True)
        for name in PICTURES:
            shutil.copyfile(result.files[name], args.out / f"explain-{name.replace('_', '-')}.png")
        if args.html:
            shutil.copyfile(result.files["html"], args.html)
        print(f"wrote {len(PICTURES)} pictures into {args.out}")
        screenshots = screenshot_page(answerer, args.out)
    print(f"wrote {screenshots} screenshots of the page into {args.out}" if screenshots else "no screenshots")
    return 0


def screenshot_page(answerer, out: Path) -> int:
    """The page of `distilqa serve` after answering the example: whole, and its "Inside the model" part.
    Returns how many screenshots were written (0 without Playwright or chromium)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("Playwright is not installed: no screenshots of the page (pip install playwright)")
        return 0
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} not found: no screenshots of the page (apt-get install chromium)")
        return 0
    from distilqa.serve import create_app
    from distilqa.testing import serve_in_thread

    app = create_app(answerer, LABEL, examples=None)
    with serve_in_thread(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.goto(url)
        page.get_by_label("Question").fill(QUESTION)
        page.get_by_label("Context").fill(CONTEXT)
        page.get_by_role("button", name="Answer").click()
        page.locator("#lens-table tr").nth(1).wait_for(timeout=120_000)
        page.screenshot(path=out / "serve-page.png", full_page=True)
        page.locator("#inside").screenshot(path=out / "serve-page-inside.png")
        browser.close()
    return 2


if __name__ == "__main__":
    sys.exit(main())
