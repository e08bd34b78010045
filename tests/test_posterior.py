"""The refine step's table corrected by measurements (qsweep.search.posterior): what it learns, and from what."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from qsweep.plan import Plan
from qsweep.search.posterior import posterior_table
from qsweep.search.refine import Calibration, Measured, propose
from qsweep.search.sensitivity import SensitivityRow, SensitivityTable
from qsweep.search.space import SearchSpace
from tests.test_refine import BYTES, DELTA, FORMATS, UNITS, pred, size, space, table

IDENTITY = Calibration().inverse
ALL = [Plan(dict(zip(UNITS, fs, strict=True))) for fs in itertools.product(FORMATS, repeat=len(UNITS))]


def truth_sum(truth, plan: Plan) -> float:
    return sum(truth.get((u, f), 0.0) for u, f in plan.formats.items())


def rel_errors(t: SensitivityTable, truth) -> np.ndarray:
    return np.array([abs(t.delta(u, f) - v) / v for (u, f), v in truth.items()])


def test_nothing_measured_leaves_the_table_as_it_is():
    t = table()
    assert posterior_table(t, [], [], IDENTITY) == (t, None)


def test_enough_measured_plans_recover_an_additive_truth_the_table_got_wrong():
    rng = random.Random(0)
    truth = {k: v * rng.uniform(0.4, 2.5) for k, v in DELTA.items()}  # every row off by its own factor
    plans = ALL[:]
    rng.shuffle(plans)

    def error(n: int) -> float:
        post, _ = posterior_table(table(), plans[:n], [truth_sum(truth, p) for p in plans[:n]], IDENTITY)
        return float(np.median(rel_errors(post, truth)))

    errors = [error(n) for n in (0, 12, 40, 81)]
    assert errors[0] > 0.25  # the table as given
    assert errors[1] < errors[0] and errors[2] < 0.1 and errors[3] < 0.05


def test_one_measured_move_reprices_the_units_other_formats_and_leaves_other_units_nearly_alone():
    truth = {(u, f): v * (3.0 if u == "d" else 1.0) for (u, f), v in DELTA.items()}  # the proxy misjudged d
    inc = Plan({"a": "int4", "b": "int4", "c": "int4", "d": "fp16"})
    moved = Plan({**inc.formats, "d": "int4"})
    post, _ = posterior_table(
        table(), [inc, moved], [truth_sum(truth, inc), truth_sum(truth, moved)], IDENTITY
    )
    t = table()
    # d's int4 row moves most of the way to the truth, and its int2 row goes up with it (a shared unit error)
    assert post.delta("d", "int4") > t.delta("d", "int4") + 0.5 * (truth["d", "int4"] - t.delta("d", "int4"))
    assert post.delta("d", "int2") > 1.2 * t.delta("d", "int2")
    for u in "abc":  # the other units' int2 rows (never measured) move by a quarter at most (explained away)
        assert post.delta(u, "int2") == pytest.approx(t.delta(u, "int2"), rel=0.25)


def test_a_failed_row_and_the_row_order_are_kept():
    t = table()
    rows = [SensitivityRow(r.unit, r.format, math.inf if (r.unit, r.format) == ("d", "int2") else
                           r.delta_nll_per_token, r.model_size_bytes, r.packed_size_bytes) for r in t.rows]  # fmt: skip
    t = SensitivityTable(t.kind, t.base_plan, t.split, t.n_tokens, tuple(rows), 1.0, 1.0)
    plans = ALL[1:30]
    deltas = [2 * pred(p) if p["d"] != "int2" else math.inf for p in plans]
    post, _ = posterior_table(t, plans, deltas, IDENTITY)
    assert [(r.unit, r.format) for r in post.rows] == [(r.unit, r.format) for r in t.rows]
    assert post.delta("d", "int2") == math.inf
    assert post.delta("a", "int4") > 1.5 * t.delta("a", "int4")  # every measured plan twice the table's sum


def test_the_calibrations_inverse_undoes_it():
    g = Calibration(3.0, 1.5)
    y = np.array([-0.2, 0.0, 1e-4, 0.3, 5.0])
    assert g(g.inverse(y)) == pytest.approx(y)


def _refine_loop(learn: bool, optimism: float, steps: int, seed: int = 1, n_units: int = 6) -> list[float]:
    """Refine alone on a problem whose table misjudges some units 3x (both ways): the true fitness of the best
    plan after each measurement, from the uniform plans."""
    rng = random.Random(seed)
    units = [f"u{i}" for i in range(n_units)]
    formats = ("fp16", "int8", "int4", "int3")
    nbytes = {"fp16": 200, "int8": 100, "int4": 50, "int3": 38}
    base = {"fp16": 0.0, "int8": 0.0005, "int4": 0.006, "int3": 0.03}
    proxy = {(u, f): base[f] * rng.uniform(0.5, 2.0) for u in units for f in formats}
    wrong = {u: rng.choice((1 / 3, 1.0, 3.0)) for u in units}
    truth = {(u, f): v * wrong[u] for (u, f), v in proxy.items()}
    rows = [SensitivityRow(u, f, proxy[u, f], nbytes[f], nbytes[f]) for u in units for f in formats]
    t = SensitivityTable(
        "proxy", Plan(dict.fromkeys(units, "fp16")), "validation", 1000, tuple(rows), 1.0, 1.0
    )
    sp = SearchSpace({u: formats for u in units})
    sizes = {u: nbytes for u in units}
    total = 200 * len(units)

    def measure(p: Plan) -> Measured:
        s = sum(truth[u, f] for u, f in p.formats.items())
        return Measured(p, s + 2 * s * s, sum(nbytes[f] for f in p.formats.values()))  # super-additive

    def fit(m: Measured) -> float:
        return total / m.size_bytes - 10 * math.expm1(m.delta_nll)

    measured = [measure(Plan(dict.fromkeys(units, f))) for f in formats]
    best = []
    for _ in range(steps):
        got = propose(
            measured, t, sp, sizes, baseline_bytes=total, penalty=10.0, learn=learn, optimism=optimism
        )
        if not got:
            break
        measured.append(measure(got[0].plan))
        best.append(max(fit(m) for m in measured))
    optimum = max(
        fit(measure(Plan(dict(zip(units, fs, strict=True)))))
        for fs in itertools.product(formats, repeat=n_units)
    )
    return [b / optimum for b in best]


def test_learning_and_optimism_find_the_optimum_sooner_than_the_blind_refine_step():
    """8 seeded problems of 7 units (16,384 plans, optimum by brute force): the steps refine needs to measure the
    optimum. The blind step (the table as given) needs up to 34; learning with optimism at most 10."""

    def steps(learn: bool, optimism: float) -> list[int]:
        out = []
        for seed in range(8):
            got = _refine_loop(learn, optimism, 40, seed=seed, n_units=7)
            out.append(next((i + 1 for i, x in enumerate(got) if x > 1 - 1e-9), 99))
        return out

    blind, learned = steps(False, 0.0), steps(True, 1.0)
    assert max(learned) <= 10 < max(blind)
    assert sum(learned) < 0.6 * sum(blind)


def test_the_posterior_equals_gaussian_process_regression_of_the_documented_model():
    """The module's model written out as one Gaussian process over the rows (its prior covariance K from the
    unit, format and row terms, its misfit covariance S from the plans' distance): the posterior mean
    ``K X' (X K X' + S)^-1 r`` and covariance ``K - K X' (X K X' + S)^-1 X K`` are what posterior_table returns."""
    from qsweep.search import posterior as P

    t = table()
    rng = random.Random(3)
    plans = rng.sample(ALL, 10)
    deltas = [pred(p) * rng.uniform(0.5, 2.0) for p in plans]
    post, cov = posterior_table(t, plans, deltas, IDENTITY)
    rows = [(u, f) for u in UNITS for f in FORMATS if f != "fp16"]
    v = np.array([t.delta(u, f) for u, f in rows])
    floor = P.FLOOR_REL * float(np.median(np.abs(v)))
    same_unit = np.array([[a[0] == b[0] for b in rows] for a in rows])
    same_format = np.array([[a[1] == b[1] for b in rows] for a in rows])
    k = np.outer(v, v) * (P.UNIT_REL**2 * same_unit + P.FORMAT_REL**2 * same_format)
    k += np.diag(P.ROW_REL**2 * v**2 + floor**2)
    x = np.array([[float(p[u] == f) for u, f in rows] for p in plans])
    z = np.array(deltas)
    apart = np.array([[sum(p[u] != q[u] for u in UNITS) for q in plans] for p in plans])
    s = np.outer(P.MISFIT_REL * z, P.MISFIT_REL * z) * np.exp(-apart / P.MISFIT_UNITS) + floor**2 * np.eye(10)
    gain = k @ x.T @ np.linalg.inv(x @ k @ x.T + s)
    mean = v + gain @ (z - x @ v)
    assert [post.delta(u, f) for u, f in rows] == pytest.approx(mean, rel=1e-9, abs=1e-12)
    order = [cov.index[r] for r in rows]
    assert cov.cov[np.ix_(order, order)] == pytest.approx(k - gain @ x @ k, rel=1e-7, abs=1e-14)


def test_optimism_ranks_by_the_spread_and_leaves_the_predictions_at_the_mean():
    from qsweep.search.refine import _spread

    rng = random.Random(4)
    measured = [Measured(p, pred(p) * rng.uniform(0.8, 1.5), size(p)) for p in rng.sample(ALL, 12)]
    kwargs = dict(baseline_bytes=800, penalty=10.0, n=200)
    mean = propose(measured, table(), space(), {u: BYTES for u in UNITS}, optimism=0.0, **kwargs)
    eager = propose(measured, table(), space(), {u: BYTES for u in UNITS}, optimism=3.0, **kwargs)
    by_plan = {p.plan: p for p in mean}
    assert {p.plan for p in eager} == set(by_plan)
    for p in eager:  # the same predictions, ranked by a value at least as good
        assert p.predicted_delta_nll == pytest.approx(by_plan[p.plan].predicted_delta_nll)
        assert p.predicted_fitness == pytest.approx(by_plan[p.plan].predicted_fitness)
        assert p.value >= by_plan[p.plan].value - 1e-12
    # the pair spread is the standard deviation of the two moves' summed row changes
    _, cov = posterior_table(table(), [m.plan for m in measured], [m.delta_nll for m in measured], IDENTITY)
    moves = [("a", "fp16", "int4"), ("b", "int4", "int2"), ("c", "int2", "fp16")]
    one, two = _spread(cov, moves, 2.0)
    vec = cov.vectors(moves)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        both = vec[i] + vec[j]
        assert two[i, j] == pytest.approx(2.0 * math.sqrt(both @ cov.cov @ both))
    assert one == pytest.approx([2.0 * math.sqrt(w @ cov.cov @ w) for w in vec])


def test_identical_plans_and_an_all_zero_table_do_not_break_the_fit():
    t = table()
    zero = SensitivityTable(t.kind, t.base_plan, t.split, t.n_tokens,
                            tuple(SensitivityRow(r.unit, r.format, 0.0, r.model_size_bytes, r.packed_size_bytes)
                                  for r in t.rows), 1.0, 1.0)  # fmt: skip
    p = ALL[5]
    post, cov = posterior_table(zero, [p, p], [0.01, 0.01], IDENTITY)
    assert cov is not None and all(math.isfinite(r.delta_nll_per_token) for r in post.rows)
    assert sum(post.delta(u, f) for u, f in p.formats.items()) > 0  # zero rows move toward the measurement
