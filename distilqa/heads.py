"""Attention heads: how much each one matters, and what removing them costs.

Michel, Levy and Neubig (2019), "Are Sixteen Heads Really Better than One?", measure a head's
importance as the expected absolute gradient of the loss with respect to a gate on its output:

    I(layer, head) = E_x | dL(x) / d xi(layer, head) |      xi: the model's ``head_mask``, all ones

over a sample of data, here the span loss on gold windows of a SQuAD file (as in training). The
gradient is taken per batch of windows (``batch_size=1``: per window, the paper's definition);
the paper then normalises each layer's scores by their L2 norm, which :func:`pruning_order`
follows. Pruning heads from least to most important and scoring the pruned model gives the
EM/F1-versus-heads-pruned curve; pruning from the most important first shows what the order buys.

``head_report`` writes a folder holding ``importance.json`` and ``importance.png`` (a layers x heads
heatmap) and ``pruning_curve.json`` and ``pruning_curve.png``, whole or not at all; the pictures need
matplotlib (the ``explain`` extra).
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from distilqa.files import atomic_write, check_output, write_json
from distilqa.model import DistilBertForQuestionAnswering, span_loss
from distilqa.pipeline import QuestionAnswerer
from distilqa.plotting import require_matplotlib, save_figure
from distilqa.squad import SquadQuestion, evaluate, predict
from distilqa.tokenization import QuestionContextTokenizer
from distilqa.train import collate, read_training_questions, span_logits, training_windows
from distilqa.validate import at_least, positive_int
from distilqa.weights import load_checkpoint

REPORT_FILES = ("importance.json", "importance.png", "pruning_curve.json", "pruning_curve.png")
Head = tuple[int, int]  # (layer, head), heads numbered as in the unpruned layer


@dataclass
class WindowingOptions:
    max_seq_len: int = 384
    doc_stride: int = 128
    batch_size: int = 32


def head_importance(
    model: DistilBertForQuestionAnswering,
    tokenizer: QuestionContextTokenizer,
    questions: Sequence[SquadQuestion],
    options: WindowingOptions | None = None,
    progress: bool = False,
) -> Tensor:
    """Michel et al.'s importance of every head: (n_layers, n_heads) float32, the mean over batches
    of |d loss / d head_mask|; NaN for heads already pruned. The model runs in eval mode (no dropout)
    and its parameters are not changed."""
    options = options or WindowingOptions()
    windows = training_windows(tokenizer, questions, options.max_seq_len, options.doc_stride)
    config = model.config
    head_mask = torch.ones(config.n_layers, config.n_heads, device=model.device, requires_grad=True)
    total = torch.zeros(config.n_layers, config.n_heads)
    was_training = model.training
    model.eval()
    batches = range(0, len(windows), options.batch_size)
    for first in tqdm(batches, unit="batch", disable=not progress, desc="head importance"):
        batch = windows[first : first + options.batch_size]
        input_ids, attention_mask, starts, ends = (t.to(model.device) for t in collate(batch, tokenizer.pad_token_id))
        start_logits, end_logits = span_logits(model, input_ids, attention_mask, head_mask)  # (batch, seq) each
        (gradient,) = torch.autograd.grad(span_loss(start_logits, end_logits, starts, ends), head_mask)
        total += gradient.abs().float().cpu()  # (n_layers, n_heads)
    model.train(was_training)
    importance = total / len(batches)
    for layer, heads in config.pruned_heads.items():
        importance[layer, heads] = float("nan")
    return importance


def pruning_order(importance: Tensor, normalize_by_layer: bool = True) -> list[Head]:
    """Heads from least to most important (pruned heads, NaN, left out). With ``normalize_by_layer``
    each layer's scores are divided by their L2 norm first, as Michel et al. recommend."""
    scores = importance.clone()
    if normalize_by_layer:
        norms = scores.nan_to_num(0.0).norm(dim=1, keepdim=True)  # (n_layers, 1)
        scores = scores / norms.clamp_min(1e-20)
    heads = [(layer, head) for layer in range(scores.size(0)) for head in range(scores.size(1))]
    live = [h for h in heads if not torch.isnan(scores[h])]
    return sorted(live, key=lambda h: (scores[h].item(), h))


def as_prune_dict(heads: Sequence[Head]) -> dict[int, list[int]]:
    """[(layer, head), ...] -> {layer: [heads]}, the argument of ``prune_heads``."""
    pruned: dict[int, list[int]] = {}
    for layer, head in heads:
        pruned.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(pruned.items())}


def pruned_copy(model: DistilBertForQuestionAnswering, heads: Sequence[Head]) -> DistilBertForQuestionAnswering:
    """A copy of ``model`` with ``heads`` removed (the model itself is not changed)."""
    copied = copy.deepcopy(model)
    copied.prune_heads(as_prune_dict(heads))
    return copied


def squad_scores(
    model: DistilBertForQuestionAnswering,
    tokenizer: QuestionContextTokenizer,
    questions: Sequence[SquadQuestion],
    options: WindowingOptions | None = None,
) -> dict[str, float]:
    """EM and F1 of ``model`` answering ``questions`` through the pipeline."""
    options = options or WindowingOptions()
    answerer = QuestionAnswerer(model, tokenizer, batch_size=options.batch_size)
    ask = functools.partial(answerer, max_seq_len=options.max_seq_len, doc_stride=options.doc_stride)
    scores = evaluate(questions, predict(ask, questions))
    return {"exact_match": round(scores.exact_match, 4), "f1": round(scores.f1, 4)}


def pruning_curve(
    model: DistilBertForQuestionAnswering,
    tokenizer: QuestionContextTokenizer,
    questions: Sequence[SquadQuestion],
    order: Sequence[Head],
    points: int = 13,
    options: WindowingOptions | None = None,
    progress: bool = False,
) -> list[dict]:
    """EM and F1 after pruning the first k heads of ``order``, for ``points`` values of k from 0 to
    all of them, evenly spaced and always including half: ``[{"heads_pruned", "exact_match", "f1"}]``.
    ``points`` is at least 2 (none pruned, all pruned)."""
    at_least("points", points, 2)
    counts = sorted({round(i * len(order) / (points - 1)) for i in range(points)} | {len(order) // 2})
    curve = []
    for k in tqdm(counts, unit="point", disable=not progress, desc="pruning curve"):
        scores = squad_scores(pruned_copy(model, order[:k]), tokenizer, questions, options)
        curve.append({"heads_pruned": k, **scores})
    return curve


def head_report(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    limit: int | None = None,
    points: int = 13,
    options: WindowingOptions | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    overwrite: bool = False,
) -> dict:
    """Importance of every head of the checkpoint at ``model_path`` on the SQuAD file ``data`` (its
    first ``limit`` questions), and EM/F1 as heads are pruned least important first (and, for
    comparison, most important first), on ``device``. Writes the folder ``out`` holding
    :data:`REPORT_FILES`, whole once everything is done; an existing ``out`` is replaced only with
    ``overwrite``. Returns what the JSON files hold."""
    if limit is not None:
        positive_int("limit", limit)
    at_least("points", points, 2)
    out = check_output(out, overwrite=overwrite, inputs=[data, model_path], directory=True)
    pyplot = require_matplotlib("distilqa heads")  # before the work: say at once what to install
    options = options or WindowingOptions()
    questions = read_training_questions(data)[:limit]
    loaded = load_checkpoint(DistilBertForQuestionAnswering, model_path, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    importance = head_importance(model, tokenizer, questions, options, progress)
    order = pruning_order(importance)
    report = {
        "model": str(model_path),
        "data": str(data),
        "questions": len(questions),
        "layers": model.config.n_layers,
        "heads": model.config.n_heads,
        "definition": "mean over batches of |d span loss / d head_mask| (Michel et al. 2019); null: pruned",
        "importance": _table(importance),
        "importance_normalized_by_layer": _table(importance / importance.nan_to_num(0).norm(dim=1, keepdim=True)),
        "pruning_order": [list(head) for head in order],
    }
    least_first = pruning_curve(model, tokenizer, questions, order, points, options, progress)
    most_first = pruning_curve(model, tokenizer, questions, order[::-1], points, options, progress)
    curve = {"model": str(model_path), "least_important_first": least_first, "most_important_first": most_first}

    def write_folder(folder: Path) -> None:
        folder.mkdir()
        write_json(folder / "importance.json", report, indent=1)
        write_json(folder / "pruning_curve.json", curve, indent=1)
        plot_importance(pyplot, importance, folder / "importance.png", f"Head importance: {Path(model_path).name}")
        title = f"EM / F1 on {Path(data).name} ({len(questions)} questions) as attention heads are pruned"
        plot_curve(pyplot, curve, len(order), folder / "pruning_curve.png", title)

    atomic_write(out, write_folder)
    return {"importance": report, "pruning_curve": curve}


def plot_importance(pyplot, importance: Tensor, path: Path, title: str) -> None:
    """A layers x heads heatmap of the importance, each cell labelled with its value; pruned heads blank."""
    layers, heads = importance.shape
    figure, axes = pyplot.subplots(figsize=(1.0 + 0.8 * heads, 1.2 + 0.6 * layers), dpi=100)
    image = axes.imshow(importance.numpy(), cmap="viridis", aspect="auto")
    finite = importance[~torch.isnan(importance)]
    middle = float((finite.max() + finite.min()) / 2) if finite.numel() else 0.0
    for layer in range(layers):
        for head in range(heads):
            value = float(importance[layer, head])
            if value == value:  # not NaN
                color = "black" if value > middle else "white"
                axes.text(head, layer, f"{value:.3g}", ha="center", va="center", fontsize=8, color=color)
    axes.set_xticks(range(heads), [str(h) for h in range(heads)])
    axes.set_yticks(range(layers), [str(layer) for layer in range(layers)])
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="E |d loss / d head gate|")
    figure.tight_layout()
    save_figure(figure, path)


def plot_curve(pyplot, curve: dict, total_heads: int, path: Path, title: str) -> None:
    """EM and F1 against the number of heads pruned, in both orders; ``title`` names the data."""
    figure, axes = pyplot.subplots(figsize=(7.0, 4.5), dpi=100)
    for key, label, color in (
        ("least_important_first", "least important first", "#3182bd"),
        ("most_important_first", "most important first", "#e6550d"),
    ):
        x = [point["heads_pruned"] for point in curve[key]]
        axes.plot(x, [point["exact_match"] for point in curve[key]], "o-", color=color, label=f"EM, {label}")
        axes.plot(x, [point["f1"] for point in curve[key]], "--", color=color, alpha=0.6, label=f"F1, {label}")
    axes.set_xlabel(f"heads pruned (of {total_heads})")
    axes.set_ylabel("score (%)")
    axes.set_ylim(-2, 102)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


def _table(values: Tensor) -> list[list[float | None]]:
    return [[None if v != v else round(v, 6) for v in row] for row in values.tolist()]
