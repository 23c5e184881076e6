"""The package's architecture: imports point one way (no cycles; methods and models never import runners),
every package says what belongs in it, and every registered reproduction is reachable from the CLI."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autorecbench"


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (at the top, inside functions, under TYPE_CHECKING alike)."""
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path

    def owner(name: str) -> str | None:  # the module a dotted name lives in (a class's module, a package)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package[: len(package) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                found = owner(target) if target.split(".")[0] == root.name else None
                if found and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    assert cycles(module_graph(PACKAGE)) == []


def test_methods_and_models_never_import_runners() -> None:
    graph = module_graph(PACKAGE)
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                   if m.startswith(("autorecbench.methods", "autorecbench.models"))
                   and t.startswith("autorecbench.runners"))
    assert wrong == []


def test_the_checks_catch_a_cycle_and_a_wrong_direction(tmp_path: Path) -> None:
    """Control: the same checks on a small package that has a cycle (one of its edges under TYPE_CHECKING, one
    inside a function, one relative) and a model importing a runner."""
    root = tmp_path / "autorecbench"
    for folder in ("models", "runners"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from autorecbench.b import X\n")
    (root / "b.py").write_text("def f():\n    from .c import Y\nX = 1\n")
    (root / "c.py").write_text("import autorecbench.a\nY = 2\n")
    (root / "models" / "m.py").write_text("from autorecbench.runners import offline\n")
    (root / "runners" / "offline.py").write_text("")
    graph = module_graph(root)
    assert cycles(graph) == [["autorecbench.a", "autorecbench.b", "autorecbench.c"]]
    assert "autorecbench.runners.offline" in graph["autorecbench.models.m"]


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE))
def test_every_package_says_what_belongs_in_it(package: str) -> None:
    init = next(p for p in PACKAGE.rglob("__init__.py") if p.parent.name == package)
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def test_every_registered_reproduction_is_a_command() -> None:
    from autorecbench.reproduce import REPRODUCTIONS

    done = subprocess.run([sys.executable, "-m", "autorecbench", "reproduce", "--help"], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, check=True)
    for item in REPRODUCTIONS:
        assert item.name in done.stdout
    makefile = (PACKAGE.parent / "Makefile").read_text()
    assert "reproduce-%:" in makefile
