"""The package's shape (issue 8): every module is drawn in the README's layout section, no module is over 400
lines, imports form no cycle (counting imports inside functions), and the layers only import downwards.

Read from the source with ``ast`` (nothing is imported), so these run in milliseconds.
"""

from __future__ import annotations

import ast
import fnmatch
import re

import pytest
from conftest import ROOT

PKG = ROOT / "qsweep"
MODULES = {
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
    for p in sorted(PKG.rglob("*.py"))
}
# Modules below the search flow: they import nothing above them (README "How a search is built").
CORE = {"formats", "kquants", "heads", "rules", "units", "plan", "families", "size", "apply", "prefix", "model", "data", "corpus", "device",
        "evaluate", "metrics", "score", "config", "paths", "errors", "interrupts", "memory"}  # fmt: skip


def _imports(path) -> list[tuple[str, bool]]:
    """(qsweep module imported, inside a function?) for every import of ``path``; ``TYPE_CHECKING`` blocks skipped."""
    out: list[tuple[str, bool]] = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, inside) for a in child.names if a.name in MODULES)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "") in MODULES:
                out.append((child.module, inside))
                out.extend((f"{child.module}.{a.name}", inside) for a in child.names
                           if f"{child.module}.{a.name}" in MODULES)  # fmt: skip
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return out


GRAPH = {m: {t for t, _ in _imports(p) if t != m} for m, p in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a package and its own submodules excepted), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if m.startswith(t + ".") or t.startswith(m + "."):  # a package re-exporting its submodules
                continue
            if state.get(t) == 1:
                return [*stack[stack.index(t) :], t]
            if t not in state and (found := dfs(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state and (found := dfs(m)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) is None


def test_layers_import_only_downwards():
    for m, targets in GRAPH.items():
        parts = m.split(".")
        for t in targets:
            if len(parts) == 2 and parts[1] in CORE:
                assert t.split(".")[1] in CORE, f"{m} (core) imports {t}"
            if t.startswith("qsweep.bench"):
                assert m.startswith("qsweep.bench"), f"{m} imports the benchmark {t}"
            if t.startswith("qsweep.export"):  # the benchmarks sit above everything, export included
                assert m.startswith(("qsweep.export", "qsweep.__main__", "qsweep.bench")), f"{m} imports {t}"
            if t in ("qsweep.app", "qsweep.report"):
                assert m in ("qsweep.__main__", "qsweep.app"), f"{m} imports {t}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_400_lines(module):
    assert len(MODULES[module].read_text().splitlines()) <= 400


def test_the_readme_draws_every_module():
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## How a search is built.*?(?=^## )", text, re.S | re.M).group(0)
    words = set(re.findall(r"[\w*]+(?:\.py)?", section))
    missing = []
    for m, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        parts = m.split(".")
        if parts[1] == "bench":  # benchmarks are named without .py, families by a glob (synthetic*)
            if not any(fnmatch.fnmatch(parts[2], w) for w in words):
                missing.append(m)
        elif path.name not in words:
            missing.append(m)
    assert not missing, f"README 'How a search is built' does not name: {missing}"
