"""Heads: pruning equals masking, pruned checkpoints round-trip, importance (Michel et al. 2019) is the
head_mask gradient, and on the trained task model the least important half of the heads matters
less than the most important half."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from synthetic_qa import DOC_STRIDE, MAX_SEQ_LEN, single_threaded, vocabulary, write_task

from distilqa import DistilBertConfig, DistilBertForQuestionAnswering, QuestionAnswerer
from distilqa.cli import main
from distilqa.heads import WindowingOptions, head_importance, pruning_curve, pruning_order
from distilqa.model import span_loss
from distilqa.squad import predict, read_squad
from distilqa.tokenization import QuestionContextTokenizer, build_wordpiece_tokenizer
from distilqa.train import collate, span_logits, training_windows

PRUNE = {0: [1, 3], 1: [0, 1, 2, 3], 2: [2]}  # several heads, several layers, one layer emptied


def random_model(seed: int = 0) -> DistilBertForQuestionAnswering:
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=len(vocabulary()), dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=64
    )
    return DistilBertForQuestionAnswering(config).eval()


def mask_for(prune: dict[int, list[int]], layers: int = 3, heads: int = 4) -> torch.Tensor:
    mask = torch.ones(layers, heads)
    for layer, removed in prune.items():
        mask[layer, removed] = 0.0
    return mask


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_pruning_gives_the_logits_of_masking(attn_implementation, tmp_path):
    model = random_model()
    model.set_attn_implementation(attn_implementation)
    input_ids = torch.randint(5, 90, (3, 17))  # any ids below the vocabulary size
    attention_mask = torch.ones(3, 17, dtype=torch.long)
    attention_mask[1, 12:] = 0
    masked = model(input_ids, attention_mask, head_mask=mask_for(PRUNE))
    pruned = copy.deepcopy(model)
    pruned.prune_heads(PRUNE)
    assert [block.attention.n_heads for block in pruned.distilbert.transformer.layer] == [2, 0, 3]
    assert pruned.distilbert.transformer.layer[0].attention.q_lin.weight.shape == (2 * 8, 32)
    assert pruned.distilbert.transformer.layer[0].attention.out_lin.weight.shape == (32, 2 * 8)
    output = pruned(input_ids, attention_mask)
    for name in ("start_logits", "end_logits"):
        torch.testing.assert_close(getattr(output, name), getattr(masked, name), rtol=0, atol=1e-6)
    unmasked = model(input_ids, attention_mask)
    assert (unmasked.start_logits - output.start_logits).abs().max() > 1e-3  # the heads did matter
    # head_mask still numbers heads as in the unpruned model: masking head 0 of layer 0 means the same.
    more = mask_for({**PRUNE, 0: [0, 1, 3]})
    torch.testing.assert_close(
        pruned(input_ids, attention_mask, head_mask=more).start_logits,
        model(input_ids, attention_mask, head_mask=more).start_logits,
        rtol=0,
        atol=1e-6,
    )
    pruned.save_pretrained(tmp_path)  # config.json records the pruning, so the shapes load
    loaded = DistilBertForQuestionAnswering.from_pretrained(tmp_path, attn_implementation=attn_implementation)
    torch.testing.assert_close(loaded(input_ids, attention_mask).start_logits, output.start_logits, rtol=0, atol=0)
    # Packed windows run the pruned layers too.
    packed = pruned(torch.cat([input_ids[0], input_ids[1, :12]])[None, :], window_lengths=[17, 12])
    torch.testing.assert_close(packed.start_logits[0, 17:], output.start_logits[1, :12], rtol=0, atol=1e-5)


def test_prune_heads_accumulates_and_rejects_bad_heads():
    model = random_model()
    model.prune_heads({0: [1]})
    model.prune_heads({0: [1, 2], 2: [0]})  # head 1 is already gone: skipped
    assert model.config.pruned_heads == {0: [1, 2], 2: [0]}
    assert model.distilbert.transformer.layer[0].attention.heads == [0, 3]
    with pytest.raises(ValueError, match=r"layers 0\.\.2"):
        model.prune_heads({3: [0]})
    with pytest.raises(ValueError, match=r"heads are 0\.\.3"):
        model.prune_heads({0: [4]})
    with pytest.raises(ValueError, match="pruned_heads"):
        DistilBertConfig(n_layers=2, pruned_heads={"5": [0]})


def test_pruned_checkpoint_round_trips_and_answers(trained_model, synthetic_task, tmp_path):
    model = DistilBertForQuestionAnswering.from_pretrained(trained_model)
    prune = {0: [0, 2], 3: [1]}
    model.prune_heads(prune)
    model.save_pretrained(tmp_path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((trained_model / name).read_bytes())
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["pruned_heads"] == {"0": [0, 2], "3": [1]}  # string keys, as transformers v4 wrote them
    loaded = DistilBertForQuestionAnswering.from_pretrained(tmp_path)
    assert loaded.config.pruned_heads == prune
    assert loaded.distilbert.transformer.layer[0].attention.q_lin.weight.shape == (2 * 32, 128)
    input_ids = torch.randint(5, 100, (2, 20))
    torch.testing.assert_close(loaded(input_ids).start_logits, model(input_ids).start_logits, rtol=0, atol=0)
    questions = read_squad(synthetic_task["heldout"])[:40]
    answers = predict(QuestionAnswerer.from_pretrained(tmp_path, linear_backend="aten"), questions)
    unpruned = DistilBertForQuestionAnswering.from_pretrained(trained_model)
    masked_answerer = QuestionAnswerer(unpruned, QuestionContextTokenizer.from_pretrained(trained_model), packed=False)
    with torch.no_grad():  # the same answers as the unpruned model with those heads masked
        original_forward = unpruned.forward
        unpruned.forward = lambda *args, **kwargs: original_forward(*args, **kwargs, head_mask=mask_for(prune, 4, 4))
        masked = predict(masked_answerer, questions)
    assert answers == masked


def test_importance_is_the_head_mask_gradient(tmp_path):
    """Each head's importance equals |d loss / d gate|, checked against central finite differences."""
    paths = write_task(tmp_path, n_train=8, n_heldout=2)
    tokenizer = QuestionContextTokenizer(build_wordpiece_tokenizer(paths["vocab"]), 64)
    questions = read_squad(paths["train"])
    model = random_model(1).double()
    options = WindowingOptions(max_seq_len=64, doc_stride=16, batch_size=64)  # one batch: the plain gradient
    importance = head_importance(model, tokenizer, questions, options).double()
    windows = training_windows(tokenizer, questions, 64, 16)
    assert len(windows) <= 64
    input_ids, attention_mask, starts, ends = collate(windows, tokenizer.pad_token_id)

    def loss(gates: torch.Tensor) -> float:
        with torch.no_grad():
            return span_loss(*span_logits(model, input_ids, attention_mask, gates), starts, ends).item()

    step = 1e-5
    for layer, head in [(0, 0), (1, 3), (2, 1)]:
        up, down = torch.ones(3, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)
        up[layer, head] += step
        down[layer, head] -= step
        numeric = abs(loss(up) - loss(down)) / (2 * step)
        assert importance[layer, head].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9)
    model.prune_heads({1: [2]})
    after = head_importance(model, tokenizer, questions, options)
    assert torch.isnan(after[1, 2]) and int(torch.isnan(after).sum()) == 1
    order = pruning_order(after)
    assert len(order) == 11 and (1, 2) not in order


def test_least_important_heads_matter_less(trained_model, synthetic_task, tmp_path, capsys):
    out = tmp_path / "heads"
    data = str(synthetic_task["heldout"])
    arguments = ["heads", "--model", str(trained_model), "--data", data, "--output", str(out)]
    arguments += ["--points", "5", "--max-seq-len", str(MAX_SEQ_LEN), "--doc-stride", str(DOC_STRIDE)]
    with single_threaded():
        assert main(arguments) == 0
    importance = json.loads((out / "importance.json").read_text())
    curve = json.loads((out / "pruning_curve.json").read_text())
    assert len(importance["importance"]) == 4 and all(len(row) == 4 for row in importance["importance"])
    assert sorted(map(tuple, importance["pruning_order"])) == [(layer, h) for layer in range(4) for h in range(4)]

    def em_at(order: str, pruned: int) -> float:
        return next(p["exact_match"] for p in curve[order] if p["heads_pruned"] == pruned)

    full = em_at("least_important_first", 0)
    least, most = em_at("least_important_first", 8), em_at("most_important_first", 8)
    print(f"EM: all 16 heads {full}; least important 8 pruned {least}; most important 8 pruned {most}")
    assert full - least < full - most
    assert em_at("most_important_first", 0) == full
    for name in ("importance.png", "pruning_curve.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = {path.name: path.read_bytes() for path in out.iterdir()}
    assert sorted(written) == ["importance.json", "importance.png", "pruning_curve.json", "pruning_curve.png"]
    assert main(arguments) == 2  # the report exists: replaced only with --overwrite
    assert f"--output {out} already exists" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == written
    assert sorted(path.name for path in tmp_path.iterdir()) == ["heads"]  # no temporary folder left


def test_pruning_curve_needs_two_points(trained_model):
    model = DistilBertForQuestionAnswering.from_pretrained(trained_model)
    tokenizer = QuestionContextTokenizer.from_pretrained(trained_model)
    for points in (1, 0, -3):
        with pytest.raises(ValueError, match=f"points must be an integer >= 2, got {points}"):
            pruning_curve(model, tokenizer, [], [(0, 0)], points=points)


def test_heads_cli_checks_points_output_and_device_before_work(trained_model, synthetic_task, tmp_path, capsys):
    base = ["heads", "--model", str(trained_model), "--data", str(synthetic_task["heldout"])]
    for extra, phrase in (
        (["--points", "1"], "--points must be an integer >= 2"),
        (["--device", "nonsense"], "unknown device 'nonsense'"),
        (["--output", str(synthetic_task["heldout"]), "--overwrite"], "is also an input"),
    ):
        argv = [*base, "--output", str(tmp_path / "report"), *extra] if "--output" not in extra else [*base, *extra]
        assert main(argv) == 2
        assert phrase in capsys.readouterr().err
    assert not (tmp_path / "report").exists()
