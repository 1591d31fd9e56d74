"""The package's structure: imports run only downward through its layers, with no circle.

Every import is read with ``ast``, at module level and inside functions alike (a lazy import is still
a dependency). The layers are those of the README's picture; a module missing from LAYERS fails the
test, so a new module is placed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distilqa"
# Bottom first. A module may import its own layer or any below, never one above.
LAYERS = [
    # small parts that import no other layer's modules
    {"files", "validate", "options", "config", "hardware", "hub", "tokenization", "pruning", "linear", "squad",
     "plotting", "metrics", "kernels", "kernels.flash_attention"},
    {"attention", "weights", "testing"},  # attention cores (over kernels/), checkpoint loading, test helpers
    {"model"},  # the network
    {"pipeline", "train", "heads", "export", "parity", "explain"},  # workflows
    {"cli", "serve", "bulk", "web", ""},  # interfaces ("" is the package's __init__)
]  # fmt: skip


def import_graph() -> dict[str, set[str]]:
    modules = {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix("__init__").rstrip("."): path
        for path in PACKAGE.rglob("*.py")
    }
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target != "distilqa" and not target.startswith("distilqa."):
                    continue
                target = target.removeprefix("distilqa").lstrip(".")
                while target and target not in modules:  # `from distilqa.x import name` -> module x
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert sorted(set(import_graph()) - placed) == [], "place new modules in LAYERS"


def test_imports_run_only_downward():
    rank = {module: level for level, layer in enumerate(LAYERS) for module in layer}
    upward = sorted(
        f"{module or 'distilqa'} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if rank[target] > rank[module]
    )
    assert upward == []


def test_no_import_circles():
    graph = import_graph()
    circles = set()
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            module, path = stack.pop()
            for target in graph[module]:
                if target == start:
                    circles.add(" -> ".join((*path, start)))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, (*path, target)))
    assert sorted(circles) == []


def test_kernels_are_imported_only_through_attention_and_model_imports_nothing_above_it():
    graph = import_graph()
    users = sorted(m for m, targets in graph.items() if any(t.startswith("kernels") for t in targets))
    assert users == ["attention", "kernels"]
    assert graph["model"] <= {"attention", "config", "linear", "pruning", "validate", "weights"}
