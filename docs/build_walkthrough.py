"""Write docs/walkthrough.md from the template docs/walkthrough.in.md, the source it quotes and a real run.

    python docs/build_walkthrough.py            # regenerate docs/walkthrough.md
    python docs/build_walkthrough.py --check    # exit 1 if docs/walkthrough.md is not what the code gives

The template is markdown with two kinds of directive:

    @quote model.eager_attention                      a whole function, class or method (module.Qual.name),
    @quote pipeline.QuestionAnswerer._run "ids =" "return"   or its lines from the first holding "ids ="
                                                      to the next holding "return" (one line if no end)
    {{name}}                                          a value of the run: tokens, window lengths, shapes

Symbols are found with ``ast`` in ``distilqa/<module>.py``, so a quote follows its code as it moves; a
changed quoted line changes the page, and tests/test_walkthrough.py fails until this script is rerun. A
symbol or line that is gone is an error naming it. The run answers the question with QuestionAnswerer at
the published configuration (random weights, seeded) and the real cased vocabulary; forward hooks and a
torch function mode record the shapes. Numbers that depend on trained weights are left out.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE, OUTPUT = ROOT / "docs" / "walkthrough.in.md", ROOT / "docs" / "walkthrough.md"
VOCAB_FILE = ROOT.parent / "shared" / "data" / "vocab" / "bert-base-cased-vocab.txt"
QUESTION = "Which space shuttle carried Hubble into orbit?"
CONTEXT = (
    "The Hubble Space Telescope was launched into low Earth orbit on 24 April 1990 aboard the Space Shuttle "
    "Discovery. It was not the first space telescope, but it is one of the largest and most versatile, and it is "
    "well known both as a vital research tool and as a public relations boon for astronomy."
)
MAX_SEQ_LEN, DOC_STRIDE, SEED = 40, 12, 0  # small windows, so that there are several on the page


def quote(spec: str, root: Path = ROOT) -> str:
    """The markdown block of ``@quote`` ``spec``: file:lines heading with a link, then the code."""
    name, *marks = shlex.split(spec)
    module, qualname = name.split(".", 1)
    path = f"distilqa/{module}.py"
    lines = (root / path).read_text(encoding="utf-8").split("\n")
    nodes, first, last = ast.parse("\n".join(lines)).body, None, None
    for part in qualname.split("."):
        node = next((n for n in nodes if getattr(n, "name", None) == part), None)
        if node is None:
            raise ValueError(f"{qualname!r} not found in {path}: update docs/walkthrough.in.md")
        nodes = node.body
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
    last = node.end_lineno - 1
    if marks:
        first, last = find(lines, marks[0], first, last, path), last
        last = find(lines, marks[1], first, last, path) if len(marks) > 1 else first
    where = f"{path}:{first + 1}" + (f"-{last + 1}" if last > first else "")
    anchor = f"L{first + 1}" + (f"-L{last + 1}" if last > first else "")
    code = textwrap.dedent("\n".join(lines[first : last + 1]))
    # Verbatim source, a fragment out of its context: the markers keep `ruff format` off it.
    return f"<!-- fmt:off -->\n[`{where}`](../{path}#{anchor})\n\n```python\n{code}\n```\n<!-- fmt:on -->"


def find(lines: list[str], mark: str, first: int, last: int, path: str) -> int:
    found = next((i for i in range(first, last + 1) if mark in lines[i]), None)
    if found is None:
        raise ValueError(f"line {mark!r} not found in {path}:{first + 1}-{last + 1}: update docs/walkthrough.in.md")
    return found


@torch.inference_mode()
def collect_run(vocab_file: Path = VOCAB_FILE) -> dict[str, str]:
    """Answer the example once, recording tokens, windows and the shape at every stage."""
    from distilqa import pipeline
    from distilqa.config import DistilBertConfig
    from distilqa.model import DistilBertForQuestionAnswering
    from distilqa.tokenization import QuestionContextTokenizer, build_wordpiece_tokenizer

    tokenizer = QuestionContextTokenizer(build_wordpiece_tokenizer(vocab_file, lowercase=False))
    torch.manual_seed(SEED)
    config = DistilBertConfig()  # the published configuration
    model = DistilBertForQuestionAnswering(config, attn_implementation="eager").eval()
    shapes: dict[str, object] = {}

    def keep(name: str, value: object) -> None:
        shapes.setdefault(name, tuple(value.shape) if isinstance(value, torch.Tensor) else value)

    def hook(name: str):
        return lambda module, inputs, output: keep(name, output[0] if isinstance(output, tuple) else output)

    block = model.distilbert.transformer.layer[0]
    modules = {"embeddings": model.distilbert.embeddings, "q_lin": block.attention.q_lin, "block": block,
               "attention": block.attention, "lin1": block.ffn.lin1, "qa_outputs": model.qa_outputs}  # fmt: skip
    for name, module in modules.items():
        module.register_forward_hook(hook(name))

    def inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        keep("ids", args[0])
        keep("lengths", list(kwargs["window_lengths"]))

    model.register_forward_pre_hook(inputs, with_kwargs=True)

    class Calls(torch.overrides.TorchFunctionMode):  # the first query and scores the written-out core sees
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("matmul", "softmax") and len(args[0].shape) == 4:
                keep(f"{name}_input", args[0])
            return func(*args, **(kwargs or {}))

    decode_spans = pipeline.decode_spans
    pipeline.decode_spans = lambda start, *rest: keep("decode", start) or decode_spans(start, *rest)
    try:
        with Calls():
            answerer = pipeline.QuestionAnswerer(model, tokenizer)
            answerer(QUESTION, CONTEXT, max_seq_len=MAX_SEQ_LEN, doc_stride=DOC_STRIDE)
    finally:
        pipeline.decode_spans = decode_spans
    question = tokenizer.tokenizer.encode(QUESTION).tokens
    windows = tokenizer.encode_windows([QUESTION], [CONTEXT], MAX_SEQ_LEN, DOC_STRIDE)[0]
    first = len(question)  # a window's context starts after the question's tokens
    table = [f"| {i} | {len(w.ids)} | `{' '.join(w.tokens[first : first + 4])} …` |" for i, w in enumerate(windows)]
    values = {name: f"`{value}`" for name, value in shapes.items()}
    values |= {"question": QUESTION, "context": CONTEXT, "max_seq_len": MAX_SEQ_LEN, "doc_stride": DOC_STRIDE,
               "seed": SEED, "dim": config.dim, "layers": config.n_layers, "heads": config.n_heads,
               "head_dim": config.head_dim, "hidden_dim": config.hidden_dim, "vocab_size": config.vocab_size,
               "question_tokens": f"`{' '.join(question)}`", "question_count": len(question), "windows": len(windows),
               "window_tokens": "\n".join(table)}  # fmt: skip
    return {name: str(value) for name, value in values.items()}


def render(values: dict[str, str], root: Path = ROOT, template: Path = TEMPLATE) -> str:
    """The page: the template's values filled in and its quotes taken from the source under ``root``."""
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m[1]], template.read_text(encoding="utf-8"))
    return re.sub(r"^@quote (.+)$", lambda m: quote(m[1], root), text, flags=re.M)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/walkthrough.md is current")
    parser.add_argument("--vocab", type=Path, default=VOCAB_FILE, help="the cased vocabulary (vocab.txt)")
    args = parser.parse_args(argv)
    page = render(collect_run(args.vocab))
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") == page
        print("docs/walkthrough.md is current" if current else "docs/walkthrough.md is stale: run it without --check")
        return 0 if current else 1
    OUTPUT.write_text(page, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
