"""Write docs/walkthrough.md: one question followed through distilqa, with the shapes of a real run and
the source lines that do each step, quoted from the code itself.

    python docs/build_walkthrough.py            # regenerate docs/walkthrough.md
    python docs/build_walkthrough.py --check    # exit 1 if docs/walkthrough.md is not what the code gives

Quotes are found by their content (an anchor line, or an anchor line to an end line), so they follow the
code as it moves; when a quoted line changes, or lines above it are added, the generated file changes
and tests/test_walkthrough.py fails until this script is rerun. An anchor that disappears is an error
naming it: update the anchor here. ``--source-root DIR`` quotes another copy of the source (the run
itself always uses the installed distilqa).

What comes from the run: tokens, windows, offsets and every tensor shape, from the published
configuration (dim 768, 6 blocks, 12 heads) with random weights seeded with 0, since the real weights
cannot be assumed present. Numbers that depend on trained weights (logits, probabilities, the answer a
trained model picks) are left out; the few numbers shown hold for any weights or for the
initialisation, and the text says which.
"""

from __future__ import annotations

import argparse
import ast
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "walkthrough.md"
VOCAB_FILE = ROOT.parent / "shared" / "data" / "vocab" / "bert-base-cased-vocab.txt"
QUESTION = "Which space shuttle carried Hubble into orbit?"
CONTEXT = (
    "The Hubble Space Telescope was launched into low Earth orbit on 24 April 1990 aboard the Space Shuttle "
    "Discovery. It was not the first space telescope, but it is one of the largest and most versatile, and it is "
    "well known both as a vital research tool and as a public relations boon for astronomy. Hubble is named after "
    "the astronomer Edwin Hubble."
)
ANSWER = "Space Shuttle Discovery"  # the span followed through offsets and merging (no trained model decides here)
MAX_SEQ_LEN, DOC_STRIDE = 40, 12  # small, so that the windows fit on the page (the defaults are 384 and 128)
MAX_ANSWER_LEN = 15
SEED = 0


# ---------------------------------------------------------------- quoting the source


class Source:
    """The files under ``root`` (a copy of the repository), quoted by content."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lines: dict[str, list[str]] = {}

    def lines(self, path: str) -> list[str]:
        if path not in self._lines:
            self._lines[path] = (self.root / path).read_text(encoding="utf-8").split("\n")
        return self._lines[path]

    def find(self, path: str, anchor: str, after: int | None = None) -> int:
        """0-based index of the line that contains ``anchor``: the only one in the file, or the first
        at or after line index ``after`` when given."""
        found = [i for i, line in enumerate(self.lines(path)) if i >= (after or 0) and anchor in line]
        if not found or (after is None and len(found) > 1):
            what = "not found" if not found else f"found {len(found)} times"
            raise ValueError(f"anchor {anchor!r} {what} in {path}: update the anchor in docs/build_walkthrough.py")
        return found[0]

    def quote(self, path: str, anchor: str, end: str | None = None, within: str | None = None) -> str:
        """A markdown block of the lines from ``anchor`` to ``end`` (inclusive; one line if None),
        searching from the line holding ``within`` when given, headed by file:line and a link."""
        start = self.find(path, anchor, self.find(path, within) if within else None)
        stop = self.find(path, end, start) if end else start
        return self._block(path, start, stop)

    def function(self, path: str, name: str) -> str:
        """The whole top-level function ``name`` (decorators and docstring included)."""
        tree = ast.parse("\n".join(self.lines(path)))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                return self._block(path, first - 1, node.end_lineno - 1)
        raise ValueError(f"function {name!r} not found in {path}: update docs/build_walkthrough.py")

    def _block(self, path: str, start: int, stop: int) -> str:
        code = textwrap.dedent("\n".join(self.lines(path)[start : stop + 1]))
        where = f"{path}:{start + 1}" if start == stop else f"{path}:{start + 1}-{stop + 1}"
        anchor = f"L{start + 1}" if start == stop else f"L{start + 1}-L{stop + 1}"
        return f"[`{where}`](../{path}#{anchor})\n\n```python\n{code}\n```\n"


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    """What one run of the pipeline's steps shows: tokens, windows, shapes, and weight-free facts."""

    question_tokens: list[str] = field(default_factory=list)
    question_ids: list[int] = field(default_factory=list)
    context_token_count: int = 0
    windows: list[dict] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    block_shapes: list[dict[str, tuple[int, ...]]] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)


def shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def number(value: float) -> str:
    """Three decimals, and never "-0.000"."""
    return f"{round(float(value), 3) + 0.0:.3f}"


@torch.inference_mode()
def collect_run(vocab_file: Path = VOCAB_FILE) -> Run:
    """Tokenize, window and run the example through the model at the published configuration."""
    from distilqa.attention import ATTENTION_IMPLEMENTATIONS, attend
    from distilqa.config import DistilBertConfig
    from distilqa.model import DistilBertForQuestionAnswering
    from distilqa.pipeline import EXCLUDED_LOGIT, _characters, decode_spans, merge_answers
    from distilqa.tokenization import QuestionContextTokenizer, build_wordpiece_tokenizer

    if not Path(vocab_file).exists():
        raise FileNotFoundError(
            f"{vocab_file} not found: the walkthrough tokenizes with the real cased vocabulary "
            "(../shared/data/vocab/bert-base-cased-vocab.txt, or vocab.txt of the published checkpoint via --vocab)"
        )
    run = Run()
    tokenizer = QuestionContextTokenizer(build_wordpiece_tokenizer(vocab_file, lowercase=False))
    question = tokenizer.tokenizer.encode(QUESTION)
    run.question_tokens, run.question_ids = question.tokens, question.ids
    run.context_token_count = len(tokenizer.tokenizer.encode(CONTEXT, add_special_tokens=False).ids)
    encodings = tokenizer.encode_windows([QUESTION], [CONTEXT], MAX_SEQ_LEN, DOC_STRIDE)[0]
    answer_start = CONTEXT.index(ANSWER)
    answer_end = answer_start + len(ANSWER)
    for encoding in encodings:
        context = [i for i, sid in enumerate(encoding.sequence_ids) if sid == 1]
        span = [i for i in context if encoding.offsets[i][0] >= answer_start and encoding.offsets[i][1] <= answer_end]
        window = {
            "length": len(encoding.ids),
            "context_tokens": (context[0], context[-1]),
            "characters": (encoding.offsets[context[0]][0], encoding.offsets[context[-1]][1]),
            "first": encoding.tokens[context[0] : context[0] + 3],
            "last": encoding.tokens[context[-1] - 2 : context[-1] + 1],
            "span": (span[0], span[-1]) if len(span) == len(ANSWER.split()) else None,
        }
        if window["span"] is not None:
            window["characters_of_span"] = _characters(encoding, span[0], span[-1], align_to_words=True)
            window["span_tokens"] = encoding.tokens[span[0] : span[-1] + 1]
        run.windows.append(window)

    torch.manual_seed(SEED)
    config = DistilBertConfig()  # the published configuration
    model = DistilBertForQuestionAnswering(config).eval()
    run.facts["config"] = config
    table = model.distilbert.embeddings.position_embeddings.weight  # (512, 768), the sinusoids at initialisation
    run.facts["position_row_1"] = [number(v) for v in table[1, :4]]
    run.facts["position_row_1_far"] = [number(v) for v in table[1, -2:]]

    # Shapes: forward hooks on the model's own modules, and a recording wrapper around its attention core.
    lengths = [len(e.ids) for e in encodings]
    ids = torch.tensor([[token for e in encodings for token in e.ids]])  # (1, total): the pipeline's packed row
    run.shapes["packed_ids"] = shape(ids)
    recorded: dict[str, tuple[int, ...]] = {}
    hooks = []

    def record(shapes: dict, name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output is left as it is
            shapes.setdefault(name, shape(output[0] if isinstance(output, tuple) else output))

        return hook

    embeddings = model.distilbert.embeddings
    for name, module in (
        ("word_embeddings", embeddings.word_embeddings),
        ("position_embeddings", embeddings.position_embeddings),
        ("embeddings", embeddings),
        ("qa_outputs", model.qa_outputs),
    ):
        hooks.append(module.register_forward_hook(record(recorded, name)))
    per_block: list[dict[str, tuple[int, ...]]] = [{} for _ in model.distilbert.transformer.layer]
    for block, shapes in zip(model.distilbert.transformer.layer, per_block):
        for name, module in (
            ("q_lin", block.attention.q_lin),
            ("attention", block.attention),
            ("sa_layer_norm", block.sa_layer_norm),
            ("lin1", block.ffn.lin1),
            ("ffn", block.ffn),
            ("output_layer_norm", block.output_layer_norm),
        ):
            hooks.append(module.register_forward_hook(record(shapes, name)))
    eager = ATTENTION_IMPLEMENTATIONS["eager"]

    def recording_core(query, key, value, mask, dropout_p=0.0, need_weights=False):
        """The eager core, noting the shapes it is given: the whole packed row, as a core that
        declares ``handles_packed_windows`` receives it."""
        recorded.setdefault("query", shape(query))
        recorded.setdefault("mask", type(mask).__name__)
        context, weights = attend(eager, query, key, value, mask, dropout_p, need_weights)
        recorded.setdefault("context", shape(context))
        return context, weights

    recording_core.handles_packed_windows = True
    model.set_attn_implementation(recording_core)
    output = model(ids, window_lengths=lengths, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    run.shapes.update(recorded)
    run.block_shapes = per_block
    run.shapes["hidden_states"] = (len(output.hidden_states), *shape(output.hidden_states[0]))
    run.shapes["start_logits"] = shape(output.start_logits)
    run.facts["position_ids_restart"] = [
        int(i) for i in torch.cat([torch.arange(n) for n in lengths])[[0, lengths[0] - 1, lengths[0]]]
    ]
    first = output.hidden_states[0][0, : lengths[0]]  # (n, dim): the first window after the embeddings
    run.facts["embedding_mean"] = number(first.mean(-1).abs().max())
    run.facts["embedding_std"] = number(first.std(-1, unbiased=False).mean())
    last = output.hidden_states[-1]  # (1, total, dim)
    run.facts["head_is_linear_on_last"] = bool(torch.equal(model.qa_outputs(last).unbind(-1)[0], output.start_logits))

    # One window alone with its attention maps (the packed row does not return them).
    single = model(ids[:, : lengths[0]], output_attentions=True)
    run.shapes["attention_weights"] = (len(single.attentions), *shape(single.attentions[0]))
    run.facts["rows_sum_to_one"] = max(float((a.sum(-1) - 1).abs().max()) for a in single.attentions) < 1e-5

    # The pipeline's decoding, on these windows padded into a (windows, seq) batch as it does.
    start_logits = torch.nn.utils.rnn.pad_sequence(list(output.start_logits[0].split(lengths)), batch_first=True)
    end_logits = torch.nn.utils.rnn.pad_sequence(list(output.end_logits[0].split(lengths)), batch_first=True)
    allowed = torch.nn.utils.rnn.pad_sequence(
        [
            torch.tensor([sid == 1 or t == tokenizer.cls_token_id for sid, t in zip(e.sequence_ids, e.ids)])
            for e in encodings
        ],
        batch_first=True,
    )  # (windows, seq)
    run.shapes["decode_logits"] = shape(start_logits)
    p_start = torch.softmax(start_logits.masked_fill(~allowed, EXCLUDED_LOGIT), dim=-1)  # as decode_spans does
    run.facts["allowed_per_window"] = allowed.sum(-1).tolist()
    run.facts["excluded_probability"] = float(p_start[~allowed].max())
    run.facts["cls_allowed"] = bool(allowed[:, 0].all())
    unfolded: dict[str, tuple[int, ...]] = {}

    class RecordShapes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            name = getattr(func, "__name__", "")
            if name in ("unfold", "sort") and name not in unfolded:
                unfolded[name] = shape(result[0] if isinstance(result, tuple) else result)
            return result

    with RecordShapes():
        spans = decode_spans(start_logits, end_logits, allowed, MAX_ANSWER_LEN, 12)
    run.shapes["unfold"] = unfolded["unfold"]
    run.shapes["sort"] = unfolded["sort"]
    run.facts["candidates_per_window"] = [len(window_spans) for window_spans, _ in spans]
    candidates = [(0.25, *w["characters_of_span"]) for w in run.windows if w["span"] is not None]
    run.facts["merged"] = merge_answers(CONTEXT, candidates, None, top_k=1)[0]
    run.facts["merged_from"] = len(candidates)
    return run


# ---------------------------------------------------------------- the text


def render(run: Run, source_root: Path = ROOT) -> str:
    """The walkthrough as markdown, quoting the files under ``source_root``."""
    src = Source(source_root)
    model, pipeline, tokenization, attention = (
        "distilqa/model.py",
        "distilqa/pipeline.py",
        "distilqa/tokenization.py",
        "distilqa/attention.py",
    )
    config = run.facts["config"]
    s = run.shapes
    total = s["packed_ids"][1]
    windows = run.windows
    with_answer = [i for i, w in enumerate(windows) if w["span"] is not None]
    first_answer = windows[with_answer[0]]
    out: list[str] = []
    add = out.append

    add("# Walkthrough: one question through distilqa\n")
    add(
        "<!-- Generated by docs/build_walkthrough.py from the code it quotes; do not edit by hand. "
        "Run `python docs/build_walkthrough.py` after changing the code. -->\n"
    )
    add(
        "This page follows one question from text to answer through the code of `distilqa`, stage by stage: "
        "what happens, the lines that do it (quoted from the source by the generator, with file and line), the "
        "shape of every tensor as a real run produced it, and why it is done that way.\n"
    )
    add(
        f"**Where the numbers come from.** The run uses the published configuration (dim {config.dim}, "
        f"{config.n_layers} blocks, {config.n_heads} heads of {config.dim // config.n_heads}, feed-forward "
        f"{config.hidden_dim}, vocabulary {config.vocab_size}) with *random* weights, seeded with {SEED}, and the real "
        "cased vocabulary, because the trained checkpoint cannot be assumed to be on the machine that builds this "
        "page. Tokens, windows, offsets and shapes do not depend on the weights, so they are exactly what the "
        "published model sees. Logits, probabilities and the answer a trained model picks do depend on them and "
        "are **left out**; the few numbers shown hold for any weights or for a freshly initialised model, and "
        "each says which. To see the trained model's numbers and pictures for any question, run "
        "`distilqa explain --question ... --context ...` where the weights are (see the README).\n"
    )
    add(f"**Question:** {QUESTION}\n")
    add(f"**Context:** {CONTEXT}\n")
    add(
        f'We follow the span "{ANSWER}" (the answer a reader would give) through the last stages. Windows are '
        f"`max_seq_len={MAX_SEQ_LEN}`, `doc_stride={DOC_STRIDE}` here so that they fit on the page; the pipeline's "
        "defaults are 384 and 128, under which this context would be one window.\n"
    )

    add("## 1. Text to WordPiece tokens\n")
    add(
        f"The question becomes {len(run.question_tokens)} tokens, with `[CLS]` and `[SEP]` added: "
        f"`{' '.join(run.question_tokens)}` (ids `{run.question_ids}`). The context becomes "
        f"{run.context_token_count} tokens. Words missing from the {config.vocab_size}-entry vocabulary are split "
        "into pieces; `##` marks a piece that continues a word (`Hu ##bble`).\n"
    )
    add(src.quote(tokenization, "tokenizer = Tokenizer(WordPiece(", 'pair="[CLS] $A [SEP] $B:1 [SEP]:1",'))
    add(
        "*Why:* the normaliser does not lowercase (this is the *cased* model: `Hubble` and `hubble` are different "
        "tokens), and the template puts the question first, so the question's tokens sit at the same positions in "
        "every window of a long context.\n"
    )

    add("## 2. Windows\n")
    add(
        f"A window holds at most `max_seq_len` tokens, `[CLS] question [SEP] context-part [SEP]`. Only the context "
        f"is cut; consecutive windows share `doc_stride` context tokens. Here {len(windows)} windows:\n"
    )
    add("| window | tokens | context tokens (positions) | context characters | starts with | ends with |")
    add("| --- | --- | --- | --- | --- | --- |")
    for i, w in enumerate(windows):
        add(
            f"| {i} | {w['length']} | {w['context_tokens'][0]}-{w['context_tokens'][1]} | "
            f"{w['characters'][0]}-{w['characters'][1]} | `{' '.join(w['first'])}` | `{' '.join(w['last'])}` |"
        )
    add("")
    add(src.quote(pipeline, "max_seq_len = min(384, self.tokenizer.model_max_length)", "doc_stride = min(128,"))
    add(src.quote(tokenization, "*encoding.overflowing]"))
    add(src.quote(tokenization, 'strategy="only_second"'))
    add(
        f"*Why:* the model has {config.max_position_embeddings} position embeddings, so a long context must be cut; "
        f"the overlap makes sure an answer near a cut is whole in at least one window. "
        f'"{ANSWER}" lies whole in windows {", ".join(map(str, with_answer))}, which matters in stage 11.\n'
    )

    add("## 3. One row of windows, no padding\n")
    add(
        f"The pipeline lays the windows' ids end to end, input_ids `{s['packed_ids']}` with "
        f"`window_lengths={[w['length'] for w in windows]}`, and marks which tokens may be part of an answer: the "
        "context's, and `[CLS]`.\n"
    )
    add(src.quote(pipeline, "allowed = context | (ids == cls)"))
    add(
        src.quote(
            pipeline, "packed = ids[real][None, :].to(device)", "output = self.model(packed, window_lengths=lengths)"
        )
    )
    add(
        src.quote(
            model,
            "if window_lengths is not None:",
            "position_ids = mask.position_ids(input_ids.device)",
            within="class DistilBertModel(",
        )
    )
    add(
        f"*Why:* padded into a batch, these windows would cost {len(windows)} x {max(w['length'] for w in windows)} "
        f"positions; packed they cost {total}, and no work is spent on padding. Positions restart at each window "
        f"(position ids at row indices 0, {windows[0]['length'] - 1}, {windows[0]['length']}: "
        f"`{run.facts['position_ids_restart']}`) and attention stays inside each window (stage 5), so each "
        "window is computed exactly as if it were alone.\n"
    )

    add("## 4. Embeddings\n")
    add(
        f"Each token id picks a row of the word embedding, `{s['word_embeddings']}`; each position picks a row of the "
        f"position embedding, `{s['position_embeddings']}` (broadcast over the batch); their sum goes through "
        f"LayerNorm and dropout: `{s['embeddings']}`.\n"
    )
    add(src.quote(model, "words = self.word_embeddings(input_ids)", "return self.dropout(self.LayerNorm(embeddings))"))
    add(src.quote(model, "self.LayerNorm = nn.LayerNorm(config.dim, eps=1e-12)"))
    add(
        "*Why eps 1e-12:* the checkpoint was trained with BERT's epsilon of 1e-12, not PyTorch's default 1e-5; "
        "the epsilon is added to each token's variance, so another value shifts every normalised number and breaks "
        "the exact agreement with the reference that the parity tests demand. After LayerNorm every token vector "
        f"has mean 0 and standard deviation 1 before the learned scale and shift (at initialisation, where the scale "
        f"is 1 and the shift 0, this run measures largest |mean| {run.facts['embedding_mean']} and mean std "
        f"{run.facts['embedding_std']}).\n"
    )
    add(src.function(model, "sinusoidal_position_table"))
    add(
        src.quote(
            model,
            "if isinstance(module, Embeddings) and self.config.sinusoidal_pos_embds:",
            "module.position_embeddings.weight.data.copy_(table)",
        )
    )
    add(
        "*Why a sinusoidal table at initialisation:* the published configuration sets `sinusoidal_pos_embds`, so a "
        "model built from scratch starts from the fixed sin/cos table of *Attention is all you need* (row 1 of this "
        f"run's table begins `{run.facts['position_row_1']}` = sin 1, cos 1, sin 1/10000^(2/768), ...; its last "
        f"columns, the slowest frequencies, are `{run.facts['position_row_1_far']}`). It only sets the starting "
        "point: loading a checkpoint replaces it with the checkpoint's stored table.\n"
    )

    add(f"## 5. {config.n_layers} transformer blocks\n")
    add(
        "Each block is self-attention then a feed-forward network, each wrapped as `LayerNorm(x + sublayer(x))`. "
        "Self-attention projects every token to a query, a key and a value, splits them into "
        f"{config.n_heads} heads of {config.dim // config.n_heads}, lets each head mix the values with weights "
        "softmax(QK^T / sqrt(head_dim)), then concatenates the heads and projects back.\n"
    )
    add(src.quote(model, "query = split_heads(self.q_lin(x))", "return self.out_lin(context), weights"))
    add(src.quote(attention, "scale = query.size(-1) ** -0.5", "return context, (weights if need_weights else None)"))
    add(
        f"Shapes in this run: queries, keys and values per head `{s['query']}` (batch, heads, tokens, head_dim), "
        f"with a `{s['mask']}` mask; the core returns `{s['context']}`. On one window alone, with "
        f"`output_attentions=True`, the attention weights are {s['attention_weights'][0]} maps of "
        f"`{s['attention_weights'][1:]}` (batch, heads, query, key); every row sums to 1 (checked in this run: "
        f"{run.facts['rows_sum_to_one']}). Packed windows reach a core through `attend`, which runs the core on "
        "each window in turn unless the core handles packed windows itself:\n"
    )
    add(src.function(attention, "attend"))
    add(
        src.quote(
            model,
            "attended, weights = self.attention(x, mask, need_weights, head_mask)",
            "x = self.output_layer_norm(self.ffn(x) + x)",
        )
    )
    add(src.quote(model, "hidden = self.activation(self.lin1(x))", "return self.dropout(self.lin2(hidden))"))
    add(
        "*Why post-LN:* the LayerNorm comes *after* each residual sum, as in the original Transformer and BERT, "
        "because that is how the checkpoint was trained; a pre-LN block (LayerNorm first, as in GPT-2) computes a "
        "different function of the same weights.\n"
    )
    add("The output of each stage of every block, from forward hooks on the model's modules:\n")
    add("| block | q_lin | attention | after sa_layer_norm | FFN hidden (lin1) | FFN out | after output_layer_norm |")
    add("| --- | --- | --- | --- | --- | --- | --- |")
    for i, b in enumerate(run.block_shapes):
        add(
            f"| {i} | `{b['q_lin']}` | `{b['attention']}` | `{b['sa_layer_norm']}` | `{b['lin1']}` | `{b['ffn']}` | "
            f"`{b['output_layer_norm']}` |"
        )
    add("")
    add(
        f"With `output_hidden_states=True` the model returns {s['hidden_states'][0]} hidden states of "
        f"`{s['hidden_states'][1:]}`: the embeddings, then the output of each block.\n"
    )

    add("## 6. The span head\n")
    add(
        f"A single linear layer reads each token's final vector and gives two numbers, `{s['qa_outputs']}`: the "
        f"logit that the answer starts there and that it ends there, `{s['start_logits']}` each.\n"
    )
    add(src.quote(model, "self.dropout = nn.Dropout(config.qa_dropout)"))
    add(
        src.quote(
            model, "logits = self.qa_outputs(self.dropout(x))", "start_logits, end_logits = logits.unbind(dim=-1)"
        )
    )
    add(
        "*Why dropout before the head:* during fine-tuning it drops parts of the final vectors so that the head "
        "cannot lean on a few features; in evaluation mode it does nothing (in this run the start logits equal "
        f"`qa_outputs` applied to the last hidden state exactly: {run.facts['head_is_linear_on_last']}).\n"
    )

    add("## 7. Start and end probabilities\n")
    add(
        f"The pipeline splits the logits back into windows, `{s['decode_logits']}` (windows, longest window), and "
        "turns each window's start logits and end logits into probabilities. Tokens that cannot be in an answer "
        f"(the question, `[SEP]`, padding) get the logit -10000 first; {run.facts['allowed_per_window']} tokens per "
        "window stay allowed.\n"
    )
    add(src.quote(pipeline, "EXCLUDED_LOGIT = -10000.0"))
    add(
        src.quote(
            pipeline,
            "p_start = F.softmax(start_logits.masked_fill(~allowed, EXCLUDED_LOGIT), dim=-1)",
            "p_end[:, 0] = 0.0",
        )
    )
    add(
        "*Why -10000 and not -inf:* it is the reference's value, so the probabilities match it; exp(-10000) "
        "underflows to exactly 0 in float32 (this run: the largest probability of an excluded token is "
        f"{run.facts['excluded_probability']}), and unlike -inf it cannot turn a row with nothing allowed into NaN.\n"
    )
    add(
        '*Why [CLS] stays allowed:* `[CLS]` is the model\'s way to say "no answer in this window": '
        "`p_start[CLS] * p_end[CLS]` is the window's no-answer score (used with `handle_impossible_answer`, the "
        "lowest over the windows). After that it is set to 0, so it is never the start or end of a span "
        f"(allowed in every window here: {run.facts['cls_allowed']}).\n"
    )

    add("## 8. The best span\n")
    add(
        f"A span (s, e) scores `p_start[s] * p_end[e]`, for s <= e < s + max_answer_len ({MAX_ANSWER_LEN}). The "
        f"end probabilities are laid out as `{s['unfold']}` (windows, start, length), so all spans are scored at "
        f"once; a stable sort ranks the `{s['sort']}` scores and each window keeps its best `2 * top_k + 10` "
        f"candidates ({run.facts['candidates_per_window']} here).\n"
    )
    add(
        src.quote(
            pipeline,
            "lengths = min(max_answer_len, seq)",
            "best_scores, best = best_scores[:, :k].tolist(), best[:, :k].tolist()",
        )
    )
    add(
        "*Why a stable sort:* ties are kept in (start, end) order, the order in which the reference's argmax "
        "finds them, so equal scores give the same answer as the reference.\n"
    )

    add("## 9. Token span to characters\n")
    add(
        f"Each token keeps the character offsets of the text it came from. In window {with_answer[0]}, "
        f'"{ANSWER}" is tokens {first_answer["span"][0]}-{first_answer["span"][1]} '
        f"(`{' '.join(first_answer['span_tokens'])}`); with `align_to_words` the span widens to whole words, giving "
        f"characters {first_answer['characters_of_span'][0]}-{first_answer['characters_of_span'][1]} of the context.\n"
    )
    add(src.function(pipeline, "_characters"))
    add(
        "*Why widen to words:* a span that starts or ends inside a word (`##bble`) would cut the word; the "
        "reference widens it to the whole word, and so does distilqa.\n"
    )

    add("## 10-11. Merging across windows, and the answer\n")
    spans_text = ", ".join(f"window {i}: tokens {windows[i]['span'][0]}-{windows[i]['span'][1]}" for i in with_answer)
    merged = run.facts["merged"]
    add(
        f'The same text can be proposed by several windows: "{ANSWER}" is in {len(with_answer)} windows '
        f"({spans_text}). The candidates of all windows are merged by their text, ignoring case, and their scores are "
        f"**summed**; the first one's offsets are kept. For illustration (these scores are made up, not a model's), "
        f"{run.facts['merged_from']} candidates of score 0.25 for this text merge into "
        f"`{{'score': {merged['score']}, 'start': {merged['start']}, 'end': {merged['end']}, "
        f"'answer': {merged['answer']!r}}}`.\n"
    )
    add(
        src.quote(
            pipeline,
            "answers: dict[str, Answer] = {}",
            'return sorted(ranked, key=lambda answer: answer["score"], reverse=True)[:top_k]',
        )
    )
    add(
        "*Why sum:* it is what the reference pipeline does, kept so that answers match it exactly; it favours a text "
        "that several windows (or several token spans widened to the same words) agree on. The `top_k` best remain, "
        "and `answer == context[start:end]` always holds.\n"
    )
    add(
        "## See it with real weights\n\n"
        "`distilqa explain --question ... --context ... --out DIR` draws, for any question, the start and end "
        "probabilities, the attention of every layer and head, and the answer's rank layer by layer, from whatever "
        "checkpoint `--model` names.\n"
    )
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the output file differs from what the code gives"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"file to write or check (default {OUTPUT})")
    parser.add_argument("--source-root", type=Path, default=ROOT, help="the copy of the repository to quote")
    parser.add_argument("--vocab", type=Path, default=VOCAB_FILE, help="the cased vocab.txt")
    args = parser.parse_args(argv)
    try:
        text = render(collect_run(args.vocab), args.source_root)
    except (ValueError, OSError) as error:
        print(f"build_walkthrough: error: {error}", file=sys.stderr)
        return 2
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python docs/build_walkthrough.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    partial = args.output.with_name(args.output.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
