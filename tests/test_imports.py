"""The package's import graph has no cycles, counting imports inside functions too.

A function-level import hides a cycle from Python (the module is complete by the time the function
runs) but not from a reader: the two modules still depend on each other. So every ``import`` of a
``saereward`` module anywhere in a file is an edge; only ``if TYPE_CHECKING:`` blocks are left out.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files(src: Path = SRC) -> dict[str, Path]:
    """``{"saereward.x.y": path}`` for every module of the package under ``src``."""
    out = {}
    for p in sorted((src / "saereward").rglob("*.py")):
        parts = list(p.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _targets(node: ast.AST, module: str, is_pkg: bool, mods: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if is_pkg else module.split(".")[:-1]
            base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


def _walk_runtime(tree: ast.AST) -> list[ast.AST]:
    """All nodes except those inside ``if TYPE_CHECKING:`` blocks."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, function-level imports included."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_pkg = path.name == "__init__.py"
        graph[name] = {t for n in _walk_runtime(tree) for t in _targets(n, name, is_pkg, mods)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules, first repeated last), or None."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_cycle_finder_finds_a_planted_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "saereward"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from saereward.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import saereward.a\n")
    graph = import_graph(module_files(tmp_path))
    assert graph["saereward.a"] == {"saereward.sub.b"} and graph["saereward.sub.b"] == {"saereward.c"}
    assert find_cycle(graph) is None  # the TYPE_CHECKING import is not an edge
    (pkg / "c.py").write_text("def g():\n    import saereward.a\n")
    (pkg / "__init__.py").write_text("from saereward import c\n")
    cycle = find_cycle(import_graph(module_files(tmp_path)))
    assert cycle is not None and cycle[0] == cycle[-1] and "saereward.a" in cycle


def test_the_package_has_no_import_cycle() -> None:
    mods = module_files()
    assert len(mods) > 40
    cycle = find_cycle(import_graph(mods))
    if cycle is not None:
        pytest.fail("import cycle: " + " -> ".join(cycle))


# The layers of docs/architecture.md, top to bottom: a module imports only its own layer or those above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "io", "lock", "hub", "config", "stats", "stages", "plots", "threads", "metrics"),
    ("model", "tasks", "options"),
    ("data",),
    ("sae",),
    ("features",),
    ("rl",),
    ("analysis",),
    ("gates",),
    ("report", "pipeline", "cli", "cli_schema", "__main__", "integrations"),
)
# config resolves dtype "auto" through lm, imported inside the function so config stays torch-free
ALLOWED_UPWARD = {("saereward.config", "saereward.model.lm")}


def layer_of(module: str) -> int:
    head = module.removeprefix("saereward.").split(".")[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module} is in no layer of docs/architecture.md: add it to LAYERS and the doc")


def test_imports_run_down_the_layers() -> None:
    graph = import_graph(module_files())
    upward = [
        f"{a} -> {b}"
        for a, targets in graph.items()
        if a != "saereward"
        for b in targets
        if b != "saereward" and layer_of(b) > layer_of(a) and (a, b) not in ALLOWED_UPWARD
    ]
    assert not upward, "imports that run upward: " + "; ".join(sorted(upward))
