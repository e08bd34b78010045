"""The search's typed protocol of an evaluation session (issue 17): the sessions implement it, and the planning
layer uses a session only through it (no reaching into ``session.applier`` or ``session.table``)."""

from __future__ import annotations

import ast
from types import SimpleNamespace

from conftest import ROOT

from qsweep.search.protocol import SearchSession, SensitivitySession

# qsweep/search/sensitivity.py builds the tables from a session's model and applier (it is the session's
# neighbour, not the planning layer); protocol.py is the one adapter.
PLANNING = [
    p
    for p in sorted((ROOT / "qsweep" / "search").glob("*.py"))
    if p.name not in ("sensitivity.py", "protocol.py")
]


def test_the_sessions_implement_the_protocol():
    from qsweep.bench.synthetic_problem import ProblemSession
    from qsweep.session import EvalSession

    fake_problem = SimpleNamespace(baseline_bytes=100, penalty=10.0)
    assert isinstance(ProblemSession(fake_problem), SearchSession)
    for name in ("score", "baseline", "evaluator", "out_of_memory_is_an_error"):
        assert callable(getattr(EvalSession, name)), name
    assert not isinstance(SimpleNamespace(penalty=10.0), SearchSession)  # no baseline_size_bytes, no score
    assert SensitivitySession.__mro__[1] is SearchSession


def test_the_planning_layer_does_not_reach_through_a_session():
    hits = []
    for path in PLANNING:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("applier", "table", "model")
                and isinstance(node.value, ast.Name)
                and node.value.id == "session"
            ):
                hits.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert hits == []
