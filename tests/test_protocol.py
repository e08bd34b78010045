"""The search's typed protocol of an evaluation session (issue 17): the sessions implement it, and the planning
layer uses a session only through it (no reaching into ``session.applier`` or ``session.table``)."""

from __future__ import annotations

import ast
from types import SimpleNamespace

from conftest import ROOT

from qsweep.search.protocol import SearchSession, SensitivitySession, prepare_formats

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
    for name in ("score", "baseline", "evaluator"):
        assert callable(getattr(EvalSession, name)), name
    assert not isinstance(SimpleNamespace(penalty=10.0), SearchSession)  # no baseline_size_bytes, no score


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


def test_prepare_formats_uses_the_session_method_or_the_applier():
    calls = []
    own = SimpleNamespace(prepare_formats=lambda choices: calls.append(("own", dict(choices))))
    prepare_formats(own, {"a": ["int8"]})
    assert calls == [("own", {"a": ["int8"]})]
    params = [SimpleNamespace(name="a.w", channel_dim=0), SimpleNamespace(name="a.b", channel_dim=None)]
    applier = SimpleNamespace(quantized=lambda name, dim, fmt: calls.append((name, dim, fmt)))
    old = SimpleNamespace(table={"a": SimpleNamespace(params=params)}, applier=applier)
    calls.clear()
    prepare_formats(old, {"a": ["int8", "int4"]})
    assert calls == [("a.w", 0, "int8"), ("a.b", None, "int8"), ("a.w", 0, "int4"), ("a.b", None, "int4")]
    assert SensitivitySession.__mro__[1] is SearchSession
