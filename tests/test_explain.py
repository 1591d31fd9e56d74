"""``distilqa explain``: every plotted number comes from the model, the pictures are real pictures, and
the HTML page stands alone (and renders in headless Chromium when it is installed).

The numbers in explanation.json are checked against transformers' own DistilBertForQuestionAnswering
(an independent implementation) on the same random checkpoint, and against a direct forward of
distilqa's model; the tokens allowed in an answer are worked out here from the tokenizer's own
sequence ids, not taken from the sidecar.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from conftest import save_reference_checkpoint, write_tokenizer_files

from distilqa.cli import main
from distilqa.explain import DPI, FIGURE_SIZES, explain, write_explanation
from distilqa.model import DistilBertForQuestionAnswering
from distilqa.pipeline import QuestionAnswerer
from distilqa.tokenization import QuestionContextTokenizer

Image = pytest.importorskip("PIL.Image", reason="Pillow (a matplotlib dependency) reads the PNGs")
pytest.importorskip("matplotlib", reason='explain draws with matplotlib: pip install "distilqa[explain]"')

QUESTION = "Where was HuggingFace founded?"
CONTEXT = (
    "HuggingFace was founded in Paris in 2016 by three French entrepreneurs. Its R&D team later moved "
    "to New York, and it now hosts thousands of models."
)
PICTURES = ("probabilities", "attention_grid", "attention_head", "logit_lens")
# float32 forwards of the same weights by two implementations; measured max differences here: 4e-9 for the
# probabilities, 0 for the attention weights.
TOLERANCE = 2e-8


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """2 layers x 4 heads of width 32: a real grid, fast enough to run in a few seconds."""
    directory = tmp_path_factory.mktemp("explain-small")
    return write_tokenizer_files(
        save_reference_checkpoint(directory, seed=5, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    )


@pytest.fixture(scope="module")
def explained(small_checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    """Run the command once; (output folder, explanation.json)."""
    out = tmp_path_factory.mktemp("explain-out") / "pictures"
    argv = ["explain", "--model", str(small_checkpoint), "--question", QUESTION, "--context", CONTEXT]
    assert main([*argv, "--out", str(out), "--linear-backend", "aten"]) == 0
    return out, json.loads((out / "explanation.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def reference(small_checkpoint, explained):
    """transformers' forward of the explained window: (output, allowed, question positions, context positions)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.DistilBertForQuestionAnswering.from_pretrained(small_checkpoint, attn_implementation="eager")
    tokenizer = QuestionContextTokenizer.from_pretrained(small_checkpoint).tokenizer
    encoding = tokenizer.encode(QUESTION, CONTEXT)  # one window: the pair is far shorter than 384 tokens
    _, sidecar = explained
    assert sidecar["window"]["ids"] == encoding.ids
    with torch.no_grad():
        output = model.eval()(
            torch.tensor([encoding.ids]), output_attentions=True, output_hidden_states=True, return_dict=True
        )
    questions = [i for i, sid in enumerate(encoding.sequence_ids) if sid == 0]
    contexts = [i for i, sid in enumerate(encoding.sequence_ids) if sid == 1]
    return output, model, [0, *contexts], questions, contexts


def softmax_over(logits: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    """Probabilities over the allowed positions only, 0 elsewhere. (seq,)"""
    probabilities = torch.zeros_like(logits)
    probabilities[allowed] = torch.softmax(logits[allowed], dim=-1)
    return probabilities


def test_answer_and_span_are_the_pipelines(small_checkpoint, explained):
    _, sidecar = explained
    answer = QuestionAnswerer.from_pretrained(small_checkpoint, linear_backend="aten")(QUESTION, CONTEXT)
    assert sidecar["answer"] == answer
    span = sidecar["span"]
    assert answer["start"] <= span["start_char"] < span["end_char"] <= answer["end"]
    p_start, p_end = sidecar["probabilities"]["start"], sidecar["probabilities"]["end"]
    assert span["score"] == pytest.approx(p_start[span["start_token"]] * p_end[span["end_token"]], rel=1e-6)


def test_probabilities_match_a_direct_forward(small_checkpoint, explained, reference):
    _, sidecar = explained
    output, _, allowed, _, _ = reference
    ours = DistilBertForQuestionAnswering.from_pretrained(small_checkpoint)(torch.tensor([sidecar["window"]["ids"]]))
    for name, theirs, mine in (
        ("start", output.start_logits[0], ours.start_logits[0]),
        ("end", output.end_logits[0], ours.end_logits[0]),
    ):
        plotted = torch.tensor(sidecar["probabilities"][name])
        torch.testing.assert_close(plotted, softmax_over(theirs, allowed), atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(plotted, softmax_over(mine.detach(), allowed), atol=TOLERANCE, rtol=0)
        excluded = [i for i in range(len(plotted)) if i not in allowed]
        assert excluded and plotted[excluded].abs().max() == 0.0  # the question and [SEP] are never answers
    no_answer = softmax_over(output.start_logits[0], allowed)[0] * softmax_over(output.end_logits[0], allowed)[0]
    assert sidecar["probabilities"]["no_answer"] == pytest.approx(float(no_answer), abs=TOLERANCE)


def test_attention_weights_match_a_direct_forward(explained, reference):
    _, sidecar = explained
    output, _, _, questions, contexts = reference
    attentions = torch.stack([a[0] for a in output.attentions])  # (layers, heads, seq, seq)
    assert sidecar["attention"]["queries"] == [0, *questions]
    assert sidecar["attention"]["keys"] == contexts
    expected = attentions[:, :, [0, *questions]][:, :, :, contexts]  # (layers, heads, queries, context)
    torch.testing.assert_close(torch.tensor(sidecar["attention"]["weights"]), expected, atol=TOLERANCE, rtol=0)
    selected = sidecar["selected_head"]
    torch.testing.assert_close(
        torch.tensor(selected["weights"]), attentions[selected["layer"], selected["head"]], atol=TOLERANCE, rtol=0
    )
    # The default head is the one whose [CLS] and question rows put the most weight on the chosen span.
    span = sidecar["span"]
    mass = attentions[:, :, [0, *questions], span["start_token"] : span["end_token"] + 1].sum(-1).mean(-1)
    assert divmod(int(mass.argmax()), mass.size(1)) == (selected["layer"], selected["head"])


def test_logit_lens_matches_the_span_head_on_every_layer(explained, reference):
    """Each depth: transformers' hidden state through transformers' qa_outputs, ranked here by brute force."""
    _, sidecar = explained
    output, model, allowed, _, contexts = reference
    lens, span = sidecar["logit_lens"], sidecar["span"]
    s, e = span["start_token"], span["end_token"]
    assert len(lens["layers"]) == len(output.hidden_states) == 3  # embeddings + 2 blocks
    for depth, hidden in enumerate(output.hidden_states):
        with torch.no_grad():
            start_logits, end_logits = model.qa_outputs(hidden)[0].unbind(-1)  # (seq,) each
        p_start, p_end = softmax_over(start_logits, allowed), softmax_over(end_logits, allowed)
        assert lens["start_probability"][depth] == pytest.approx(float(p_start[s]), abs=TOLERANCE)
        assert lens["end_probability"][depth] == pytest.approx(float(p_end[e]), abs=TOLERANCE)
        assert lens["start_rank"][depth] == 1 + sum(float(p_start[i]) > float(p_start[s]) for i in contexts)
        assert lens["end_rank"][depth] == 1 + sum(float(p_end[i]) > float(p_end[e]) for i in contexts)
        spans = {(a, b): float(p_start[a] * p_end[b]) for a in contexts for b in contexts if a <= b < a + 15}
        assert lens["span_rank"][depth] == 1 + sum(score > spans[(s, e)] for score in spans.values())
    # The last depth is the model's real output, where the chosen span is the window's best candidate.
    assert lens["span_score"][-1] == pytest.approx(span["score"], rel=1e-6)
    assert len(spans) == lens["spans_ranked"]


def test_logit_lens_json_holds_the_plotted_ranks(explained):
    out, sidecar = explained
    lens = json.loads((out / "logit_lens.json").read_text(encoding="utf-8"))
    for key in ("layers", "span_rank", "start_rank", "end_rank", "span_score"):
        assert lens[key] == sidecar["logit_lens"][key]
    assert lens["answer"] == sidecar["answer"]


def not_blank(image) -> tuple[float, int]:
    """(fraction of pixels that are not white, number of distinct colours)."""
    pixels = numpy.asarray(image.convert("RGB")).astype(numpy.int64).reshape(-1, 3)  # (pixels, 3)
    colours = (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]  # (pixels,): one number per colour
    return float((colours != 0xFFFFFF).mean()), len(numpy.unique(colours))


def test_pictures_have_their_size_and_are_not_blank(explained):
    out, sidecar = explained
    for name in PICTURES:
        width, height = (round(inches * DPI) for inches in FIGURE_SIZES[name])
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG"
            assert image.size == (width, height), name
            drawn, colours = not_blank(image)
        # Measured: 6% (the logit lens, mostly white) to 74% drawn; a figure with only its label: 0.2%.
        assert drawn > 0.02 and colours > 50, f"{name}.png looks blank: {drawn:.1%} drawn, {colours} colours"
        assert sidecar["figures"][name] == {"file": f"{name}.png", "width": width, "height": height}
    assert not list(out.glob("*.partial"))


def test_html_is_one_self_contained_page(explained):
    out, sidecar = explained
    page = (out / "explanation.html").read_text(encoding="utf-8")
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(data) for data in images] == [(out / f"{name}.png").read_bytes() for name in PICTURES]
    assert not re.search(r"(src|href)=\"(?!data:)", page), "the page must not load anything"
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "R&amp;D" in page and "R&D" not in page  # text is escaped
    for i in sidecar["attention"]["keys"]:  # every context token is readable as text
        assert f">{sidecar['window']['tokens'][i].replace('&', '&amp;')}</span>" in page


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get update && apt-get install -y chromium)",
)
def test_html_renders_in_headless_chromium(explained, tmp_path):
    out, _ = explained
    screenshot = tmp_path / "page.png"
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={screenshot}",
        "--window-size=1280,2000",
        (out / "explanation.html").resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    with Image.open(screenshot) as image:
        assert image.size == (1280, 2000)
        drawn, colours = not_blank(image)
        # The pictures' bars and heat maps: strongly coloured pixels, which text alone does not give.
        pixels = numpy.asarray(image.convert("RGB")).astype(int).reshape(-1, 3)  # (pixels, 3)
        saturated = int((pixels.max(axis=1) - pixels.min(axis=1) > 100).sum())
    # Measured: 47% drawn, 1.3 million saturated pixels; with the images broken, 5% and 3,000.
    assert drawn > 0.2 and colours > 200 and saturated > 200_000, (drawn, colours, saturated)


def test_several_windows_explain_the_answers_window(small_checkpoint):
    answerer = QuestionAnswerer.from_pretrained(small_checkpoint, linear_backend="aten")
    sidecar = explain(answerer, QUESTION, CONTEXT, max_seq_len=24, doc_stride=6, head=(1, 2))
    assert sidecar["window"]["count"] > 2
    answer = answerer(QUESTION, CONTEXT, max_seq_len=24, doc_stride=6)
    assert sidecar["answer"] == answer
    assert answer["start"] <= sidecar["span"]["start_char"] < sidecar["span"]["end_char"] <= answer["end"]
    assert (sidecar["selected_head"]["layer"], sidecar["selected_head"]["head"]) == (1, 2)
    window = QuestionContextTokenizer.from_pretrained(small_checkpoint).encode_windows([QUESTION], [CONTEXT], 24, 6)[0]
    assert sidecar["window"]["ids"] == window[sidecar["window"]["index"]].ids


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distilqa.cli", *argv], capture_output=True, text=True, timeout=120, check=False
    )


def test_without_matplotlib_it_says_what_to_install(small_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    argv = ["explain", "--model", str(small_checkpoint), "--question", QUESTION, "--context", CONTEXT]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and 'pip install "distilqa[explain]"' in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [(["--head", "2.0"], "head 2.0 does not exist"), (["--head", "one"], "--head takes LAYER.HEAD"), ([], "")],
)
def test_user_errors_are_one_line(small_checkpoint, tmp_path, capsys, extra, message):
    argv = ["explain", "--model", str(small_checkpoint), "--out", str(tmp_path / "out"), "--question", QUESTION]
    context = CONTEXT if extra else "   "
    assert main([*argv, "--context", context, *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("distilqa: error: ") and error.count("\n") == 0, error
    assert message in error


def test_published_size_random_checkpoint(published_checkpoint, tmp_path):
    """The published shape: 6 layers x 12 heads in the grid, numbers equal to a direct forward."""
    answerer = QuestionAnswerer.from_pretrained(published_checkpoint, linear_backend="aten")
    sidecar = write_explanation(answerer, QUESTION, CONTEXT, tmp_path / "out", label="random weights").explanation
    weights = torch.tensor(sidecar["attention"]["weights"])
    assert weights.shape[:2] == (6, 12)
    assert len(sidecar["logit_lens"]["layers"]) == 7
    with torch.inference_mode():
        output = answerer.model(torch.tensor([sidecar["window"]["ids"]]), output_attentions=True)
    direct = torch.stack([a[0] for a in output.attentions])[:, :, sidecar["attention"]["queries"]]
    torch.testing.assert_close(weights, direct[:, :, :, sidecar["attention"]["keys"]], atol=TOLERANCE, rtol=0)
    with Image.open(io.BytesIO((tmp_path / "out" / "attention_grid.png").read_bytes())) as image:
        assert not_blank(image)[0] > 0.05


def test_pruned_heads_are_left_out_not_shifted(small_checkpoint, tmp_path):
    answerer = QuestionAnswerer.from_pretrained(small_checkpoint, linear_backend="aten")
    if not hasattr(answerer.model, "prune_heads"):
        pytest.skip("this model has no prune_heads")
    answerer.model.prune_heads({0: [1, 3], 1: [0, 1, 2, 3]})  # layer 1 loses every head
    sidecar = write_explanation(answerer, QUESTION, CONTEXT, tmp_path / "out").explanation
    weights = sidecar["attention"]["weights"]
    assert [[cell is None for cell in row] for row in weights] == [[False, True, False, True], [True] * 4]
    with torch.inference_mode():
        output = answerer.model(torch.tensor([sidecar["window"]["ids"]]), output_attentions=True)
    kept = output.attentions[0][0][:, sidecar["attention"]["queries"]][:, :, sidecar["attention"]["keys"]]
    torch.testing.assert_close(torch.tensor([weights[0][0], weights[0][2]]), kept, atol=TOLERANCE, rtol=0)
    assert sidecar["selected_head"]["layer"] == 0 and sidecar["selected_head"]["head"] in (0, 2)
    with pytest.raises(ValueError, match=r"head 0\.1 has been pruned"):
        explain(answerer, QUESTION, CONTEXT, head=(0, 1))


def truncated(answerer: QuestionAnswerer, blocks: int) -> QuestionAnswerer:
    """The same answerer with only the model's first ``blocks`` blocks: its output is the span head
    read after block ``blocks`` (DistilBERT has no final norm), which is what the lens reads there."""
    model = copy.deepcopy(answerer.model)
    model.distilbert.transformer.layer = torch.nn.ModuleList(list(model.distilbert.transformer.layer)[:blocks])
    return QuestionAnswerer(model, answerer.tokenizer)


@pytest.mark.parametrize("windows", [{}, {"max_seq_len": 24, "doc_stride": 6}], ids=["one window", "windows"])
def test_logit_lens_answers_as_the_pipeline_would_at_each_depth(small_checkpoint, windows):
    """At every depth the lens's answer is the pipeline's own answer from a model cut after that block,
    so at the last block it is the answer, ranked 1. (The chosen token span need not rank 1 among the
    raw spans: word alignment and merging equal texts change the order, which the old lens ignored.)"""
    answerer = QuestionAnswerer.from_pretrained(small_checkpoint, linear_backend="aten")
    lens = explain(answerer, QUESTION, CONTEXT, **windows)["logit_lens"]
    answer = answerer(QUESTION, CONTEXT, **windows)
    for depth in range(len(lens["layers"])):
        cut = truncated(answerer, depth)(QUESTION, CONTEXT, **windows)
        assert lens["stage_answer"][depth] == cut["answer"], depth
        assert lens["stage_score"][depth] == pytest.approx(cut["score"], rel=1e-5), depth
        assert (lens["answer_rank"][depth] == 1) == (cut["answer"].lower() == answer["answer"].lower()), depth
    assert lens["answer_rank"][-1] == 1 and lens["answer_score"][-1] == pytest.approx(answer["score"], rel=1e-5)


def test_logit_lens_ranks_the_answer_first_where_the_token_span_is_not(small_checkpoint):
    """The case that misled: the chosen token span is not the best raw span at the last block, yet it
    is the answer (widened to words, merged with equal texts); the answer's curve says rank 1 there."""
    answerer = QuestionAnswerer.from_pretrained(small_checkpoint, linear_backend="aten")
    context = (
        "The Hubble Space Telescope was launched into low Earth orbit on 24 April 1990 by the Space Shuttle "
        "Discovery. It is not the first space telescope, but it is one of the largest and most versatile."
    )
    questions = ["Which space shuttle carried Hubble into orbit?", "What is Hubble?", "Is it the first?"]
    span_ranks = []
    for question in questions:
        lens = explain(answerer, question, context)["logit_lens"]
        assert lens["answer_rank"][-1] == 1 and lens["stage_answer"][-1] == answerer(question, context)["answer"]
        span_ranks.append(lens["span_rank"][-1])
    assert max(span_ranks) > 1, f"no question shows the difference ({span_ranks}): add others"


def test_title_gives_three_significant_digits_and_says_what_the_score_is(explained):
    from distilqa.explain import _title

    _, sidecar = explained
    sidecar = {
        **sidecar,
        "answer": {**sidecar["answer"], "score": 0.0038372},
        "span": {**sidecar["span"], "score": 2.5e-5},
    }
    title = _title(sidecar)
    assert "score 0.00384" in title and "summed over" in title and "this span's own 2.5e-05" in title


def test_attention_grid_labels_tokens_and_has_a_colour_bar(explained):
    """Rows labelled with [CLS] and the question's tokens, columns with the context's (thinned, the
    span's always), and a colour bar."""
    import matplotlib.pyplot as pyplot

    from distilqa.explain import _draw_attention_grid

    _, sidecar = explained
    tokens = sidecar["window"]["tokens"]
    figure = pyplot.figure(figsize=FIGURE_SIZES["attention_grid"], dpi=DPI)
    try:
        _draw_attention_grid(figure, sidecar)
        grid = [ax for ax in figure.axes if ax.get_images()]
        layers, heads = len(sidecar["attention"]["weights"]), len(sidecar["attention"]["weights"][0])
        left = [ax for ax in grid if ax.get_subplotspec().colspan.start == 0]
        bottom = [ax for ax in grid if ax.get_subplotspec().rowspan.start == layers - 1]
        queries = [tokens[i] for i in sidecar["attention"]["queries"]]
        for ax in left:
            labels = [label.get_text() for label in ax.get_yticklabels()]
            assert labels and set(labels) <= set(queries) and labels[0] == "[CLS]"
        span = sidecar["span"]
        span_tokens = [tokens[i] for i in range(span["start_token"], span["end_token"] + 1)]
        for ax in bottom:
            labels = [label.get_text() for label in ax.get_xticklabels()]
            assert 0 < len(labels) <= len(sidecar["attention"]["keys"])
            assert span_tokens[0] in labels and span_tokens[-1] in labels
        assert len(left) == layers and len(bottom) == heads
        assert len(figure.axes) == layers * heads + 1  # the colour bar
        assert figure.axes[-1].get_ylabel() == "attention weight"
    finally:
        pyplot.close(figure)


def test_output_folder_follows_the_output_policy(small_checkpoint, tmp_path):
    """An existing folder is refused (before any work) unless overwrite; then replaced whole."""
    answerer = QuestionAnswerer.from_pretrained(small_checkpoint, linear_backend="aten")
    out = tmp_path / "pictures"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        write_explanation(answerer, QUESTION, CONTEXT, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = write_explanation(answerer, QUESTION, CONTEXT, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in result.files.values())
    assert not [p for p in tmp_path.iterdir() if p.name != "pictures"], "a temporary folder was left behind"
