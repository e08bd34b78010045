"""Benchmarks inject what they change (an allocator, a session) instead of patching modules (issue 17).

Read with ``ast``: an assignment (plain, augmented, annotated or ``del``) to an attribute of a name that an import
bound, or a ``setattr``/``delattr`` on anything but ``self``, anywhere in ``qsweep/bench``, fails.
"""

from __future__ import annotations

import ast

import pytest
from conftest import ROOT

BENCH = sorted((ROOT / "qsweep" / "bench").rglob("*.py"))


def module_patches(source: str) -> list[str]:
    """``line: code`` of every patch of an imported name's attribute in ``source``."""
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {a.asname or a.name for a in node.names}
    found = []

    def patches_import(target) -> bool:  # mod.x = ..., mod.x.y = ..., mod.table[k] = ...
        if isinstance(target, (ast.Tuple, ast.List)):
            return any(patches_import(t) for t in target.elts)
        if isinstance(target, ast.Starred):
            return patches_import(target.value)
        through_attribute = False
        while isinstance(target, (ast.Attribute, ast.Subscript)):
            through_attribute |= isinstance(target, ast.Attribute)
            target = target.value
        return through_attribute and isinstance(target, ast.Name) and target.id in imported

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        if any(patches_import(t) for t in targets):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr")
            and not (node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "self")
        ):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", BENCH, ids=lambda p: p.name)
def test_no_benchmark_patches_a_module(path):
    assert module_patches(path.read_text()) == []


def test_the_scanner_finds_the_patches_it_forbids():
    source = """
from qsweep.search import phases, warmstart
import qsweep.search.allocate as allocate
import optuna

def f(memo):
    phases.allocator_plans = memo
    allocate.predicted_front.cache = {}
    optuna.logging.level += 1
    for m in (phases, warmstart):
        setattr(m, "predicted_front", memo)

class C:
    def __init__(self):
        self.x = 1
        setattr(self, "y", 2)
        table = {}
        table[phases] = 1
        a, (phases.b, c) = 1, (2, 3)
"""
    assert sorted((line.split(":")[0] for line in module_patches(source)), key=int) == [
        "7",
        "8",
        "9",
        "11",
        "19",
    ]
