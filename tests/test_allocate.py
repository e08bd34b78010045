"""The exact allocator against brute force on small random instances: budgets, the predicted front, best fitness."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from qsweep.errors import QsweepError
from qsweep.plan import Plan
from qsweep.search.allocate import (
    Allocation,
    AllocationError,
    allocate,
    best_predicted_fitness,
    predicted_delta_nll,
    predicted_front,
)
from qsweep.search.sensitivity import SensitivityRow, SensitivityTable

FORMATS = ["fp16", "int8", "int4", "int3_g32", "int2_g32"]


def instance(seed: int):
    """4-6 searchable units of 2-4 formats (random deltas, some negative; random byte sizes) plus 0-2 fixed units."""
    rng = random.Random(seed)
    choices: dict[str, tuple[str, ...]] = {}
    for i in range(rng.randint(4, 6)):
        choices[f"u{i}"] = tuple(rng.sample(FORMATS, rng.randint(2, 4)))
    for i in range(rng.randint(0, 2)):
        choices[f"fixed{i}"] = ("fp32",)
    rows, sizes = [], {}
    for u, c in choices.items():
        for j, f in enumerate(c):
            d = 0.0 if j == 0 else rng.uniform(-0.01, 0.5)
            m, p = rng.randint(100, 5000), rng.randint(100, 5000)
            rows.append(SensitivityRow(u, f, d, m, p))
            sizes.setdefault(u, {})[f] = p
    base = Plan({u: c[0] for u, c in choices.items()})
    table = SensitivityTable("proxy", base, "validation", 100, tuple(rows), 1.0, 1.0)
    return table, choices, sizes


def all_plans(table, choices, sizes):
    """Every plan the menu allows: (plan, size, delta)."""
    units = list(choices)
    for combo in itertools.product(*(choices[u] for u in units)):
        plan = Plan(dict(zip(units, combo, strict=True)))
        size = sum(sizes[u][f] for u, f in plan.formats.items())
        yield plan, size, predicted_delta_nll(table, plan)


TOL = 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_allocate_equals_brute_force(seed):
    table, choices, sizes = instance(seed)
    plans = list(all_plans(table, choices, sizes))
    smallest = min(s for _, s, _ in plans)
    largest = max(s for _, s, _ in plans)
    rng = random.Random(1000 + seed)
    budgets = [
        smallest - 1,
        smallest,
        largest,
        largest + 5,
        *(rng.randint(smallest, largest) for _ in range(6)),
    ]
    for budget in budgets:
        got = allocate(table, choices, sizes, budget)
        fits = [(p, s, d) for p, s, d in plans if s <= budget]
        if not fits:
            assert got is None, budget
            continue
        best = min(d for _, _, d in fits)
        assert isinstance(got, Allocation) and got.budget_bytes == budget
        assert got.size_bytes <= budget
        assert got.delta_nll == pytest.approx(best, abs=TOL)
        # the reported numbers are the plan's own
        assert got.size_bytes == sum(sizes[u][f] for u, f in got.plan.formats.items())
        assert got.delta_nll == pytest.approx(predicted_delta_nll(table, got.plan), abs=1e-12)
        assert got.predicted_degradation == pytest.approx(math.expm1(got.delta_nll))
        # the smallest plan among those with the least delta; fixed units keep their format
        assert got.size_bytes == min(s for _, s, d in fits if d <= best + TOL)
        assert all(got.plan[u] == c[0] for u, c in choices.items() if len(c) == 1)


@pytest.mark.parametrize("seed", range(6))
def test_predicted_front_is_pareto_and_spans_the_sizes(seed):
    table, choices, sizes = instance(seed)
    plans = list(all_plans(table, choices, sizes))
    front = predicted_front(table, choices, sizes, n_points=7)
    assert 1 <= len(front) <= 7
    assert len({a.plan for a in front}) == len(front)
    for a, b in itertools.pairwise(front):
        assert a.size_bytes < b.size_bytes and a.delta_nll > b.delta_nll
    for a in front:  # nothing smaller-or-equal predicts better
        assert not any(s <= a.size_bytes and d < a.delta_nll - TOL for _, s, d in plans)
    assert front[0].size_bytes == min(s for _, s, _ in plans)
    assert front[-1].delta_nll == pytest.approx(min(d for _, _, d in plans), abs=TOL)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("penalty", [1.0, 10.0])
def test_best_predicted_fitness_equals_brute_force(seed, penalty):
    table, choices, sizes = instance(seed)
    plans = list(all_plans(table, choices, sizes))
    baseline = max(s for _, s, _ in plans)

    def fit(s, d):
        return baseline / s - penalty * max(0.0, math.expm1(d))

    want = max(fit(s, d) for _, s, d in plans)
    got = best_predicted_fitness(table, choices, sizes, baseline, penalty)
    assert got.fitness(baseline, penalty) == pytest.approx(want, abs=1e-7)


def test_failed_rows_are_never_chosen():
    table, choices, sizes = instance(0)
    u = next(u for u, c in choices.items() if len(c) > 1)
    cheapest = min(choices[u], key=lambda f: sizes[u][f])
    rows = [
        SensitivityRow(r.unit, r.format, math.inf, r.model_size_bytes, r.packed_size_bytes)
        if (r.unit, r.format) == (u, cheapest)
        else r
        for r in table.rows
    ]
    broken = SensitivityTable("measured", table.base_plan, "validation", 100, tuple(rows), 1.0, 1.0)
    for a in predicted_front(broken, choices, sizes, 5):
        assert a.plan[u] != cheapest and math.isfinite(a.delta_nll)


def test_mismatched_inputs_are_user_errors():
    table, choices, sizes = instance(1)
    u = next(u for u, c in choices.items() if len(c) > 1)
    extra = next(f for f in FORMATS if f not in choices[u])
    wider = {**choices, u: (*choices[u], extra)}
    with pytest.raises(QsweepError, match=f"no row for unit '{u}' in format '{extra}'"):
        allocate(table, wider, sizes, 10**9)
    short = {**sizes, u: {f: s for f, s in sizes[u].items() if f != choices[u][0]}}
    with pytest.raises(AllocationError, match=f"no size given for unit '{u}' in format '{choices[u][0]}'"):
        allocate(table, choices, short, 10**9)


def test_the_solver_cannot_write_to_the_commands_stdout(capfd):
    import os

    from qsweep.search.allocate import _solver_stdout_muted

    print("before", flush=True)
    with _solver_stdout_muted():
        os.write(
            1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n"
        )  # as C code does
    print("after", flush=True)
    assert capfd.readouterr().out == "before\nafter\n"
