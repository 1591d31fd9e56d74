"""Pictures of one answer: where the probability goes, where attention looks, and in which layer the
answer appears.

``explain`` runs the answerer's own model and tokenizer on one (question, context) pair and returns
every number it will draw, as plain JSON-able data:

- the start and end probabilities over the tokens of the window that holds the answer, computed as
  the pipeline computes them (tokens outside the context set to ``EXCLUDED_LOGIT``, then softmax);
- the attention weights of every layer and head from ``[CLS]`` and the question's tokens to the
  context's tokens (``output_attentions``), and one selected head in full;
- a "logit lens" on question answering: the model's own span head (``dropout``, ``qa_outputs``)
  applied to the hidden state after the embeddings and after each block (``output_hidden_states``).
  At each depth it reports what the pipeline would answer from there and the rank of the final
  answer among those answers, decoded exactly as the pipeline decodes (the same candidates per
  window, widened to words, equal texts summed over windows), so that at the last block the answer
  ranks first; and, before any merging, the rank of the chosen token span among all spans.

``write_explanation`` draws them (matplotlib, the ``explain`` extra) and writes into one folder:
``probabilities.png``, ``attention_grid.png``, ``attention_head.png``, ``logit_lens.png``,
``logit_lens.json``, ``explanation.json`` (every plotted number) and ``explanation.html``, one
self-contained page holding all of them (images inlined, nothing fetched when it is opened).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distilqa.files import atomic_write, check_output
from distilqa.options import DEFAULT_OPTIONS
from distilqa.pipeline import (
    EXCLUDED_LOGIT,
    QuestionAnswerer,
    _characters,
    decode_spans,
    merge_answers,
)
from distilqa.plotting import require_matplotlib

DPI = 100
# Figure sizes in inches at DPI dots per inch; PNGs are saved without "tight" cropping, so each file
# is exactly this size times DPI pixels.
FIGURE_SIZES = {
    "probabilities": (14.0, 6.0),
    "attention_grid": (16.0, 9.0),
    "attention_head": (10.0, 10.0),
    "logit_lens": (11.0, 6.0),
}
ANSWER_COLOR = "#e6550d"
OTHER_COLOR = "#3182bd"


@dataclass
class ExplainResult:
    explanation: dict  # every plotted number (what explanation.json holds)
    files: dict[str, Path]  # name -> written file


@torch.inference_mode()
def explain(
    answerer: QuestionAnswerer,
    question: str,
    context: str,
    max_answer_len: int = DEFAULT_OPTIONS.max_answer_len,
    max_seq_len: int | None = DEFAULT_OPTIONS.max_seq_len,
    doc_stride: int | None = DEFAULT_OPTIONS.doc_stride,
    head: tuple[int, int] | None = None,
) -> dict:
    """Everything ``write_explanation`` draws, for one question about one context.

    The answer is the pipeline's (``answerer(question, context)``). Its window is the one whose best
    candidate span inside the answer's characters scores highest (``decode_spans``, as the pipeline
    ranks spans); that span is "the chosen span". ``head`` = (layer, head), 0-based, picks the head
    drawn in full; by default the head whose ``[CLS]`` and question rows put the most attention on the
    chosen span. Lists of per-token numbers index the window's tokens (``window.tokens``).
    """
    # The pipeline's defaults (QuestionAnswerer.__call__), made explicit so the windows here are its windows.
    max_seq_len = min(384, answerer.tokenizer.model_max_length) if max_seq_len is None else max_seq_len
    doc_stride = min(128, max_seq_len // 2) if doc_stride is None else doc_stride
    model = answerer.model
    config = model.config
    if head is not None and not (0 <= head[0] < config.n_layers and 0 <= head[1] < config.n_heads):
        raise ValueError(
            f"head {head[0]}.{head[1]} does not exist: layers are 0..{config.n_layers - 1}, "
            f"heads 0..{config.n_heads - 1} (give LAYER.HEAD, 0-based)"
        )
    answer = answerer(question, context, max_answer_len=max_answer_len, max_seq_len=max_seq_len, doc_stride=doc_stride)
    encodings = answerer.tokenizer.encode_windows([question], [context], max_seq_len, doc_stride)[0]
    cls_id = answerer.tokenizer.cls_token_id
    candidates_per_window = DEFAULT_OPTIONS.candidates_per_window  # the pipeline's, for top_k = 1

    best = None  # (score, window index, start token, end token, model output)
    hidden_states = []  # per window: the hidden state after the embeddings and each block, (1, seq, dim) each
    for index, encoding in enumerate(encodings):
        ids = torch.tensor([encoding.ids], device=model.device)  # (1, seq)
        output = model(ids, output_hidden_states=True, output_attentions=True)
        hidden_states.append(output.hidden_states)
        allowed = _allowed(encoding, cls_id)  # (seq,)
        start_logits, end_logits = output.start_logits.float().cpu(), output.end_logits.float().cpu()  # (1, seq)
        spans, _ = decode_spans(start_logits, end_logits, allowed[None], max_answer_len, candidates_per_window)[0]
        for score, start, end in spans:
            inside = answer["start"] <= encoding.offsets[start][0] and encoding.offsets[end][1] <= answer["end"]
            if inside and (best is None or score > best[0]):
                best = (score, index, start, end, output)
    if best is None:  # only when every span had probability 0 and the pipeline fell back to ""
        raise ValueError("the model gives no span a non-zero probability for this pair: nothing to explain")
    span_score, window_index, start, end, output = best
    encoding = encodings[window_index]
    allowed = _allowed(encoding, cls_id)  # (seq,)
    p_start, p_end = _probabilities(output.start_logits[0], output.end_logits[0], allowed)  # (seq,) each

    questions = [i for i, sid in enumerate(encoding.sequence_ids) if sid == 0]
    queries = [0, *questions]  # [CLS] first, then the question's tokens
    keys = [i for i, sid in enumerate(encoding.sequence_ids) if sid == 1]  # the context's tokens
    attentions = _attention_maps(model, output.attentions)  # (layers, heads, seq, seq), NaN for pruned heads
    present = ~attentions[:, :, 0, 0].isnan()  # (layers, heads)
    grid = attentions[:, :, queries][:, :, :, keys]  # (layers, heads, queries, context)
    # Mass on the chosen span, averaged over the query rows: what the default head maximises.
    on_answer = attentions[:, :, queries, start : end + 1].sum(-1).mean(-1)  # (layers, heads)
    if head is None:
        flat = int(on_answer.nan_to_num(-1.0).argmax())
        head, reason = (
            (flat // config.n_heads, flat % config.n_heads),
            "most attention from [CLS] and question on the span",
        )
    elif not present[head]:
        raise ValueError(f"head {head[0]}.{head[1]} has been pruned from this model: choose another --head")
    else:
        reason = "chosen with --head"
    layer_index, head_index = head

    return {
        "question": question,
        "context": context,
        "answer": answer,
        "settings": {"max_answer_len": max_answer_len, "max_seq_len": max_seq_len, "doc_stride": doc_stride},
        "model": {"n_layers": config.n_layers, "n_heads": config.n_heads, "dim": config.dim},
        "window": {
            "index": window_index,
            "count": len(encodings),
            "tokens": list(encoding.tokens),
            "ids": list(encoding.ids),
            "offsets": [list(pair) for pair in encoding.offsets],
            "sequence_ids": [-1 if sid is None else sid for sid in encoding.sequence_ids],  # -1: special token
            "allowed": allowed.tolist(),
        },
        "span": {
            "start_token": start,
            "end_token": end,
            "score": span_score,
            "start_char": encoding.offsets[start][0],
            "end_char": encoding.offsets[end][1],
        },
        "probabilities": {"start": p_start.tolist(), "end": p_end.tolist(), "no_answer": float(p_start[0] * p_end[0])},
        "attention": {  # a pruned head's entries are null
            "queries": queries,
            "keys": keys,
            "weights": [
                [grid[layer, h].tolist() if present[layer, h] else None for h in range(config.n_heads)]
                for layer in range(config.n_layers)
            ],
            "on_span": [[float(v) if v == v else None for v in row] for row in on_answer.tolist()],
        },
        "selected_head": {
            "layer": layer_index,
            "head": head_index,
            "reason": reason,
            "weights": attentions[layer_index, head_index].tolist(),
        },
        "logit_lens": {
            **_logit_lens(model, output.hidden_states, allowed, start, end, max_answer_len),
            **_answer_lens(model, context, encodings, hidden_states, answer, max_answer_len, cls_id),
        },
    }


def _attention_maps(model, attentions: Sequence[Tensor | None]) -> Tensor:
    """Every layer's attention weights of the one window, (layers, n_heads, seq, seq) float32 on the
    CPU, with each head at its unpruned number and NaN where a head has been pruned."""
    seq = next(a for a in attentions if a is not None).size(-1)
    config = model.config
    maps = torch.full((config.n_layers, config.n_heads, seq, seq), float("nan"))
    for layer, (block, weights) in enumerate(zip(model.distilbert.transformer.layer, attentions)):
        if weights is not None:  # None: every head of this layer was pruned
            kept = getattr(block.attention, "heads", list(range(config.n_heads)))  # unpruned numbers
            maps[layer, kept] = weights[0].float().cpu()
    return maps


def _allowed(encoding, cls_id: int) -> Tensor:
    """Tokens that may be part of an answer, as the pipeline decides: the context's, and [CLS] for
    "no answer". (seq,) bool"""
    return torch.tensor([sid == 1 or token == cls_id for sid, token in zip(encoding.sequence_ids, encoding.ids)])


def _probabilities(start_logits: Tensor, end_logits: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """The pipeline's start and end probabilities (see decode_spans): excluded tokens get
    EXCLUDED_LOGIT, then a softmax over the window. (seq,) each, float32 on the CPU."""
    return tuple(
        F.softmax(logits.float().cpu().masked_fill(~allowed, EXCLUDED_LOGIT), dim=-1)
        for logits in (start_logits, end_logits)
    )


def _logit_lens(
    model, hidden_states: Sequence[Tensor], allowed: Tensor, start: int, end: int, max_answer_len: int
) -> dict:
    """Apply the model's span head (its dropout and ``qa_outputs``) to the hidden state after the
    embeddings and after each block, (1, seq, dim) each, and rank the chosen span at every depth.
    Ranks count from 1; the last entry is the model's real output."""
    seq = int(allowed.numel())
    layers, span_ranks, start_ranks, end_ranks, p_starts, p_ends, span_scores = [], [], [], [], [], [], []
    for depth, hidden in enumerate(hidden_states):
        logits = model.qa_outputs(model.dropout(hidden))  # (1, seq, 2)
        start_logits, end_logits = logits.float().cpu().unbind(-1)  # (1, seq) each
        spans, _ = decode_spans(start_logits, end_logits, allowed[None], max_answer_len, seq * max_answer_len)[0]
        ranking = [(s, e) for _, s, e in spans]
        p_start, p_end = _probabilities(start_logits[0], end_logits[0], allowed)  # (seq,) each
        answerable = allowed.clone()
        answerable[0] = False  # [CLS] is "no answer", never a start or an end
        layers.append("embeddings" if depth == 0 else f"block {depth}")
        span_ranks.append(ranking.index((start, end)) + 1 if (start, end) in ranking else None)
        start_ranks.append(int((p_start[answerable] > p_start[start]).sum()) + 1)
        end_ranks.append(int((p_end[answerable] > p_end[end]).sum()) + 1)
        p_starts.append(float(p_start[start]))
        p_ends.append(float(p_end[end]))
        span_scores.append(float(p_start[start] * p_end[end]))
    return {
        "layers": layers,
        "span_rank": span_ranks,
        "start_rank": start_ranks,
        "end_rank": end_ranks,
        "start_probability": p_starts,
        "end_probability": p_ends,
        "span_score": span_scores,
        "spans_ranked": len(ranking),
    }


def _answer_lens(
    model, context: str, encodings: list, hidden_states: list, answer: dict, max_answer_len: int, cls_id: int
) -> dict:
    """At each depth, the pipeline's decoding of the span head's logits over every window: the answer
    it would give (``stage_answer``, ``stage_score``), and the final answer's rank and merged score
    there (None where it is not among the candidates). ``hidden_states``: per window, per depth,
    (1, seq, dim)."""
    # The pipeline's order of windows (longest first, stable), in which it gathers and merges candidates.
    order = sorted(range(len(encodings)), key=lambda w: -len(encodings[w].ids))
    text = answer["answer"].lower()
    stage_answers, stage_scores, answer_ranks, answer_scores = [], [], [], []
    for depth in range(len(hidden_states[0])):
        candidates = []
        for w in order:
            logits = model.qa_outputs(model.dropout(hidden_states[w][depth])).float().cpu()  # (1, seq, 2)
            allowed = _allowed(encodings[w], cls_id)[None]  # (1, seq)
            spans, _ = decode_spans(*logits.unbind(-1), allowed, max_answer_len, DEFAULT_OPTIONS.candidates_per_window)[
                0
            ]
            align = DEFAULT_OPTIONS.align_to_words
            candidates.extend((score, *_characters(encodings[w], s, e, align)) for score, s, e in spans)
        ranked = merge_answers(context, candidates, None, top_k=len(candidates) + 1)
        texts = [item["answer"].lower() for item in ranked]
        rank = texts.index(text) + 1 if text in texts else None
        stage_answers.append(ranked[0]["answer"])
        stage_scores.append(ranked[0]["score"])
        answer_ranks.append(rank)
        answer_scores.append(None if rank is None else ranked[rank - 1]["score"])
    return {
        "stage_answer": stage_answers,
        "stage_score": stage_scores,
        "answer_rank": answer_ranks,
        "answer_score": answer_scores,
        "candidates_per_window": DEFAULT_OPTIONS.candidates_per_window,
    }


def write_explanation(
    answerer: QuestionAnswerer,
    question: str,
    context: str,
    out_dir: str | os.PathLike,
    label: str = "",
    overwrite: bool = False,
    option: str = "--output",
    **options,
) -> ExplainResult:
    """Explain one answer (see :func:`explain`, which takes ``options``) and write the pictures, the
    JSON sidecars and the HTML page into the folder ``out_dir``. ``label`` is printed on every picture
    (the model's name, "random weights", ...). The output policy of :mod:`distilqa.files`: an existing
    ``out_dir`` is refused unless ``overwrite`` (then replaced whole), checked before any work, and the
    folder appears complete or not at all. ``option`` names ``out_dir`` in messages."""
    pyplot = require_matplotlib("distilqa explain")
    out_dir = check_output(out_dir, overwrite=overwrite, directory=True, option=option)
    explanation = explain(answerer, question, context, **options)
    explanation["label"] = label
    explanation["figures"] = {
        name: {"file": f"{name}.png", "width": round(width * DPI), "height": round(height * DPI)}
        for name, (width, height) in FIGURE_SIZES.items()
    }
    drawings = {
        "probabilities": _draw_probabilities,
        "attention_grid": _draw_attention_grid,
        "attention_head": _draw_attention_head,
        "logit_lens": _draw_logit_lens,
    }

    def write_folder(folder: Path) -> None:
        folder.mkdir()
        for name, draw in drawings.items():
            figure = pyplot.figure(figsize=FIGURE_SIZES[name], dpi=DPI)
            try:
                draw(figure, explanation)
                if label:
                    figure.text(0.995, 0.005, label, ha="right", va="bottom", fontsize=9, color="#b00000")
                figure.savefig(folder / f"{name}.png", format="png", dpi=DPI)
            finally:
                pyplot.close(figure)
        lens = {"label": label, "answer": explanation["answer"], "span": explanation["span"]}
        (folder / "logit_lens.json").write_text(
            json.dumps({**lens, **explanation["logit_lens"]}, indent=1), encoding="utf-8"
        )
        (folder / "explanation.json").write_text(json.dumps(explanation), encoding="utf-8")
        page = _html(explanation, {name: folder / f"{name}.png" for name in drawings})
        (folder / "explanation.html").write_text(page, encoding="utf-8")

    atomic_write(out_dir, write_folder)  # the folder appears whole: pictures, sidecars and page together
    files = {name: out_dir / f"{name}.png" for name in drawings}
    files.update(
        logit_lens_json=out_dir / "logit_lens.json",
        json=out_dir / "explanation.json",
        html=out_dir / "explanation.html",
    )
    return ExplainResult(explanation, files)


def _token_labels(explanation: dict, indices: Sequence[int]) -> list[str]:
    return [explanation["window"]["tokens"][i] for i in indices]


def _label_size(count: int, room: float = 900.0) -> float:
    """A tick label font size that lets ``count`` labels share ``room`` points."""
    return max(3.0, min(9.0, room / max(count, 1)))


def _title(explanation: dict) -> str:
    answer = explanation["answer"]
    window = explanation["window"]
    where = f"; window {window['index'] + 1} of {window['count']}" if window["count"] > 1 else ""
    return (
        f"Q: {explanation['question']}   A: {_short(answer['answer'], 60)!r}\nscore {answer['score']:.3g} (the "
        f"pipeline's: p_start × p_end summed over every span giving this text, in every window); this span's "
        f"own {explanation['span']['score']:.3g}{where}"
    )


def _draw_probabilities(figure, explanation: dict) -> None:
    """Two bar charts, start and end probability of each context token, the chosen span in orange."""
    keys = explanation["attention"]["keys"]
    span = explanation["span"]
    labels = _token_labels(explanation, keys)
    colors = [ANSWER_COLOR if span["start_token"] <= i <= span["end_token"] else OTHER_COLOR for i in keys]
    axes = figure.subplots(2, 1, sharex=True)
    for ax, name in zip(axes, ("start", "end")):
        probabilities = [explanation["probabilities"][name][i] for i in keys]
        ax.bar(range(len(keys)), probabilities, color=colors, width=0.8)
        ax.set_ylabel(f"p({name})")
        ax.set_xlim(-0.6, len(keys) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(keys)))
    axes[1].set_xticklabels(labels, rotation=90, fontsize=_label_size(len(keys), 1200))
    for tick, color in zip(axes[1].get_xticklabels(), colors):
        tick.set_color(color)
    figure.suptitle(
        f"{_title(explanation)}\nstart and end probabilities over the context tokens; chosen span in orange; "
        f"p(no answer) = p_start[CLS] * p_end[CLS] = {explanation['probabilities']['no_answer']:.3g}",
        fontsize=10,
    )
    figure.subplots_adjust(left=0.06, right=0.99, top=0.86, bottom=0.2, hspace=0.08)


def thinned(count: int, room_points: float, size: float, keep: Sequence[int] = ()) -> list[int]:
    """Indices of ``count`` labels of font ``size`` that fit side by side in ``room_points`` without
    colliding: evenly spaced, plus every index of ``keep``, dropping the spaced ones too near those."""
    step = max(1, math.ceil(count * size * 1.2 / max(room_points, 1.0)))
    kept = set(keep)
    chosen = [i for i in range(0, count, step) if all(abs(i - k) >= step for k in kept)]
    return sorted(kept.union(chosen))


def _draw_attention_grid(figure, explanation: dict) -> None:
    """A layer x head grid: rows are [CLS] and the question's tokens, columns the context's tokens,
    labelled on the outer cells (the context thinned to fit, the span's ends always), one colour bar."""
    weights = explanation["attention"]["weights"]  # [layer][head] -> (queries, context) lists, None if pruned
    layers, heads = len(weights), len(weights[0])
    selected = (explanation["selected_head"]["layer"], explanation["selected_head"]["head"])
    keys = explanation["attention"]["keys"]
    queries = explanation["attention"]["queries"]
    span = explanation["span"]
    span_columns = [c for c, i in enumerate(keys) if span["start_token"] <= i <= span["end_token"]]
    axes = figure.subplots(layers, heads, squeeze=False)
    figure.subplots_adjust(left=0.07, right=0.93, top=0.86, bottom=0.1, wspace=0.06, hspace=0.1)
    vmax = max(max(map(max, cell)) for row in weights for cell in row if cell is not None)
    # Room of one cell in points, to thin the labels: the figure's size times the subplot fractions.
    width, height = FIGURE_SIZES["attention_grid"]
    cell_width = 72 * width * 0.86 / heads / 1.06
    cell_height = 72 * height * 0.76 / layers / 1.1
    row_size = max(3.0, min(6.0, cell_height / max(len(queries), 1) / 1.2))
    column_size = 5.5
    rows = thinned(len(queries), cell_height, row_size)
    # The span's first and last tokens always; others evenly spaced where they fit.
    columns = thinned(len(keys), cell_width, column_size, keep=span_columns[:1] + span_columns[-1:])
    image = None
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            cell = weights[layer][head]
            if cell is None:
                ax.text(0.5, 0.5, "pruned", ha="center", va="center", fontsize=8, color="gray", transform=ax.transAxes)
            else:
                image = ax.imshow(cell, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if span_columns and cell is not None:  # the chosen span's columns, marked under each map
                ax.axvspan(span_columns[0] - 0.5, span_columns[-1] + 0.5, ymin=0, ymax=0.04, color=ANSWER_COLOR)
            if (layer, head) == selected:
                for side in ax.spines.values():
                    side.set_edgecolor("red")
                    side.set_linewidth(2.5)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
                ax.set_yticks(rows)
                ax.set_yticklabels([explanation["window"]["tokens"][queries[r]] for r in rows], fontsize=row_size)
            if layer == layers - 1:
                ax.set_xticks(columns)
                ax.set_xticklabels(
                    [explanation["window"]["tokens"][keys[c]] for c in columns], rotation=90, fontsize=column_size
                )
                for tick, c in zip(ax.get_xticklabels(), columns):
                    if c in span_columns:
                        tick.set_color(ANSWER_COLOR)
            ax.tick_params(length=1.5, pad=1)
    if image is not None:
        bar = figure.colorbar(image, cax=figure.add_axes((0.945, 0.1, 0.012, 0.76)), format="%.2g")
        bar.set_label("attention weight", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    figure.suptitle(
        f"{_title(explanation)}\nattention from [CLS] and the question's tokens (rows) to the context's tokens "
        f"(columns, thinned to fit; the span's in orange); red frame: the head drawn in full",
        fontsize=10,
    )


def _draw_attention_head(figure, explanation: dict) -> None:
    """One head's full attention map over the window's tokens (rows attend to columns)."""
    selected = explanation["selected_head"]
    weights = torch.tensor(selected["weights"]).numpy()  # (seq, seq)
    labels = _token_labels(explanation, range(weights.shape[0]))
    ax = figure.add_subplot(1, 1, 1)
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, interpolation="nearest")
    size = _label_size(len(labels), 700)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=size)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=size)
    span = explanation["span"]
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for i, tick in enumerate(tick_labels):
            if span["start_token"] <= i <= span["end_token"]:
                tick.set_color(ANSWER_COLOR)
    ax.set_xlabel("attended token (key)")
    ax.set_ylabel("attending token (query)")
    figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02, format="%.3g")
    figure.suptitle(
        f"{_title(explanation)}\nlayer {selected['layer']}, head {selected['head']} ({selected['reason']}); "
        f"chosen span in orange",
        fontsize=10,
    )
    figure.subplots_adjust(left=0.12, right=0.93, top=0.9, bottom=0.12)


def _draw_logit_lens(figure, explanation: dict) -> None:
    """Ranks when the span head reads each depth: the answer's, decoded as the pipeline decodes, and,
    before any merging, the chosen token span's and its start's and end's."""
    lens = explanation["logit_lens"]
    depths = range(len(lens["layers"]))
    ax = figure.add_subplot(1, 1, 1)

    def ranks(values: list) -> list[float]:
        return [float("nan") if rank is None else rank for rank in values]

    answer_label = (
        f"the answer among the answers the pipeline would give ({lens['candidates_per_window']} spans per "
        "window, widened to words, equal texts summed)"
    )
    ax.plot(depths, ranks(lens["answer_rank"]), "o-", color=ANSWER_COLOR, label=answer_label, linewidth=2.5)
    ax.plot(
        depths,
        ranks(lens["span_rank"]),
        "D-",
        color="#756bb1",
        label=f"the chosen token span among all {lens['spans_ranked']} spans (p_start × p_end, not merged)",
    )
    ax.plot(depths, lens["start_rank"], "s--", color=OTHER_COLOR, label="its start token (p_start)")
    ax.plot(depths, lens["end_rank"], "^--", color="#31a354", label="its end token (p_end)")
    everything = ranks(lens["answer_rank"]) + ranks(lens["span_rank"]) + lens["start_rank"] + lens["end_rank"]
    worst = max(rank for rank in everything if rank == rank)  # no NaN
    ax.set_yscale("log")
    ax.set_ylim(worst * 1.5, 0.8)  # rank 1 at the top
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t <= worst * 1.5]
    ax.set_yticks(ticks)
    ax.set_yticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xticks(list(depths))
    # Under each stage, what the pipeline would answer from there.
    answers = [
        "the answer" if rank == 1 else repr(_short(text, 16))
        for rank, text in zip(lens["answer_rank"], lens["stage_answer"])
    ]
    ax.set_xticklabels([f"{layer}\n→ {answer}" for layer, answer in zip(lens["layers"], answers)], fontsize=8)
    ax.set_ylabel("rank (1 = best)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    figure.suptitle(
        f"{_title(explanation)}\nlogit lens: the span head applied to the hidden state after each stage; "
        "missing points: not among the pipeline's candidates; under each stage, what it would answer",
        fontsize=9,
    )
    figure.subplots_adjust(left=0.08, right=0.98, top=0.8, bottom=0.27)


def _short(text: str, length: int = 18) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def _html(explanation: dict, images: dict[str, Path]) -> str:
    """One page, no external resource: images as data: URLs, tokens as text coloured by probability."""
    escape = html.escape
    window = explanation["window"]
    span = explanation["span"]
    probabilities = explanation["probabilities"]
    keys = explanation["attention"]["keys"]
    top = {name: max(probabilities[name][i] for i in keys) or 1.0 for name in ("start", "end")}

    def strip(name: str) -> str:
        cells = []
        for i in keys:
            p = probabilities[name][i]
            in_span = span["start_token"] <= i <= span["end_token"]
            # Transparent (0) to a light blue (the window's largest), light enough to read the token on.
            style = f"background: rgba(49,130,189,{0.7 * p / top[name]:.3f});"
            style += " outline: 2px solid #e6550d;" if in_span else ""
            cells.append(
                f'<span class="tok" style="{style}" title="p_{name} = {p:.4g}">{escape(window["tokens"][i])}</span>'
            )
        return " ".join(cells)

    lens = explanation["logit_lens"]
    lens_rows = "".join(
        f"<tr><td>{escape(layer)}</td><td>{'-' if span_rank is None else span_rank}</td><td>{start_rank}</td>"
        f"<td>{end_rank}</td><td>{score:.4g}</td></tr>"
        for layer, span_rank, start_rank, end_rank, score in zip(
            lens["layers"], lens["span_rank"], lens["start_rank"], lens["end_rank"], lens["span_score"]
        )
    )

    def image(name: str, alt: str) -> str:
        data = base64.b64encode(images[name].read_bytes()).decode("ascii")
        caption = escape(alt)
        source = f"data:image/png;base64,{data}"
        return f'<figure><img alt="{caption}" src="{source}"><figcaption>{caption}</figcaption></figure>'

    answer = explanation["answer"]
    selected = explanation["selected_head"]
    label = f'<p class="label">{escape(explanation["label"])}</p>' if explanation.get("label") else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>distilqa explain: {escape(explanation["question"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1500px; color: #222; }}
.tok {{ display: inline-block; margin: 2px 0; padding: 1px 3px; font-family: monospace; font-size: 15px; }}
.label {{ color: #b00000; font-weight: bold; }}
img {{ max-width: 100%; border: 1px solid #ccc; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
.answer {{ background: #fdd0a2; padding: 2px 4px; }}
</style></head><body>
<h1>distilqa explain</h1>
{label}
<p><b>Question:</b> {escape(explanation["question"])}</p>
<p><b>Answer:</b> <span class="answer">{escape(answer["answer"])}</span> (score {answer["score"]:.4g},
characters {answer["start"]}&ndash;{answer["end"]}; window {window["index"] + 1} of {window["count"]};
chosen span: tokens {span["start_token"]}&ndash;{span["end_token"]}, p_start &times; p_end = {span["score"]:.4g})</p>
<h2>Start and end probabilities</h2>
<p>Each context token of the window, shaded by its probability (darkest = the window's largest,
hover for the number); the chosen span is outlined. p(no answer) = {probabilities["no_answer"]:.4g}.</p>
<p><b>start</b><br>{strip("start")}</p>
<p><b>end</b><br>{strip("end")}</p>
{image("probabilities", "Start and end probabilities over the context tokens, the chosen span in orange")}
<h2>Attention</h2>
{image("attention_grid", "Every layer and head: attention from [CLS] and the question's tokens to the context")}
{image("attention_head", f"Layer {selected['layer']}, head {selected['head']} in full ({selected['reason']})")}
<h2>Logit lens</h2>
<p>The model's span head applied to the hidden state after each stage: the rank of the chosen span
(1 = what that stage alone would answer), of its start and of its end token.</p>
<table><tr><th>after</th><th>span rank</th><th>start rank</th><th>end rank</th><th>p_start &times; p_end</th></tr>
{lens_rows}</table>
{image("logit_lens", "Rank of the chosen span, layer by layer")}
<h2>Context</h2>
<p>{escape(explanation["context"])}</p>
<p>Every number drawn here is in explanation.json next to this page.</p>
</body></html>
"""


def parse_head(text: str | None) -> tuple[int, int] | None:
    """``"LAYER.HEAD"`` (0-based) -> (layer, head); None stays None."""
    if text is None:
        return None
    parts = text.split(".")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise ValueError(f"--head takes LAYER.HEAD, two 0-based numbers such as 5.3, got {text!r}")
    return int(parts[0]), int(parts[1])
