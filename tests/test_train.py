"""distilqa train: learning the generated task from scratch, distillation, exact resume, bad input.

The trained model (fixture ``trained_model``, tests/synthetic_qa.py) is shared with test_heads.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from synthetic_qa import TRAIN_ARGS, single_threaded, write_initial_checkpoint, write_task

from distilqa import DistilBertConfig, DistilBertForQuestionAnswering, QuestionAnswerer
from distilqa.cli import main
from distilqa.squad import predict, read_squad
from distilqa.tokenization import QuestionContextTokenizer
from distilqa.train import (
    LOG_FILE,
    TrainingOptions,
    distillation_loss,
    linear_schedule,
    parameter_groups,
    student_from_teacher,
    train,
    training_windows,
)


def evaluate_cli(model: Path, data: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--linear-backend", "aten"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_trained_from_scratch_answers_heldout_questions(trained_model, synthetic_task, capsys):
    scores = evaluate_cli(trained_model, synthetic_task["heldout"], capsys)
    print(f"from scratch, held-out: {scores}")
    assert scores["exact_match"] >= 95.0
    log = [json.loads(line) for line in (trained_model / LOG_FILE).read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert {"learning_rate", "windows_per_second", "epoch"} <= set(steps[0])
    assert sum(r["loss"] for r in steps[-20:]) < 0.1 * sum(r["loss"] for r in steps[:20])
    evaluations = [r for r in log if "exact_match" in r]
    assert [r["step"] for r in evaluations] == [200, 400, len(steps)]
    assert evaluations[-1]["exact_match"] == pytest.approx(scores["exact_match"], abs=1e-3)  # same windows
    # One checkpoint per epoch, each a folder that answers questions.
    checkpoints = sorted(trained_model.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [int(p.name.split("-")[1]) for p in checkpoints] == [len(steps) // 4 * i for i in (1, 2, 3, 4)]
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "training_state.pt"} <= {
        p.name for p in checkpoints[-1].iterdir()
    }
    first = QuestionAnswerer.from_pretrained(checkpoints[0], linear_backend="aten")
    assert first(question="Who created Tovi?", context="Tovi was founded by Sabe Riko.")["answer"]


@pytest.fixture(scope="module")
def distilled_student(trained_model, synthetic_task, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("student") / "run"
    arguments = ["train", "--model", str(trained_model), "--teacher", str(trained_model), "--student-layers", "2"]
    arguments += ["--data", str(synthetic_task["train"]), "--output", str(output), "--epochs", "2"]
    arguments += ["--learning-rate", "1e-3", "--alpha", "0.5", "--temperature", "2", "--seed", "1", *TRAIN_ARGS]
    with single_threaded():
        assert main(arguments) == 0
    return output


def test_distilled_half_depth_student(distilled_student, trained_model, synthetic_task, capsys):
    student_config = DistilBertConfig.from_json_file(distilled_student / "config.json")
    teacher_config = DistilBertConfig.from_json_file(trained_model / "config.json")
    assert student_config.n_layers * 2 == teacher_config.n_layers
    log = [json.loads(line) for line in (distilled_student / LOG_FILE).read_text().splitlines()]
    assert all({"span_loss", "distillation_loss"} <= set(r) for r in log if "loss" in r)
    scores = evaluate_cli(distilled_student, synthetic_task["heldout"], capsys)
    questions = read_squad(synthetic_task["heldout"])
    student = predict(QuestionAnswerer.from_pretrained(distilled_student, linear_backend="aten"), questions)
    teacher = predict(QuestionAnswerer.from_pretrained(trained_model, linear_backend="aten"), questions)
    agreement = 100.0 * sum(student[q.id] == teacher[q.id] for q in questions) / len(questions)
    print(f"distilled student, held-out: {scores}; same answer as the teacher on {agreement:.1f}%")
    assert scores["exact_match"] >= 90.0
    assert agreement >= 90.0


def test_student_from_teacher_keeps_every_other_layer():
    teacher = DistilBertForQuestionAnswering(
        DistilBertConfig(vocab_size=50, dim=16, n_layers=6, n_heads=2, hidden_dim=32)
    )
    teacher.prune_heads({4: [1]})
    student = student_from_teacher(teacher, 3)
    assert student.config.n_layers == 3 and teacher.config.n_layers == 6
    assert student.config.pruned_heads == {2: [1]} and teacher.config.pruned_heads == {4: [1]}
    for kept, taken in zip(student.distilbert.transformer.layer, (0, 2, 4)):
        source = teacher.distilbert.transformer.layer[taken]
        for (name, value), (_, expected) in zip(kept.state_dict().items(), source.state_dict().items()):
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(student.qa_outputs.weight, teacher.qa_outputs.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"1\.\.6 layers"):
        student_from_teacher(teacher, 7)


def test_training_windows_point_at_the_answer_or_at_cls(tmp_path):
    paths = write_task(tmp_path / "task", n_train=20, n_heldout=2)
    write_initial_checkpoint(tmp_path / "model", paths["vocab"], dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    tokenizer = QuestionContextTokenizer.from_pretrained(tmp_path / "model")
    questions = read_squad(paths["train"])
    windows = training_windows(tokenizer, questions, max_seq_len=24, doc_stride=8)  # several windows each
    per_question = tokenizer.encode_windows([q.question for q in questions], [q.context for q in questions], 24, 8)
    assert len(windows) == sum(map(len, per_question)) > 2 * len(questions)
    found = 0
    encodings = [(q, e) for q, es in zip(questions, per_question) for e in es]
    for (question, encoding), window in zip(encodings, windows):
        assert window.input_ids == encoding.ids
        if window.start == 0:
            assert window.end == 0
            text = tokenizer.tokenizer.decode(encoding.ids, skip_special_tokens=False)
            assert question.answers[0] not in text.split("[SEP]", 1)[1]  # not all of it in this window
            continue
        found += 1
        start, end = encoding.offsets[window.start][0], encoding.offsets[window.end][1]
        assert question.context[start:end] == question.answers[0]
    assert found >= len(questions)  # every answer lies whole in at least one window


def test_no_weight_decay_on_biases_and_layer_norms():
    model = DistilBertForQuestionAnswering(
        DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32)
    )
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): name for name, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert {names[id(p)] for p in no_decay["params"]} == {
        name for name in names.values() if name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name
    }


def learning_rates(peak: float, warmup_steps: int, total_steps: int) -> list[float]:
    """The learning rate of steps 0..total_steps (the last: after the last step) of linear_schedule."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = linear_schedule(optimizer, warmup_steps, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return [*rates, schedule.get_last_lr()[0]]


def test_learning_rate_warms_up_then_decays_to_zero():
    rates = learning_rates(1.0, warmup_steps=4, total_steps=20)
    # The ends, from the formula by hand: 0 at step 0, the peak at the end of the warm-up, 0 at the end.
    assert rates[0] == 0.0 and rates[4] == max(rates) == 1.0 and rates[20] == 0.0
    assert rates[1] == pytest.approx(1 / 4) and rates[19] == pytest.approx(1 / 16)  # one step from each end
    assert rates[:5] == sorted(rates[:5]) and rates[4:] == sorted(rates[4:], reverse=True)
    assert learning_rates(2.0, warmup_steps=0, total_steps=10)[0] == 2.0  # no warm-up: the peak at once


@pytest.mark.parametrize(("warmup_steps", "total_steps"), [(4, 20), (0, 7), (3, 3), (10, 101)])
def test_learning_rate_schedule_is_the_reference_recipe(warmup_steps, total_steps):
    """Every step's rate equals transformers' get_linear_schedule_with_warmup (run_qa.py's schedule)."""
    transformers = pytest.importorskip("transformers")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-5)
    reference = transformers.get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    expected = []
    for _ in range(total_steps + 1):
        expected.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    assert learning_rates(3e-5, warmup_steps, total_steps) == pytest.approx(expected, rel=1e-12, abs=0)


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """T² · KL(p_teacher ‖ p_student) at temperature T, summed over positions and averaged over rows,
    in float64 from exp and log: sum_i p_i (log p_i - log q_i)."""
    total = 0.0
    for student_row, teacher_row in zip(student.double().tolist(), teacher.double().tolist()):
        p = [math.exp(x / temperature) for x in teacher_row]
        q = [math.exp(x / temperature) for x in student_row]
        p = [x / sum(p) for x in p]
        q = [x / sum(q) for x in q]
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return temperature**2 * total / len(student)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
def test_distillation_loss_is_the_formula(temperature):
    """KL(teacher ‖ student), not the reverse, times T², mean over the batch: each checked against the
    formula computed by hand. The inputs make the reverse KL differ by far more than the tolerance."""
    generator = torch.Generator().manual_seed(0)
    student = 3 * torch.randn(4, 9, generator=generator)
    teacher = 3 * torch.randn(4, 9, generator=generator)
    got = distillation_loss(student, teacher, temperature).item()
    expected = kl_by_hand(student, teacher, temperature)
    reverse = kl_by_hand(teacher, student, temperature)
    assert abs(expected - reverse) > 0.05 * expected  # the direction matters for these logits
    # float32 against float64: measured relative difference <= 9e-8 at these temperatures.
    assert got == pytest.approx(expected, rel=1e-6)


def test_distillation_loss_is_zero_only_when_the_student_matches():
    teacher = torch.randn(3, 7)
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(teacher + torch.randn(3, 7), teacher, 2.0).item() > 0.01
    assert distillation_loss(teacher + 5.0, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-5)  # softmax shift


@pytest.fixture
def tiny_run(tmp_path):
    """A small task and model (with dropout, so the random state matters) for quick runs."""
    paths = write_task(tmp_path / "task", n_train=40, n_heldout=4)
    model = write_initial_checkpoint(
        tmp_path / "model", paths["vocab"], dim=32, n_layers=1, n_heads=2, hidden_dim=64, dropout=0.1, qa_dropout=0.1
    )
    return paths, model


def options_for(paths, model, output, **overrides) -> TrainingOptions:
    values = dict(model=model, data=paths["train"], output=output, epochs=3, batch_size=8, learning_rate=1e-3)
    values.update(max_seq_len=64, doc_stride=16, progress=False, seed=3, gradient_accumulation_steps=2)
    return TrainingOptions(**{**values, **overrides})


def test_resume_reproduces_the_uninterrupted_run(tiny_run, tmp_path):
    paths, model = tiny_run
    with single_threaded():
        full = train(options_for(paths, model, tmp_path / "full", save_every=2))
        assert full.steps > 6
        resumed = train(options_for(paths, model, tmp_path / "resumed", resume=tmp_path / "full" / "checkpoint-4"))
    assert resumed.steps == full.steps and len(resumed.losses) == full.steps - 4
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[4:]), rtol=0, atol=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "resumed" / LOG_FILE).read_text().splitlines()]
    uninterrupted = [json.loads(line) for line in (tmp_path / "full" / LOG_FILE).read_text().splitlines()]
    assert [r["learning_rate"] for r in logged] == [r["learning_rate"] for r in uninterrupted[4:]]
    final = [DistilBertForQuestionAnswering.from_pretrained(tmp_path / run) for run in ("full", "resumed")]
    for (name, a), (_, b) in zip(final[0].state_dict().items(), final[1].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="--batch-size was 8 in that run, now 4: it decides which windows"):
        train(options_for(paths, model, tmp_path / "other", batch_size=4, resume=tmp_path / "full" / "checkpoint-4"))


def test_bfloat16_autocast_trains(tiny_run, tmp_path):
    paths, model = tiny_run
    with single_threaded():
        result = train(options_for(paths, model, tmp_path / "bf16", dtype="bfloat16", epochs=1))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    saved = DistilBertForQuestionAnswering.from_pretrained(tmp_path / "bf16")
    assert saved.dtype == torch.float32  # master weights stay float32; only the forward passes ran in bfloat16


def corrupt(paths: dict[str, Path], tmp_path: Path, change) -> Path:
    data = json.loads(paths["train"].read_text())
    change(data)
    path = tmp_path / f"{change.__name__}.json"
    path.write_text(json.dumps(data))
    return path


def test_bad_input_is_a_clear_error_before_training(tiny_run, tmp_path, capsys):
    paths, model = tiny_run

    def shift(data):
        data["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] += 1

    def empty(data):
        data["data"] = []

    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"data": [{"title": "x"}]}')
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [
        (["--data", str(tmp_path / "missing.json")], "no such file"),
        (["--data", str(malformed)], "paragraphs"),
        (["--data", str(corrupt(paths, tmp_path, shift))], "is not at answer_start"),
        (["--data", str(corrupt(paths, tmp_path, empty))], "holds no questions"),
        (["--output", str(existing)], "already exists"),
        (["--model", str(tmp_path)], "no config.json"),
        (["--resume", str(model)], "training_state.pt"),
        (["--max-seq-len", "4096"], "exceeds the model's 128 positions"),
    ]
    for change, message in cases:
        base = {"--model": str(model), "--data": str(paths["train"]), "--output": str(tmp_path / "out")}
        base.update(dict(zip(change[::2], change[1::2])))
        capsys.readouterr()
        assert main(["train", *[item for pair in base.items() for item in pair]]) == 2, change
        error = capsys.readouterr().err
        assert error.startswith("distilqa: error:") and message in error and "Traceback" not in error, error
        assert not (tmp_path / "out").exists(), change  # nothing written
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_train_help_states_the_defaults_that_apply(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = TrainingOptions
    for phrase in (
        f"{d.epochs} epochs, batch {d.batch_size}, learning rate {d.learning_rate} ({d.warmup_ratio:.0%} warm-up",
        f"weight decay {d.weight_decay}, gradient norm {d.max_grad_norm}",
        f"{d.max_seq_len}-token windows with stride {d.doc_stride}",
        f"alpha {d.alpha}, temperature {d.temperature}, seed {d.seed}",
    ):
        assert phrase in text, phrase
