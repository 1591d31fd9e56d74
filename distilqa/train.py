"""Fine-tuning and distillation of the one model on SQuAD v1.1-format data.

The recipe of the reference fine-tuning scripts (transformers' ``run_qa.py`` and
``run_squad_w_distillation.py``):

1. Each (question, context) pair is cut into windows with the tokenizer and windowing the
   pipeline answers with (:class:`~distilqa.tokenization.QuestionContextTokenizer`). A window's
   gold start and end are the tokens that hold the first answer's first and last characters; a
   window that does not hold the whole answer points both at CLS (token 0).
2. AdamW, with no weight decay on biases and LayerNorm weights; the learning rate rises linearly
   over the warm-up steps, then falls linearly to 0; gradients are clipped by their global norm
   and may be accumulated over several batches per optimizer step.
3. The loss is the span loss (mean of the start and end cross-entropies). With a teacher it is
   ``alpha * T² * KL(teacher ‖ student)`` on the start and end distributions at temperature T,
   plus ``(1 - alpha) *`` the span loss (Hinton et al. 2015; Sanh et al. 2019 distilled this very
   checkpoint this way on SQuAD). The teacher runs in eval mode without gradients.

Everything a run writes goes into a new output folder: ``train_log.jsonl`` (one JSON object per
optimizer step and per evaluation), ``checkpoint-<step>/`` folders (model, tokenizer files, the run's
options and ``training_state.pt`` with the optimizer, scheduler, step and random-number state, so
``resume`` continues exactly where the checkpoint left off; each folder appears whole or not at all)
and, at the end, the final model in the folder itself. ``save_total_limit`` keeps only the newest
checkpoints (and the best evaluated one).

SIGINT or SIGTERM during a run finishes the current optimizer step, saves a checkpoint and returns
(``TrainingResult.stopped_by``); a second signal stops at once. :func:`resumed_options` continues a
run from a checkpoint with its saved options, into a new folder or into the run's own.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from distilqa.files import OutputError, atomic_write, check_output, write_json, write_text
from distilqa.hardware import has_native_bfloat16
from distilqa.hub import CONFIG_FILE, TOKENIZER_FILES, resolve_checkpoint
from distilqa.model import DistilBertForQuestionAnswering, span_loss
from distilqa.pipeline import EXCLUDED_LOGIT, QuestionAnswerer
from distilqa.squad import SquadQuestion, evaluate, predict, read_squad
from distilqa.tokenization import QuestionContextTokenizer
from distilqa.validate import at_least, one_of, positive_int

LOG_FILE = "train_log.jsonl"
STATE_FILE = "training_state.pt"
OPTIONS_FILE = "training_options.json"
CHECKPOINT_PREFIX = "checkpoint-"
# The options a resumed run keeps from its checkpoint, with what each decides: changing one midway would
# make the rest a different run. Every other option (where to write, what to evaluate and save, the
# device) may be given again.
FIXED_ON_RESUME = {
    "model": "the weights the run started from",
    "student_layers": "the weights the run started from",
    "data": "which windows form each step",
    "max_seq_len": "which windows form each step",
    "doc_stride": "which windows form each step",
    "batch_size": "which windows form each step",
    "gradient_accumulation_steps": "which windows form each step",
    "seed": "the order of the windows and the dropout",
    "epochs": "the number of steps, and so the learning-rate schedule",
    "learning_rate": "the learning-rate schedule",
    "warmup_ratio": "the learning-rate schedule",
    "weight_decay": "the optimizer's updates",
    "max_grad_norm": "the optimizer's updates",
    "teacher": "the loss",
    "alpha": "the loss",
    "temperature": "the loss",
    "dtype": "the arithmetic of every step",
}
PATH_OPTIONS = ("model", "data", "teacher", "eval_data", "output", "resume")  # compared as places, saved absolute
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DTYPE_CHOICES = ("float32", "bfloat16", "auto")


@dataclass
class TrainingOptions:
    """What ``distilqa train`` does; the defaults are those of transformers' SQuAD example for DistilBERT."""

    model: Path | str  # checkpoint folder or hub repo id to start from (config, safetensors, tokenizer files)
    data: Path  # SQuAD v1.1 .json or .zip
    output: Path  # a new folder
    overwrite: bool = False  # replace an existing output folder (never one holding an input)
    epochs: int = 2
    batch_size: int = 12  # windows per forward pass
    gradient_accumulation_steps: int = 1  # forward passes per optimizer step
    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # share of the optimizer steps spent warming up
    max_grad_norm: float = 1.0
    max_seq_len: int = 384
    doc_stride: int = 128
    eval_data: Path | None = None
    eval_every: int = 0  # optimizer steps between evaluations; 0: only at the end
    save_every: int = 0  # optimizer steps between checkpoints; 0: at the end of each epoch
    save_total_limit: int | None = None  # keep only the newest N checkpoints (and the best evaluated one)
    teacher: Path | str | None = None  # checkpoint folder or hub repo id
    alpha: float = 0.5  # weight of the distillation loss
    temperature: float = 2.0
    student_layers: int | None = None  # start from every other layer of `model`
    seed: int = 42
    resume: Path | None = None  # a checkpoint-<step> folder of an earlier run
    dtype: str = "float32"  # "bfloat16": autocast the forward passes; "auto": bfloat16 where it is native
    device: str | None = None
    progress: bool = True

    def to_json(self) -> dict:
        """The options as JSON values; paths made absolute, so a run can be resumed from another folder."""
        return {key: _absolute(value) if key in PATH_OPTIONS else value for key, value in asdict(self).items()}


@dataclass
class TrainingWindow:
    """One model input with its gold span: token ids (seq,), and start / end token indices (0 = CLS)."""

    input_ids: list[int]
    start: int
    end: int


@dataclass
class TrainingResult:
    output: Path  # the folder holding the final model (or, when stopped, the checkpoints)
    steps: int
    losses: list[float] = field(default_factory=list)  # per optimizer step run in this call
    evaluations: list[dict] = field(default_factory=list)  # {"step", "exact_match", "f1"}
    stopped_by: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run before its end
    checkpoint: Path | None = None  # the newest checkpoint written: the one to resume from when stopped


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def read_training_questions(path: str | os.PathLike) -> list[SquadQuestion]:
    """The questions of a SQuAD v1.1 file, each answer checked to be at its ``answer_start``.

    Raises ``FileNotFoundError`` / ``ValueError`` (naming the file and question) for a missing or
    malformed file, a question without answers, an answer not found at its offset, or no questions."""
    questions = read_squad(path)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    for question in questions:
        if not question.answers:
            raise ValueError(f"{path}: question {question.id!r} has no answer; training needs one per question")
        for text, start in zip(question.answers, question.answer_starts):
            found = question.context[start : start + len(text)]
            if not text or found != text:
                raise ValueError(
                    f"{path}: question {question.id!r}: answer {text!r} is not at answer_start {start} of its "
                    f"context (the context has {found!r} there); fix the offset or the text"
                )
    return questions


def training_windows(
    tokenizer: QuestionContextTokenizer, questions: Sequence[SquadQuestion], max_seq_len: int, doc_stride: int
) -> list[TrainingWindow]:
    """Every window of every question, with the token span of its first answer (CLS when the
    window does not hold the whole answer), as ``run_qa.py`` labels them."""
    per_question = tokenizer.encode_windows(
        [q.question for q in questions], [q.context for q in questions], max_seq_len, doc_stride
    )
    windows = []
    for question, encodings in zip(questions, per_question):
        start_char = question.answer_starts[0]
        end_char = start_char + len(question.answers[0])
        for encoding in encodings:
            context = [i for i, sequence in enumerate(encoding.sequence_ids) if sequence == 1]
            if not context:
                raise ValueError(f"question {question.id!r}: its context has no tokens")
            first, last, offsets = context[0], context[-1], encoding.offsets
            start = end = 0
            if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                start = first
                while start <= last and offsets[start][0] <= start_char:  # last token starting at or before it
                    start += 1
                start -= 1
                end = last
                while end >= first and offsets[end][1] >= end_char:  # first token ending at or after it
                    end -= 1
                end += 1
            windows.append(TrainingWindow(list(encoding.ids), start, end))
    return windows


def collate(windows: Sequence[TrainingWindow], pad_token_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad a batch: input_ids (batch, seq), attention_mask (batch, seq) bool, starts and ends (batch,)."""
    longest = max(len(w.input_ids) for w in windows)
    input_ids = torch.tensor([w.input_ids + [pad_token_id] * (longest - len(w.input_ids)) for w in windows])
    attention_mask = torch.arange(longest)[None, :] < torch.tensor([len(w.input_ids) for w in windows])[:, None]
    starts = torch.tensor([w.start for w in windows])
    ends = torch.tensor([w.end for w in windows])
    return input_ids, attention_mask, starts, ends


def epoch_batches(n_windows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The window indices of each batch of one epoch: a shuffle that depends only on (seed, epoch),
    so a resumed run sees the same batches as an uninterrupted one."""
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, n_windows, batch_size)]


# --------------------------------------------------------------------------- #
# Model transforms and losses
# --------------------------------------------------------------------------- #


def student_from_teacher(teacher: DistilBertForQuestionAnswering, n_layers: int) -> DistilBertForQuestionAnswering:
    """A copy of ``teacher`` that keeps ``n_layers`` of its layers, every other one for half the
    depth (layers ``i * L // n_layers``: 0, 2, 4 of 6), with its embeddings and span head: how the
    DistilBERT paper initialises its student from BERT. The teacher is not changed."""
    total = teacher.config.n_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"a student needs 1..{total} layers (the teacher has {total}), got {n_layers}")
    keep = [i * total // n_layers for i in range(n_layers)]
    student = copy.deepcopy(teacher)
    layers = student.distilbert.transformer.layer
    student.distilbert.transformer.layer = nn.ModuleList(layers[i] for i in keep)
    config = student.config  # deepcopy keeps one config object shared by the model and its encoder
    config.n_layers = n_layers
    config.pruned_heads = {new: config.pruned_heads[old] for new, old in enumerate(keep) if old in config.pruned_heads}
    return student


def span_logits(
    model: DistilBertForQuestionAnswering, input_ids: Tensor, attention_mask: Tensor, head_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Start and end logits (batch, seq), at least float32, for a padded batch (attention_mask (batch, seq)
    bool), with padding set to ``EXCLUDED_LOGIT``: it is no candidate for a start or an end."""
    output = model(input_ids, attention_mask, head_mask=head_mask)
    dtype = torch.promote_types(output.start_logits.dtype, torch.float32)  # bfloat16 up, float64 kept
    start = output.start_logits.to(dtype).masked_fill(~attention_mask, EXCLUDED_LOGIT)  # (batch, seq)
    end = output.end_logits.to(dtype).masked_fill(~attention_mask, EXCLUDED_LOGIT)  # (batch, seq)
    return start, end


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T² · KL(teacher ‖ student)`` of the softmax distributions at temperature T, averaged over
    the batch. Logits (batch, seq); T² keeps the gradients' scale independent of T (Hinton et al.)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (batch, seq)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (batch, seq)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and embeddings, none on biases and LayerNorm."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    no_decay |= {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Learning-rate factor of step s (0-based): s / warmup_steps while warming up (0 at step 0), 1 at
    ``warmup_steps``, then falling linearly to 0 at ``total_steps``: transformers'
    ``get_linear_schedule_with_warmup``, which the reference recipe uses."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #


class Trainer:
    """One training run; :func:`train` is the usual entry point."""

    def __init__(self, options: TrainingOptions):
        self.options = options = _checked(options)
        self.device = torch.device(options.device or "cpu")
        self.autocast = _autocast_dtype(options.dtype, self.device)
        # Every check that can fail runs here, before any training and before anything is written.
        start = Path(options.resume) if options.resume is not None else resolve_checkpoint(options.model)
        self.resume_state = _read_resume_state(options) if options.resume is not None else None
        resumed_step = int(self.resume_state["step"]) if self.resume_state is not None else None
        self.continues_in_place = _check_output(options, resumed_step)
        self.tokenizer_dir = _tokenizer_dir(start)
        self.tokenizer = QuestionContextTokenizer.from_pretrained(self.tokenizer_dir)
        self.questions = read_training_questions(options.data)
        self.eval_questions = read_training_questions(options.eval_data) if options.eval_data else None
        self.model = DistilBertForQuestionAnswering.from_pretrained(start, device=self.device)
        if options.student_layers is not None and options.resume is None:
            self.model = student_from_teacher(self.model, options.student_layers)
        self._check_lengths(self.model)
        self.teacher = None
        if options.teacher is not None:
            teacher = resolve_checkpoint(options.teacher)
            self.teacher = DistilBertForQuestionAnswering.from_pretrained(teacher, device=self.device).eval()
            self.teacher.requires_grad_(False)
            self._check_lengths(self.teacher)
            _check_same_vocabulary(self.tokenizer, QuestionContextTokenizer.from_pretrained(_tokenizer_dir(teacher)))
        self.windows = training_windows(self.tokenizer, self.questions, options.max_seq_len, options.doc_stride)
        self.steps_per_epoch = math.ceil(
            math.ceil(len(self.windows) / options.batch_size) / options.gradient_accumulation_steps
        )
        self.total_steps = self.steps_per_epoch * options.epochs
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, options.weight_decay), lr=options.learning_rate, fused=False
        )
        self.scheduler = linear_schedule(
            self.optimizer, round(options.warmup_ratio * self.total_steps), self.total_steps
        )
        self.step = 0
        self.best: dict | None = None  # {"step", "f1"} of the best evaluation so far
        self.stopped_by: int | None = None  # set by a signal handler while the run is under way
        if self.resume_state is not None:
            self.optimizer.load_state_dict(self.resume_state["optimizer"])
            self.scheduler.load_state_dict(self.resume_state["scheduler"])
            self.step = int(self.resume_state["step"])
            self.best = self.resume_state.get("best")

    def _check_lengths(self, model: DistilBertForQuestionAnswering) -> None:
        if self.options.max_seq_len > model.config.max_position_embeddings:
            raise ValueError(
                f"--max-seq-len {self.options.max_seq_len} exceeds the model's "
                f"{model.config.max_position_embeddings} positions"
            )
        if model.config.vocab_size < self.tokenizer.tokenizer.get_vocab_size():
            raise ValueError(
                f"the tokenizer has {self.tokenizer.tokenizer.get_vocab_size()} tokens but the model only "
                f"{model.config.vocab_size} embeddings"
            )

    def run(self) -> TrainingResult:
        options, output = self.options, Path(self.options.output)
        if options.overwrite and not self.continues_in_place and output.is_dir():
            shutil.rmtree(output)  # checked in __init__: it holds no input
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / OPTIONS_FILE, options.to_json())
        if self.continues_in_place:
            _drop_log_records_after(output / LOG_FILE, self.step)  # steps after the checkpoint are run again
        if self.resume_state is not None:
            _set_rng_state(self.resume_state["rng"])
        else:
            torch.manual_seed(options.seed)  # dropout
        result = TrainingResult(output=output, steps=self.step)
        save_every = options.save_every or self.steps_per_epoch
        self.model.train()
        with (
            self._stop_on_signals(),
            open(output / LOG_FILE, "a", encoding="utf-8") as log,
            tqdm(
                total=self.total_steps, initial=self.step, unit="step", disable=not options.progress, dynamic_ncols=True
            ) as bar,
        ):
            for groups in self._step_groups():
                began = time.perf_counter()
                losses = self._optimizer_step(groups)
                self.step += 1
                record = {
                    "step": self.step,
                    "epoch": round(self.step / self.steps_per_epoch, 4),
                    **losses,
                    "learning_rate": self.scheduler.get_last_lr()[0],
                    "windows_per_second": round(sum(map(len, groups)) / (time.perf_counter() - began), 2),
                }
                self.scheduler.step()
                result.losses.append(losses["loss"])
                _log(log, record)
                bar.update()
                bar.set_postfix(loss=f"{losses['loss']:.4f}")
                last = self.step == self.total_steps
                improved = False
                if self.eval_questions and ((options.eval_every and self.step % options.eval_every == 0) or last):
                    scores = self.evaluate()
                    result.evaluations.append(scores)
                    _log(log, scores)
                    if self.best is None or scores["f1"] > self.best["f1"]:
                        self.best, improved = {"step": self.step, "f1": scores["f1"]}, True
                # With a limit on checkpoints, a new best evaluation is saved too, so the best one is kept.
                keep_best = improved and options.save_total_limit is not None
                stopping = self.stopped_by is not None and not last
                if self.step % save_every == 0 or last or keep_best or stopping:
                    result.checkpoint = self.save_checkpoint(output / f"{CHECKPOINT_PREFIX}{self.step}")
                if stopping:
                    result.stopped_by = self.stopped_by
                    break
        if result.stopped_by is None:
            self._save_model(output)
        result.steps = self.step
        return result

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While the block runs, SIGINT and SIGTERM ask the run to stop after the current step (the
        loop saves a checkpoint then); a second one stops at once, as the signal would have. Python
        delivers signals to the main thread only, so elsewhere nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}

        def request_stop(number: int, frame) -> None:
            if self.stopped_by is not None:  # the second request: no more waiting
                signal.signal(number, previous[number])
                signal.raise_signal(number)
                return
            self.stopped_by = number
            print(
                f"distilqa: {signal.Signals(number).name}: stopping after step {self.step + 1} once a checkpoint "
                "is saved (send it again to stop at once, unsaved)",
                file=sys.stderr,
                flush=True,
            )

        for number in STOP_SIGNALS:
            signal.signal(number, request_stop)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _step_groups(self) -> Iterator[list[list[TrainingWindow]]]:
        """The batches of each remaining optimizer step, from ``self.step`` on."""
        accumulation = self.options.gradient_accumulation_steps
        for epoch in range(self.step // self.steps_per_epoch, self.options.epochs):
            batches = epoch_batches(len(self.windows), self.options.batch_size, self.options.seed, epoch)
            groups = [batches[i : i + accumulation] for i in range(0, len(batches), accumulation)]
            for group in groups[self.step - epoch * self.steps_per_epoch :]:
                yield [[self.windows[i] for i in batch] for batch in group]

    def _optimizer_step(self, groups: list[list[TrainingWindow]]) -> dict[str, float]:
        """Forward and backward over the batches of one step, clip, step. Returns the mean losses."""
        total_windows = sum(map(len, groups))
        sums: dict[str, float] = {}
        for windows in groups:
            losses = self._losses(windows)
            # Weight each batch by its share of the step's windows: the step's loss is a mean per window.
            (losses["loss"] * len(windows) / total_windows).backward()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.item() * len(windows) / total_windows
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def _losses(self, windows: list[TrainingWindow]) -> dict[str, Tensor]:
        input_ids, attention_mask, starts, ends = (
            t.to(self.device) for t in collate(windows, self.tokenizer.pad_token_id)
        )
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            start_logits, end_logits = span_logits(self.model, input_ids, attention_mask)
            gold = span_loss(start_logits, end_logits, starts, ends)
            if self.teacher is None:
                return {"loss": gold}
            with torch.no_grad():
                teacher_start, teacher_end = span_logits(self.teacher, input_ids, attention_mask)
            alpha, temperature = self.options.alpha, self.options.temperature
            distilled = (
                distillation_loss(start_logits, teacher_start, temperature)
                + distillation_loss(end_logits, teacher_end, temperature)
            ) / 2
        return {"loss": alpha * distilled + (1 - alpha) * gold, "span_loss": gold, "distillation_loss": distilled}

    def evaluate(self) -> dict:
        """SQuAD v1.1 EM and F1 of the current model on the evaluation questions, with the training windowing."""
        answerer = QuestionAnswerer(self.model, self.tokenizer, batch_size=max(self.options.batch_size, 32))
        ask = functools.partial(answerer, max_seq_len=self.options.max_seq_len, doc_stride=self.options.doc_stride)
        scores = evaluate(self.eval_questions, predict(ask, self.eval_questions))
        self.model.train()  # the answerer switched it to eval mode
        return {"step": self.step, "exact_match": round(scores.exact_match, 4), "f1": round(scores.f1, 4)}

    def save_checkpoint(self, directory: Path) -> Path:
        """Model, tokenizer files, options and the training state in ``directory``, which appears whole
        or not at all; then, with ``save_total_limit``, the checkpoints beyond it are removed."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": _get_rng_state(),
            "options": self.options.to_json(),
            "best": self.best,
        }

        def write(partial: Path) -> None:
            self._write_model(partial)
            write_json(partial / OPTIONS_FILE, self.options.to_json())
            torch.save(state, partial / STATE_FILE)

        atomic_write(directory, write)
        if self.options.save_total_limit is not None:
            self._remove_old_checkpoints(directory.parent)
        return directory

    def _remove_old_checkpoints(self, folder: Path) -> None:
        """Keep the newest ``save_total_limit`` checkpoints of ``folder`` and the best evaluated one."""
        steps = sorted(checkpoint_steps(folder))
        keep = set(steps[-self.options.save_total_limit :])
        if self.best is not None:
            keep.add(self.best["step"])
        for step in steps:
            if step not in keep:
                shutil.rmtree(folder / f"{CHECKPOINT_PREFIX}{step}")

    def _write_model(self, directory: Path) -> None:
        """config.json, model.safetensors and the tokenizer files into ``directory``: a model folder."""
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        for name in TOKENIZER_FILES:
            if (self.tokenizer_dir / name).exists():
                shutil.copyfile(self.tokenizer_dir / name, directory / name)

    def _save_model(self, output: Path) -> None:
        """The final model's files into the output folder, each renamed into place once written whole."""
        with tempfile.TemporaryDirectory(prefix=".final-model.", suffix=".partial", dir=output) as temporary:
            self._write_model(Path(temporary))
            for written in Path(temporary).iterdir():
                os.replace(written, output / written.name)


def train(options: TrainingOptions) -> TrainingResult:
    """Check everything, then train; see the module docstring for what is written where."""
    return Trainer(options).run()


def checkpoint_steps(folder: str | os.PathLike) -> list[int]:
    """The steps of the ``checkpoint-<step>`` folders in ``folder``."""
    names = (path.name for path in Path(folder).glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir())
    return [int(step) for name in names if (step := name.removeprefix(CHECKPOINT_PREFIX)).isdigit()]


def resumed_options(checkpoint: str | os.PathLike, **changes) -> TrainingOptions:
    """The options of the run that wrote ``checkpoint`` (a ``checkpoint-<step>`` folder), to continue
    it: ``resume`` set to the checkpoint, ``changes`` applied. Where to write (``output``), what to
    evaluate and save, and the device may change; an option in :data:`FIXED_ON_RESUME` given with
    another value than the run's is refused (ValueError naming it and what it decides)."""
    checkpoint = Path(checkpoint)
    saved = _saved_options(checkpoint)
    names = TrainingOptions.__dataclass_fields__
    if unknown := sorted(set(changes) - set(names)):
        raise TypeError(f"unknown training options: {', '.join(unknown)}")
    _refuse_changes(checkpoint, saved, changes)
    values = {name: saved[name] for name in names if name in saved}  # an older run lacks newer options
    values.update(changes, resume=checkpoint)
    values["overwrite"] = changes.get("overwrite", False)  # only ever for the command that asks for it
    for name in ("data", "eval_data", "output"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    return TrainingOptions(**values)


# --------------------------------------------------------------------------- #
# Checks and helpers
# --------------------------------------------------------------------------- #


def _checked(options: TrainingOptions) -> TrainingOptions:
    for name in ("epochs", "batch_size", "gradient_accumulation_steps", "max_seq_len"):
        positive_int(name, getattr(options, name))
    for name in ("eval_every", "save_every", "doc_stride"):
        at_least(name, getattr(options, name), 0)
    for name in ("student_layers", "save_total_limit"):
        if getattr(options, name) is not None:
            positive_int(name, getattr(options, name))
    if options.doc_stride >= options.max_seq_len - 3:
        raise ValueError(f"doc_stride ({options.doc_stride}) must be smaller than max_seq_len - 3")
    if not options.learning_rate > 0 or options.weight_decay < 0 or not options.max_grad_norm > 0:
        raise ValueError("learning_rate and max_grad_norm must be > 0 and weight_decay >= 0")
    if not 0 <= options.warmup_ratio <= 1 or not 0 <= options.alpha <= 1:
        raise ValueError(f"warmup_ratio and alpha must be in [0, 1], got {options.warmup_ratio}, {options.alpha}")
    if not options.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {options.temperature}")
    one_of("training dtype", options.dtype, DTYPE_CHOICES)
    return options


def _autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast for "bfloat16", and for "auto" where the hardware has native bfloat16;
    None (plain float32) otherwise. float16 is not offered: it needs loss scaling."""
    if dtype == "bfloat16" or (dtype == "auto" and has_native_bfloat16(device)):
        return torch.bfloat16
    return None


def _check_output(options: TrainingOptions, resumed_step: int | None) -> bool:
    """Check the output folder before any work: new or empty, or the folder of the run being resumed
    (its ``--resume`` checkpoint is inside it and no newer checkpoint is). Returns whether the run
    continues in place."""
    output = Path(options.output)
    local = [place for place in (options.model, options.teacher) if place is not None and os.path.exists(place)]
    inputs = [options.data, options.eval_data, options.resume, *local]
    in_place = options.resume is not None and output.is_dir() and os.path.samefile(Path(options.resume).parent, output)
    if in_place:
        if newer := sorted(step for step in checkpoint_steps(output) if step > resumed_step):
            raise OutputError(
                f"--output {output} holds {CHECKPOINT_PREFIX}{newer[-1]}, newer than --resume {options.resume}: "
                f"resume from the newest checkpoint, or into a new --output folder"
            )
        inputs.remove(options.resume)
    elif options.overwrite and output.is_dir():
        if options.resume is not None and Path(options.resume).absolute().is_relative_to(output.absolute()):
            raise OutputError(
                f"--overwrite would delete --resume {options.resume}: to continue that run, leave out --overwrite"
            )
        if inside := [path for path in inputs if path is not None and _is_inside(path, output)]:
            raise OutputError(f"--overwrite would delete {inside[0]}, an input inside --output {output}")
    elif output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OutputError(
            f"--output {output} already exists and is not empty: choose a new --output, continue that run with "
            f"--resume {output / (CHECKPOINT_PREFIX + '<step>')} --output {output}, or pass --overwrite to replace it"
        )
    check_output(output, overwrite=True, inputs=[path for path in inputs if path is not None], directory=True)
    return in_place


def _is_inside(path: str | os.PathLike, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def _drop_log_records_after(log: Path, step: int) -> None:
    """Remove the log's records of steps after ``step`` (run again by a resumed run), atomically."""
    if not log.exists():
        return
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text(log, "".join(kept))


def _tokenizer_dir(directory: Path) -> Path:
    if not (directory / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{directory} is not a checkpoint folder: it has no {CONFIG_FILE}")
    if not any((directory / name).exists() for name in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(
            f"{directory} has no tokenizer files (tokenizer.json or vocab.txt): training needs them to make windows"
        )
    return directory


def _check_same_vocabulary(student: QuestionContextTokenizer, teacher: QuestionContextTokenizer) -> None:
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise ValueError("the teacher's tokenizer differs from the student's: distillation needs the same vocabulary")


def _check_checkpoint(directory: Path) -> None:
    if not (directory / STATE_FILE).exists():
        raise FileNotFoundError(
            f"--resume {directory}: no {STATE_FILE} there; pass a {CHECKPOINT_PREFIX}<step> folder written by training"
        )


def _saved_options(directory: Path) -> dict:
    """The options saved with a checkpoint: its options file, else (older checkpoints) its training state."""
    _check_checkpoint(directory)
    if (directory / OPTIONS_FILE).exists():
        return json.loads((directory / OPTIONS_FILE).read_text(encoding="utf-8"))
    return torch.load(directory / STATE_FILE, weights_only=True)["options"]


def _read_resume_state(options: TrainingOptions) -> dict:
    directory = Path(options.resume)
    _check_checkpoint(directory)
    # weights_only: tensors, numbers and dicts only, never arbitrary pickled objects.
    state = torch.load(directory / STATE_FILE, weights_only=True)
    _refuse_changes(directory, state["options"], {name: getattr(options, name) for name in FIXED_ON_RESUME})
    return state


def _refuse_changes(checkpoint: Path, saved: dict, given: dict) -> None:
    """ValueError naming each option of ``given`` that differs from the run's and what it decides."""
    changed = [name for name in FIXED_ON_RESUME if name in given and not _same_option(saved.get(name), given[name])]
    if changed:
        details = "; ".join(
            f"--{name.replace('_', '-')} was {saved.get(name)!r} in that run, now {_shown(given[name])!r}: "
            f"it decides {FIXED_ON_RESUME[name]}"
            for name in changed
        )
        raise ValueError(
            f"--resume {checkpoint}: {details}. A resumed run keeps these; leave them out, or start a new run"
        )


def _same_option(saved, given) -> bool:
    """Equal values; paths (and repo ids) are equal when they name the same place."""
    if saved is None or given is None or isinstance(given, (bool, int, float)):
        return saved == given
    return _absolute(saved) == _absolute(given)


def _absolute(value):
    """A path's absolute form as a string; a hub repo id, None or another value unchanged."""
    if isinstance(value, Path) or (isinstance(value, str) and os.path.exists(value)):
        return os.path.abspath(value)
    return value


def _shown(value):
    return str(value) if isinstance(value, Path) else value


def _get_rng_state() -> dict[str, Tensor | list[Tensor]]:
    state: dict[str, Tensor | list[Tensor]] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _log(log, record: dict) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()
