"""One model: the DistilBertForQuestionAnswering a user holds is the one that answers.

The pipeline runs the model object it was given: its modules, its attention core and its current
parameters. These tests change the model the ways a researcher does (an optimizer step, a custom
attention function, a replaced block) and check that the logits the pipeline computes change
exactly as the model's own padded forward does. A forward hook records what the pipeline really
ran, so nothing here re-implements the pipeline.

They also prove that the speed switches of the one model (packed windows, the GEMM backend,
compilation) compute the same logits as the plain padded forward at the published configuration.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from distilqa import DistilBertForQuestionAnswering
from distilqa.linear import LINEAR_BACKENDS, linear_backend, onednn_available
from distilqa.model import TransformerBlock, eager_attention
from distilqa.pipeline import QuestionAnswerer

# Measured on this project's CPUs at the published configuration: packed vs padded vs one by one
# differ by at most ~2e-6 (oneDNN vs MKL GEMMs included); 1e-5 is the bound.
FP32_TOLERANCE = 1e-5

QUESTIONS = ["Where was the company founded?", "Who founded it?", "When?"]
CONTEXTS = [
    "The company was founded in Paris in 1998 by two engineers. " * 3,
    "Ada Lovelace founded it. Later it moved to London, where it grew. " * 12,  # several windows at 64 tokens
    "It happened in 2010.",
]
WINDOW_OPTIONS = dict(max_seq_len=64, doc_stride=16)


def pipeline_logits(answerer: QuestionAnswerer) -> list[torch.Tensor]:
    """The start logits of every window the pipeline ran, in the order it ran them, recorded by a
    forward hook on its model: one (tokens,) tensor per window."""
    recorded: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        lengths = kwargs.get("window_lengths")
        if lengths is not None:  # packed: one row of windows end to end
            recorded.extend(output.start_logits[0].split(list(lengths)))
        else:  # padded: one row per window; keep the real tokens only
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            for row, logits in enumerate(output.start_logits):
                recorded.append(logits if mask is None else logits[mask[row].bool()])

    handle = answerer.model.register_forward_hook(hook, with_kwargs=True)
    try:
        answerer(QUESTIONS, CONTEXTS, **WINDOW_OPTIONS)
    finally:
        handle.remove()
    return [logits.detach().clone() for logits in recorded]


def model_logits_one_by_one(answerer: QuestionAnswerer) -> list[torch.Tensor]:
    """What the model itself gives for each of the pipeline's windows, run alone and unpadded, in
    the pipeline's order (longest first, stable)."""
    encodings = answerer.tokenizer.encode_windows(QUESTIONS, CONTEXTS, **WINDOW_OPTIONS)
    windows = sorted((e for per_pair in encodings for e in per_pair), key=lambda e: -len(e.ids))
    with torch.inference_mode():
        return [answerer.model(torch.tensor([e.ids])).start_logits[0] for e in windows]


def assert_same_logits(got: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float) -> None:
    assert len(got) == len(expected) > len(QUESTIONS)  # several windows per long context
    worst = max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True))
    assert worst <= tolerance, f"max |logit difference| {worst:.3g} > {tolerance}"


def largest_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    return max((b - a).abs().max().item() for b, a in zip(before, after, strict=True))


@pytest.fixture
def tiny(tiny_checkpoint) -> QuestionAnswerer:
    return QuestionAnswerer.from_pretrained(tiny_checkpoint, batch_size=4)


@pytest.fixture(scope="module")
def published(published_checkpoint) -> QuestionAnswerer:
    return QuestionAnswerer.from_pretrained(published_checkpoint, batch_size=4)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_an_optimizer_step_changes_what_the_pipeline_runs(tiny, packed):
    tiny.packed = packed
    before = pipeline_logits(tiny)
    model = tiny.model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([tiny.tokenizer.tokenizer.encode(QUESTIONS[0], CONTEXTS[0]).ids])
    model(ids, start_positions=torch.tensor([9]), end_positions=torch.tensor([10])).loss.backward()
    optimizer.step()
    tiny.model.eval()
    after = pipeline_logits(tiny)
    assert largest_change(before, after) > 10 * FP32_TOLERANCE  # the step moved the logits ...
    assert_same_logits(after, model_logits_one_by_one(tiny), FP32_TOLERANCE)  # ... as the model's own forward


def test_a_custom_attention_function_is_what_the_pipeline_runs(tiny):
    before = pipeline_logits(tiny)

    def hotter_attention(query, key, value, mask, dropout_p=0.0, need_weights=False):
        """Eager attention at a hundredth of the temperature: a change a researcher might try."""
        return eager_attention(query * 100.0, key, value, mask, dropout_p, need_weights)

    tiny.model.set_attn_implementation(hotter_attention)
    after = pipeline_logits(tiny)
    assert largest_change(before, after) > 10 * FP32_TOLERANCE
    assert_same_logits(after, model_logits_one_by_one(tiny), FP32_TOLERANCE)


def test_a_replaced_block_is_what_the_pipeline_runs(tiny):
    before = pipeline_logits(tiny)
    torch.manual_seed(1)
    replacement = TransformerBlock(tiny.model.config)
    replacement.attention.attention_function = tiny.model.distilbert.transformer.layer[0].attention.attention_function
    tiny.model.distilbert.transformer.layer[0] = replacement.eval()
    after = pipeline_logits(tiny)
    assert largest_change(before, after) > 10 * FP32_TOLERANCE
    assert_same_logits(after, model_logits_one_by_one(tiny), FP32_TOLERANCE)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_packed_padded_and_one_by_one_agree_at_the_published_configuration(published, packed, backend):
    if backend == "onednn" and not onednn_available():
        pytest.skip("this PyTorch has no oneDNN")
    published.packed = packed
    published.model.set_linear_backend(backend)
    assert linear_backend(published.model) == backend
    got = pipeline_logits(published)
    published.model.set_linear_backend("aten")
    assert_same_logits(got, model_logits_one_by_one(published), FP32_TOLERANCE)


def test_linear_backends_keep_parameters_and_training(tiny_checkpoint):
    """Switching the GEMM backend keeps every Parameter object (an optimizer built before still
    updates what runs) and training still has gradients."""
    model = DistilBertForQuestionAnswering.from_pretrained(tiny_checkpoint)
    parameters = list(model.parameters())
    model.set_linear_backend("onednn" if onednn_available() else "aten")
    assert all(a is b for a, b in zip(parameters, model.parameters(), strict=True))
    assert set(model.state_dict()) == set(DistilBertForQuestionAnswering(model.config).state_dict())
    loss = model.train()(
        torch.tensor([[101, 1000, 102]]), start_positions=torch.tensor([1]), end_positions=torch.tensor([1])
    ).loss
    loss.backward()
    assert all(p.grad is not None for p in model.distilbert.transformer.parameters())


def test_unknown_linear_backend_is_refused(tiny):
    with pytest.raises(ValueError, match="unknown linear backend 'blas'"):
        tiny.model.set_linear_backend("blas")


def test_compiled_blocks_give_the_same_logits_without_recompiling_per_length(tiny):
    """compile_blocks: same logits as eager, and the number of compiled graphs does not grow with
    new window lengths (dynamic shapes; the per-window attention loop is outside the graphs)."""
    expected = pipeline_logits(tiny)
    torch._dynamo.reset()
    tiny.model.compile_blocks()
    assert_same_logits(pipeline_logits(tiny), expected, FP32_TOLERANCE)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for max_seq_len in (48, 80, 96):  # new window lengths, new packed totals
        tiny(QUESTIONS, CONTEXTS, max_seq_len=max_seq_len, doc_stride=16)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_forward_passes_respect_the_window_and_token_budgets(tiny_checkpoint, packed):
    answerer = QuestionAnswerer.from_pretrained(tiny_checkpoint, batch_size=5, max_tokens=150, packed=packed)
    passes: list[tuple[int, int]] = []  # (windows, tokens including padding) of every forward pass

    def hook(module, args, kwargs, output):
        lengths = kwargs.get("window_lengths")
        rows, seq = output.start_logits.shape
        passes.append((len(lengths), seq) if lengths is not None else (rows, rows * seq))

    answerer.model.register_forward_hook(hook, with_kwargs=True)
    answerer(QUESTIONS * 4, CONTEXTS * 4, **WINDOW_OPTIONS)
    windows = sum(len(w) for w in answerer.tokenizer.encode_windows(QUESTIONS * 4, CONTEXTS * 4, **WINDOW_OPTIONS))
    assert sum(count for count, _ in passes) == windows  # every window ran, once
    assert max(count for count, _ in passes) <= 5
    assert max(tokens for _, tokens in passes) <= 150
    assert len(passes) > -(-windows // 5)  # the token budget, not only the window count, split the batches
