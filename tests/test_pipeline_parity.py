"""Answer-for-answer parity of QuestionAnswerer with the transformers 5.2 question-answering pipeline,
on every inference path.

Both run the ``peaked_checkpoint`` (random weights at the published configuration with a sharpened
span head, so that the best span has probability 0.01-0.63 as a trained model's would; with plain
random weights every span scores ~1e-4 and no score check could fail) and the same tokenizer files
(written by transformers). Questions: every 21st SQuAD v1.1 dev question (504, all 48 articles) plus
40 contexts of 2 to 3 windows made by joining paragraphs (544 pairs).

Paths, each against the transformers pipeline in float32 (the answers a user of the reference gets):

| path | pairs | options | identical (answer, start, end) | scores of identical answers |
| --- | --- | --- | --- | --- |
| packed fp32 (the default) | 544 | top_k 1 and 3, impossible off and on | MIN_IDENTICAL | SCORE_RTOL["float32"] |
| padded fp32 (``packed=False``) | 136 (every 4th) | top_k 3, impossible on | all | SCORE_RTOL["float32"] |
| bfloat16 | 136 (every 4th) | top_k 1 | MIN_IDENTICAL_SHARE | SCORE_RTOL["bfloat16"] |
| float16 (slow on most CPUs) | 34 (every 16th) | top_k 1 | MIN_IDENTICAL_SHARE | SCORE_RTOL["float16"] |
| int8 (PyTorch's layers, oneDNN's) | 136 (every 4th) | top_k 1 | MIN_IDENTICAL_SHARE | SCORE_RTOL (per path) |
| compiled fp32 (``compile=True``) | 48 | top_k 3 | identical to eager fp32 | SCORE_RTOL["compiled"] of eager |

A differing answer counts as explained only when it is a near tie measured in the run at hand: at
each rank where the two lists differ, our own scores of the two answers there (ours, and the
reference's, looked up in our own top-6 list) are within NEAR_TIE[path] of each other,
relatively. Nothing is explained by a blanket bound.

The model's forward does not depend on top_k or handle_impossible_answer, so each side's forward is
memoised by its exact inputs (``memoise_forward``): every option combination still runs the whole
tokenization and decoding code of both pipelines, and the test checks that the memo is used.
"""

from __future__ import annotations

import json
import time
import zipfile

import pytest
import torch
from conftest import SQUAD_FILE

from distilqa import linear
from distilqa.linear import onednn_available, onednn_int8_available
from distilqa.pipeline import QuestionAnswerer

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN")
needs_onednn_int8 = pytest.mark.skipif(not onednn_int8_available(), reason="no oneDNN int8 GEMM here, or no VNNI/AMX")

OPTIONS = [
    dict(top_k=1, handle_impossible_answer=False),
    dict(top_k=3, handle_impossible_answer=False),
    dict(top_k=1, handle_impossible_answer=True),
    dict(top_k=3, handle_impossible_answer=True),
]
# Relative score tolerance for answers that agree (|ours - reference| / reference), per path. Measured
# maxima on this project's machine (AMD EPYC with AVX512-BF16, 2 threads, torch 2.13, transformers
# 5.2), 2026-11-30: float32 packed 5.1e-5 (top_k 3; 4.1e-5 top_k 1), padded 5.0e-5; bfloat16 0.29;
# float16 0.028 (0.057 on twice the pairs); compiled vs eager float32 3.1e-5 to 4.2e-5. The tolerances are
# 2-3x those.
SCORE_RTOL = {"float32": 1.5e-4, "bfloat16": 0.6, "float16": 0.08, "compiled": 1.5e-4, "int8": 3.0, "int8-onednn": 0.8}
# Largest relative gap between the two answers of a rank where the lists differ that still counts as
# a near tie: the same scale as each path's own score error above.
NEAR_TIE = {"float32": 1.5e-4, "bfloat16": 0.6, "float16": 0.08, "int8": 1.0, "int8-onednn": 1.0}
# The full sample, packed fp32 (measured: 544/544 for each of the 4 option combinations).
MIN_IDENTICAL = {(o["top_k"], o["handle_impossible_answer"]): 544 for o in OPTIONS}
# Half precision against the fp32 reference, top_k 1. Measured: bfloat16 124/136 (the 12 others near
# ties, relative gaps 0 to 0.27; max relative score difference 0.44), float16 34/34, on the checkpoint
# with perturbed biases and LayerNorms (133/136 before, with zero biases). int8, top_k 1, 2026-12-02:
# PyTorch's dynamic layers ("int8") 115/136, max relative score difference 1.84; oneDNN's int8 GEMM with
# per-channel weights ("int8-onednn") 127/136, 0.40; the near ties' relative gaps up to 0.69.
MIN_IDENTICAL_SHARE = {"bfloat16": 0.88, "float16": 0.97, "int8": 0.8, "int8-onednn": 0.9}


def option_id(options: dict) -> str:
    return f"top_k={options['top_k']}-impossible={options['handle_impossible_answer']}"


def memoise_forward(module: torch.nn.Module) -> dict[str, int]:
    """Make ``module(...)`` return the stored output for inputs seen before; returns live counts
    {"calls", "hits"}. Tensors are keyed by shape, dtype and bytes, lists (window_lengths) as tuples."""
    forward, seen, counts = module.forward, {}, {"calls": 0, "hits": 0}

    def key_of(value):
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), str(value.dtype), value.detach().cpu().numpy().tobytes())
        if isinstance(value, (list, tuple)):
            return tuple(key_of(item) for item in value)
        return value

    def memoised(*args, **kwargs):
        key = tuple((name, key_of(value)) for name, value in [*enumerate(args), *sorted(kwargs.items())])
        counts["calls"] += 1
        if key in seen:
            counts["hits"] += 1
        else:
            seen[key] = forward(*args, **kwargs)
        return seen[key]

    module.forward = memoised  # nn.Module.__call__ looks forward up on the instance: the pipeline's calls land here
    return counts


@pytest.fixture(scope="module")
def squad_articles():
    if not SQUAD_FILE.exists():
        pytest.skip(f"SQuAD v1.1 dev set not found at {SQUAD_FILE} (set DISTILQA_DATA to the shared data folder)")
    return json.loads(zipfile.ZipFile(SQUAD_FILE).read("dev-v1.1.json"))["data"]


def squad_pairs(articles, every: int = 21) -> list[tuple[str, str]]:
    """Every ``every``-th dev question (10570 / 21 = 504), so all 48 articles are represented."""
    pairs = [(qa["question"], p["context"]) for a in articles for p in a["paragraphs"] for qa in p["qas"]]
    return pairs[::every]


def long_context_pairs(articles, min_characters: int = 2500, count: int = 40) -> list[tuple[str, str]]:
    """Contexts of consecutive paragraphs joined until at least ``min_characters`` long (2 or more
    windows of 384 tokens), one per article, asking the last paragraph's first question so the
    answer lies beyond the first window."""
    pairs = []
    for article in articles:
        group = []
        for paragraph in article["paragraphs"][1:]:
            group.append(paragraph)
            if sum(len(p["context"]) for p in group) >= min_characters:
                break
        pairs.append((group[-1]["qas"][0]["question"], "\n".join(p["context"] for p in group)))
    return pairs[:count]


@pytest.fixture(scope="module")
def sample(squad_articles) -> list[tuple[str, str]]:
    pairs = squad_pairs(squad_articles) + long_context_pairs(squad_articles)
    assert len(pairs) == 544
    return pairs


@pytest.fixture(scope="module")
def reference(peaked_checkpoint):
    transformers = pytest.importorskip("transformers")
    pipeline = transformers.pipeline(
        "question-answering", model=str(peaked_checkpoint), tokenizer=str(peaked_checkpoint), device="cpu"
    )
    memoise_forward(pipeline.model)
    return pipeline


@pytest.fixture(scope="module")
def ours(peaked_checkpoint) -> tuple[QuestionAnswerer, dict[str, int]]:
    answerer = QuestionAnswerer.from_pretrained(peaked_checkpoint, batch_size=16)
    return answerer, memoise_forward(answerer.model)


def as_list(result) -> list[dict]:
    return result if isinstance(result, list) else [result]


def span(answer: dict) -> tuple[str, int, int]:
    return answer["answer"], answer["start"], answer["end"]


def compare(answerer, ours_results, reference_results, pairs, options, path: str) -> tuple[int, float, list[str]]:
    """(identical cases, largest relative score difference of agreeing answers, unexplained mismatches);
    near ties found are printed with their gaps. The reference returns a bare dict when it has one
    answer even for top_k > 1; ours always a list."""
    identical, worst, unexplained = 0, 0.0, []
    for (question, context), mine, theirs in zip(pairs, ours_results, reference_results, strict=True):
        mine, theirs = as_list(mine), as_list(theirs)
        same = [span(a) == span(b) for a, b in zip(mine, theirs)]
        for a, b, equal in zip(mine, theirs, same):
            if equal:
                worst = max(worst, abs(a["score"] - float(b["score"])) / float(b["score"]))
        if len(mine) == len(theirs) and all(same):
            identical += 1
            continue
        # A near tie? Our own scores of the two answers at each differing rank, from a wider list.
        wider = {span(a): a["score"] for a in as_list(answerer(question, context, **{**options, "top_k": 6}))}
        gaps = [
            abs(a["score"] - wider[span(b)]) / a["score"] if span(b) in wider else float("inf")
            for a, b, equal in zip(mine, theirs, same)
            if not equal
        ]
        if len(mine) != len(theirs) or max(gaps) > NEAR_TIE[path]:
            unexplained.append(f"{question!r}: ours {mine} reference {theirs} (relative gaps {gaps})")
        else:
            print(f"near tie, relative gap {max(gaps):.2e}: {question!r}")
    return identical, worst, unexplained


def run_both(answerer, reference, pairs, options, path: str, counts=None) -> tuple[int, float, list[str]]:
    """Answer ``pairs`` with both; with ``counts`` (of memoise_forward), record in counts["last"] the
    (calls, hits) of our model during our pipeline's run, and in counts["best_scores"] our best
    answer's score for each pair (top_k 1 without "no answer" only)."""
    questions, contexts = [q for q, _ in pairs], [c for _, c in pairs]
    began = time.perf_counter()
    before = dict(counts or {})
    ours_results = answerer(questions, contexts, **options)
    if counts is not None:
        counts["last"] = (counts["calls"] - before["calls"], counts["hits"] - before["hits"])
        if options.get("top_k", 1) == 1 and not options.get("handle_impossible_answer"):
            counts["best_scores"] = sorted(result["score"] for result in ours_results)
    reference_results = reference(question=questions, context=contexts, **options)
    identical, worst, unexplained = compare(answerer, ours_results, reference_results, pairs, options, path)
    # Shown with pytest -s: the figures the constants above record.
    print(
        f"\n{path} {options}: {identical}/{len(pairs)} identical, max relative score difference {worst:.2e}, "
        f"{time.perf_counter() - began:.1f} s"
    )
    return identical, worst, unexplained


# -- packed float32: the default path, on the full sample ---------------------------------------------


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_packed_fp32_full_sample(sample, ours, reference, options):
    answerer, counts = ours
    identical, worst, unexplained = run_both(answerer, reference, sample, options, "float32", counts)
    assert not unexplained, "\n".join(unexplained)
    assert worst <= SCORE_RTOL["float32"]
    assert identical >= MIN_IDENTICAL[(options["top_k"], options["handle_impossible_answer"])], identical
    # The memo takes effect: the first full-sample run computes every batch, the next ones none.
    calls, hits = counts["last"]
    assert calls >= 544 / 16 and hits == (calls if counts.setdefault("full_runs", 0) else 0), counts
    counts["full_runs"] += 1


def test_long_contexts_span_several_windows(squad_articles, ours):
    answerer, _ = ours
    pairs = long_context_pairs(squad_articles)
    windows = answerer.tokenizer.encode_windows([q for q, _ in pairs], [c for _, c in pairs], 384, 128)
    counts = [len(w) for w in windows]
    assert min(counts) >= 2 and sum(counts) >= 2 * len(pairs), counts


def test_scores_look_trained(sample, ours, reference):
    """The checkpoint's best spans have the probabilities of a trained model's, so the score checks
    above can fail: measured min 0.013, median 0.21, max 0.63 over the full sample (top_k 1)."""
    answerer, counts = ours
    if "best_scores" not in counts:  # the full-sample tests were deselected
        run_both(answerer, reference, sample[::16], dict(top_k=1), "float32", counts)
    scores = counts["best_scores"]
    print(f"best span scores: min {scores[0]:.2g}, median {scores[len(scores) // 2]:.2g}, max {scores[-1]:.2g}")
    assert scores[0] > 0.002 and 0.1 < scores[len(scores) // 2] < 0.9, scores


# -- the other paths, on subsamples -------------------------------------------------------------------


def test_padded_fp32(sample, peaked_checkpoint, reference):
    padded = QuestionAnswerer.from_pretrained(peaked_checkpoint, batch_size=16, packed=False)
    pairs, options = sample[::4], dict(top_k=3, handle_impossible_answer=True)
    identical, worst, unexplained = run_both(padded, reference, pairs, options, "float32")
    assert not unexplained, "\n".join(unexplained)
    assert worst <= SCORE_RTOL["float32"]
    assert identical == len(pairs), identical  # measured: 136/136


@needs_onednn
@pytest.mark.parametrize("attn_implementation", ["sdpa", "onednn"])
def test_onednn_post_ops_fp32(sample, peaked_checkpoint, reference, attn_implementation):
    """oneDNN GEMMs with their post-ops (GELU inside lin1, the residual adds inside out_lin and lin2),
    and the oneDNN attention core: the reference's answers, at the published size."""
    fused = QuestionAnswerer.from_pretrained(
        peaked_checkpoint, batch_size=16, linear_backend="onednn", attn_implementation=attn_implementation
    )
    assert fused.model.distilbert.transformer.layer[0].ffn.lin1.post_op == "gelu"
    pairs, options = sample[::4], dict(top_k=3, handle_impossible_answer=True)
    identical, worst, unexplained = run_both(fused, reference, pairs, options, "float32")
    assert not unexplained, "\n".join(unexplained)
    assert worst <= SCORE_RTOL["float32"]
    assert identical == len(pairs), identical


@pytest.mark.parametrize(
    "dtype, linear_backend",
    [("bfloat16", "aten"), pytest.param("bfloat16", "onednn", marks=needs_onednn), ("float16", "aten")],
)
def test_half_precision(sample, peaked_checkpoint, reference, dtype, linear_backend):
    half = QuestionAnswerer.from_pretrained(
        peaked_checkpoint, batch_size=16, dtype=dtype, linear_backend=linear_backend
    )
    assert half.model.dtype == getattr(torch, dtype) and half.model.linear_backend == linear_backend
    pairs, options = sample[:: 4 if dtype == "bfloat16" else 16], dict(top_k=1)  # fp16 is slow on most CPUs
    identical, worst, unexplained = run_both(half, reference, pairs, options, dtype)
    assert not unexplained, "\n".join(unexplained)
    assert worst <= SCORE_RTOL[dtype]
    assert identical >= MIN_IDENTICAL_SHARE[dtype] * len(pairs), identical


@pytest.mark.parametrize("linear_backend", ["aten", pytest.param("onednn", marks=needs_onednn_int8)])
def test_int8(sample, peaked_checkpoint, reference, linear_backend):
    """int8 encoder layers: PyTorch's dynamically quantised ones ("aten"), or oneDNN's int8 GEMM with its
    post-ops ("onednn"): approximate, held to measured bounds like half precision."""
    int8 = QuestionAnswerer.from_pretrained(
        peaked_checkpoint, batch_size=16, quantize="int8", linear_backend=linear_backend
    )
    pairs, options = sample[::4], dict(top_k=1)
    path = "int8-onednn" if linear_backend == "onednn" else "int8"
    kind = linear.OneDNNInt8Linear if path == "int8-onednn" else torch.ao.nn.quantized.dynamic.Linear
    assert type(int8.model.distilbert.transformer.layer[0].ffn.lin1) is kind
    identical, worst, unexplained = run_both(int8, reference, pairs, options, path)
    assert not unexplained, "\n".join(unexplained)
    assert worst <= SCORE_RTOL[path]
    assert identical >= MIN_IDENTICAL_SHARE[path] * len(pairs), identical


def test_compiled_matches_eager(sample, peaked_checkpoint, ours):
    """compile=True runs torch.compile'd blocks of the same model: the same answers as eager fp32."""
    compiled = QuestionAnswerer.from_pretrained(peaked_checkpoint, batch_size=16, compile=True)
    eager, _ = ours
    pairs, options = sample[::11][:48], dict(top_k=3)
    questions, contexts = [q for q, _ in pairs], [c for _, c in pairs]
    began = time.perf_counter()
    got = compiled(questions, contexts, **options)
    print(f"\ncompiled: {len(pairs)} pairs in {time.perf_counter() - began:.1f} s (compilation included)")
    expected = eager(questions, contexts, **options)
    worst = 0.0
    for mine, theirs in zip(got, expected, strict=True):
        assert [span(a) for a in mine] == [span(b) for b in theirs]
        worst = max([worst, *(abs(a["score"] - b["score"]) / b["score"] for a, b in zip(mine, theirs))])
    print(f"compiled vs eager: max relative score difference {worst:.2e}")
    assert worst <= SCORE_RTOL["compiled"]


@pytest.mark.slow  # many full passes of the published-size model on both sides
@pytest.mark.parametrize("max_seq_len, doc_stride", [(64, 16), (128, 48)])
def test_parity_with_many_small_windows(squad_articles, ours, reference, max_seq_len, doc_stride):
    """Small windows: every context spans many windows, so cross-window merging is exercised often."""
    answerer, _ = ours
    options = dict(top_k=3, max_seq_len=max_seq_len, doc_stride=doc_stride)
    pairs = squad_pairs(squad_articles, every=211)
    identical, worst, unexplained = run_both(answerer, reference, pairs, options, "float32")
    assert not unexplained, "\n".join(unexplained)
    assert worst <= SCORE_RTOL["float32"]
    assert identical >= len(pairs) - 1
