"""The refine step's proposals on hand-made tables: anchored predictions, calibration, exhaustive ranking."""

from __future__ import annotations

import itertools
import math

import pytest

from qsweep.plan import Plan
from qsweep.search.refine import Measured, calibration, propose
from qsweep.search.sensitivity import SensitivityRow, SensitivityTable
from qsweep.search.space import SearchSpace

UNITS = ("a", "b", "c", "d")
FORMATS = ("fp16", "int4", "int2")
BYTES = {"fp16": 200, "int4": 50, "int2": 25}  # per unit
DELTA = {  # one-unit log-perplexity changes
    ("a", "int4"): 0.010, ("a", "int2"): 0.200,
    ("b", "int4"): 0.002, ("b", "int2"): 0.020,
    ("c", "int4"): 0.004, ("c", "int2"): 0.050,
    ("d", "int4"): 0.030, ("d", "int2"): 0.900,
}  # fmt: skip


def table() -> SensitivityTable:
    rows = [
        SensitivityRow(u, f, 0.0 if f == "fp16" else DELTA[(u, f)], BYTES[f], BYTES[f])
        for u in UNITS
        for f in FORMATS
    ]
    return SensitivityTable(
        "measured", Plan(dict.fromkeys(UNITS, "fp16")), "validation", 1000, tuple(rows), 1.0, 1.0
    )


def space() -> SearchSpace:
    return SearchSpace({u: FORMATS for u in UNITS})


def size(plan: Plan) -> int:
    return sum(BYTES[f] for f in plan.formats.values())


def pred(plan: Plan) -> float:
    return sum(0.0 if f == "fp16" else DELTA[(u, f)] for u, f in plan.formats.items())


def fitness(plan: Plan, delta: float) -> float:
    return 800 / size(plan) - 10 * max(0.0, math.expm1(delta))


def test_calibration_recovers_a_uniform_underprediction():
    plans = [Plan(dict(zip(UNITS, fs, strict=True))) for fs in itertools.product(FORMATS, repeat=4)][1:20]
    measured = [Measured(p, 1.25 * pred(p), size(p)) for p in plans]
    assert calibration(measured, table()) == pytest.approx(1.25)
    assert calibration(measured[:2], table()) == 1.0  # too few plans: trust the table
    assert calibration([Measured(p, 100 * pred(p), size(p)) for p in plans], table()) == 8.0  # clamped


def test_the_proposal_is_the_best_predicted_one_or_two_unit_move_from_the_incumbent():
    inc = Plan({"a": "int4", "b": "int4", "c": "int4", "d": "fp16"})
    interaction = 0.05  # measured worse than the additive prediction: the anchor carries it
    measured = [Measured(inc, pred(inc) + interaction, size(inc))]
    got = propose(
        measured, table(), space(), {u: BYTES for u in UNITS}, baseline_bytes=800, penalty=10.0, n=5
    )
    # brute force over every plan within two unit changes of the incumbent (alpha = 1: one measured plan)
    best = []
    for fs in itertools.product(FORMATS, repeat=4):
        p = Plan(dict(zip(UNITS, fs, strict=True)))
        changed = sum(p[u] != inc[u] for u in UNITS)
        if 1 <= changed <= 2:
            best.append((fitness(p, pred(inc) + interaction + pred(p) - pred(inc)), p))
    best.sort(key=lambda x: -x[0])
    assert [g.plan for g in got] == [p for _, p in best[:5]]
    assert [g.predicted_fitness for g in got] == pytest.approx([f for f, _ in best[:5]])
    assert all(g.anchor == inc for g in got)


def test_measured_plans_are_never_proposed_and_moves_stay_local():
    plans = [Plan(dict(zip(UNITS, fs, strict=True))) for fs in itertools.product(FORMATS, repeat=4)]
    measured = [Measured(p, pred(p), size(p)) for p in plans[::2]]
    top = sorted(measured, key=lambda m: -fitness(m.plan, m.delta_nll))[:3]
    got = propose(
        measured, table(), space(), {u: BYTES for u in UNITS}, baseline_bytes=800, penalty=10.0, n=50
    )
    assert got and len({g.plan for g in got}) == len(got)
    for g in got:
        assert g.plan not in {m.plan for m in measured}
        assert g.anchor in {m.plan for m in top}
        assert 1 <= sum(g.plan[u] != g.anchor[u] for u in UNITS) <= 2
    assert propose([], table(), space(), {u: BYTES for u in UNITS}, baseline_bytes=800, penalty=10.0) == []
