"""The refine step's proposals on hand-made tables: anchored predictions, calibration, exhaustive ranking."""

from __future__ import annotations

import itertools
import math
import re

import pytest

from qsweep.errors import ConfigError
from qsweep.plan import Plan
from qsweep.search.config import search_config
from qsweep.search.refine import POWER_RANGE, Calibration, Measured, calibration, propose
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


def one_unit_first(ranked, bar):
    """``ranked`` (value, plan, units moved) in refine's order: one-unit moves above ``bar`` first, then by value."""
    return sorted(ranked, key=lambda x: (x[2] == 1 and x[0] > bar, x[0]), reverse=True)


def test_calibration_recovers_a_uniform_underprediction():
    plans = [Plan(dict(zip(UNITS, fs, strict=True))) for fs in itertools.product(FORMATS, repeat=4)][1:20]
    measured = [Measured(p, 1.25 * pred(p), size(p)) for p in plans]
    g = calibration(measured, table())
    assert (g.scale, g.power) == pytest.approx((1.25, 1.0))
    assert calibration(measured[:2], table()) == Calibration()  # too few plans: trust the table


def test_calibration_recovers_a_superadditive_power_law_and_is_local():
    # low-bit plans interact: measured = 3 * pred ** 1.5, so a 1-unit change costs more on a degraded plan
    plans = [Plan(dict(zip(UNITS, fs, strict=True))) for fs in itertools.product(FORMATS, repeat=4)][1:40]
    g = calibration([Measured(p, 3 * pred(p) ** 1.5, size(p)) for p in plans], table())
    assert (g.scale, g.power) == pytest.approx((3.0, 1.5))
    assert g(0.2) - g(0.1) == pytest.approx(3 * (0.2**1.5 - 0.1**1.5))
    assert float(g(-0.04)) == pytest.approx(-3 * 0.04**1.5)  # odd extension: a table may say a format helps
    # a through-zero slope fitted to the same points would over-predict the change near a mild plan 2x or more
    slope = sum(pred(p) * 3 * pred(p) ** 1.5 for p in plans) / sum(pred(p) ** 2 for p in plans)
    assert slope * 0.01 > 2 * (g(0.02) - g(0.01))
    wild = calibration([Measured(p, pred(p) ** 6, size(p)) for p in plans], table())
    assert wild.power == POWER_RANGE[1]  # clamped


def test_the_proposal_is_the_best_predicted_one_or_two_unit_move_from_the_incumbent():
    inc = Plan({"a": "int4", "b": "int4", "c": "int4", "d": "fp16"})
    interaction = 0.05  # measured worse than the additive prediction: the anchor carries it
    measured = [Measured(inc, pred(inc) + interaction, size(inc))]
    got = propose(  # the table as given (learning from measurements: tests/test_posterior.py)
        measured,
        table(),
        space(),
        {u: BYTES for u in UNITS},
        baseline_bytes=800,
        penalty=10.0,
        n=5,
        learn=False,
    )
    # brute force over every plan within two unit changes of the incumbent (alpha = 1: one measured plan)
    best = []
    for fs in itertools.product(FORMATS, repeat=4):
        p = Plan(dict(zip(UNITS, fs, strict=True)))
        changed = sum(p[u] != inc[u] for u in UNITS)
        if 1 <= changed <= 2:
            best.append((fitness(p, pred(inc) + interaction + pred(p) - pred(inc)), p, changed))
    best = one_unit_first(best, fitness(inc, pred(inc) + interaction))
    assert {c for *_, c in best[:5]} == {1, 2}  # one-unit moves above the incumbent, then the rest by fitness
    assert [g.plan for g in got] == [p for _, p, _ in best[:5]]
    assert [g.predicted_fitness for g in got] == pytest.approx([f for f, *_ in best[:5]])
    assert all(g.anchor == inc for g in got)


def test_a_long_refine_still_reaches_the_unmeasured_moves_below_the_measured_best_ones():
    # after many turns the best-ranked moves around an incumbent are all measured: the proposal is then the best
    # move left, not none (the candidate list was once cut before the measured plans were removed, and refine
    # handed its budget to the sampler with 30 neighbours unmeasured)
    inc = Plan({"a": "int4", "b": "int4", "c": "int4", "d": "fp16"})
    measured = [Measured(inc, pred(inc), size(inc))]
    ranked = []
    for fs in itertools.product(FORMATS, repeat=4):
        p = Plan(dict(zip(UNITS, fs, strict=True)))
        if 1 <= (changed := sum(p[u] != inc[u] for u in UNITS)) <= 2:
            ranked.append((fitness(p, pred(p)), p, changed))
    ranked = one_unit_first(ranked, fitness(inc, pred(inc)))
    assert len(ranked) == 32  # 8 one-unit and 24 two-unit moves

    def ask(exclude):
        return propose(measured, table(), space(), {u: BYTES for u in UNITS}, baseline_bytes=800, penalty=10.0,
                       exclude=exclude, learn=False)  # fmt: skip

    for k in (0, 12, 24, 31):
        got = ask({p.digest() for _, p, _ in ranked[:k]})
        assert [g.plan for g in got] == [ranked[k][1]]
    assert ask({p.digest() for _, p, _ in ranked}) == []  # every neighbour measured: nothing to propose


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


def test_hypervolume_gain_equals_the_difference_of_hypervolumes():
    import numpy as np

    from qsweep.search.front import hypervolume, hypervolume_gain

    rng = np.random.default_rng(0)
    box = (0.5, 1.2)
    for _ in range(20):
        front = [tuple(p) for p in rng.uniform([0.1, 1.0], [0.6, 1.3], size=(rng.integers(0, 8), 2))]
        cand = rng.uniform([0.1, 1.0], [0.6, 1.3], size=(50, 2))
        for i, (fx, fy) in enumerate(front):  # ties: on a step's size, on a step's height, on a step
            cand[i, 0], cand[10 + i, 1], cand[20 + i] = fx, fy, (fx, fy)
        got = hypervolume_gain(front, cand[:, 0], cand[:, 1], box)
        want = [hypervolume([*front, tuple(c)], box) - hypervolume(front, box) for c in cand]
        assert got == pytest.approx(want, abs=1e-12)
    assert hypervolume_gain([(0.2, 1.1)], np.array([np.inf, 0.3]), np.array([1.0, np.inf]), box).tolist() == [
        0,
        0,
    ]


def test_the_hypervolume_criterion_proposes_the_largest_predicted_gain_from_any_front_member():
    from qsweep.search.front import hypervolume

    # a measured front of two plans with a gap between them; the additive table is exact (alpha = 1)
    plans = [Plan(dict(zip(UNITS, fs, strict=True))) for fs in (("int4", "int4", "int4", "int4"),
                                                                ("fp16", "int4", "int4", "int4"),
                                                                ("int2", "int2", "int2", "int4"))]  # fmt: skip
    measured = [Measured(p, pred(p), size(p)) for p in plans]
    box = (0.5, 1.2)
    got = propose(measured, table(), space(), {u: BYTES for u in UNITS}, baseline_bytes=800, penalty=10.0, n=3,
                  criterion="hypervolume", box=box, learn=False)  # fmt: skip

    def point(p):
        return (size(p) / 800, math.exp(pred(p)))

    front = [point(p) for p in plans]
    base = hypervolume(front, box)
    gains = []
    inside = [m for m in plans if point(m)[0] < box[0] and point(m)[1] < box[1]]
    for fs in itertools.product(FORMATS, repeat=4):  # brute force: within two changes of a front member
        p = Plan(dict(zip(UNITS, fs, strict=True)))
        near = any(1 <= sum(p[u] != m[u] for u in UNITS) <= 2 for m in inside)
        gain = hypervolume([*front, point(p)], box) - base
        if near and p not in plans and gain > 0:
            gains.append((gain, p, min(sum(p[u] != m[u] for u in UNITS) for m in inside)))
    gains = one_unit_first(gains, 0.0)
    assert got and [g.value for g in got] == pytest.approx([g for g, *_ in gains[: len(got)]])
    assert got[0].plan == gains[0][1]
    assert all(g.value > 0 for g in got)


def test_an_unknown_refine_criterion_is_refused():
    with pytest.raises(ValueError, match="unknown refine criterion 'hv'; valid: fitness, hypervolume"):
        propose(
            [], table(), space(), {u: BYTES for u in UNITS}, baseline_bytes=800, penalty=10.0, criterion="hv"
        )


def test_a_jump_is_predicted_from_the_measured_plan_sharing_most_units_and_ranked_by_gain():
    near = Plan({"a": "int4", "b": "int4", "c": "int4", "d": "int4"})
    far = Plan({"a": "fp16", "b": "fp16", "c": "fp16", "d": "fp16"})
    measured = [Measured(near, pred(near) + 0.01, size(near)), Measured(far, 0.0, size(far))]
    jump = Plan({"a": "int4", "b": "int2", "c": "int2", "d": "int4"})  # 2 units from `near`, 4 from `far`
    got = propose(measured, table(), space(), {u: BYTES for u in UNITS}, baseline_bytes=800, penalty=10.0,
                  n=100, criterion="hypervolume", box=(0.5, 1.2), jumps=[jump, near], learn=False)  # fmt: skip
    mine = [g for g in got if g.plan == jump]
    assert len(mine) == 1 and mine[0].anchor == near  # measured `near` itself is never proposed again
    assert mine[0].predicted_delta_nll == pytest.approx(pred(jump) + 0.01)  # alpha = 1 (two measured plans)
    assert mine[0].size_bytes == size(jump)
    key = [(g.units_moved == 1 and g.value > 0, g.value) for g in got]  # one-unit moves with a gain first
    assert key == sorted(key, reverse=True) and mine[0].units_moved == 2


@pytest.mark.parametrize("box", [[0.5], [0.0, 1.2], [1.5, 1.2], [0.5, 1.0]])
def test_a_bad_front_box_is_refused_naming_the_key(box):
    from qsweep.errors import ConfigError
    from qsweep.search.config import search_config

    with pytest.raises(ConfigError, match=r"search.front_box must be \[max size ratio in \(0, 1\]"):
        search_config({"name": "x", "sampler": "nsga2", "front_box": box})
    assert search_config({"name": "x", "sampler": "nsga2"}).front_box == [0.5, 1.2]


def test_the_refine_policy_owns_its_schedule_and_takes_its_knobs_from_the_search_config():
    from qsweep.search.refine import RefinePolicy

    search = search_config({"name": "x", "sampler": "nsga2"})
    policy = RefinePolicy.of(search, baseline_bytes=1000, penalty=10.0)
    assert (policy.multi, policy.schedule, policy.incumbents, policy.jumps, policy.box) == (
        True, ("fitness", "hypervolume", "hypervolume"), 3, 64, (0.5, 1.2))  # fmt: skip
    # one turn in three by fitness; the other criterion is each turn's fallback
    assert [policy.criteria(k)[0] for k in range(6)] == ["fitness", "hypervolume", "hypervolume"] * 2
    assert policy.criteria(1) == ["hypervolume", "fitness"] and policy.criteria(3) == [
        "fitness",
        "hypervolume",
    ]
    single = RefinePolicy.of(
        search_config({"name": "x", "sampler": "tpe", "objective": "fitness"}), 1000, 10.0
    )
    assert [single.criteria(k) for k in range(3)] == [["fitness"]] * 3
    custom = search_config({"name": "x", "sampler": "nsga2", "refine_schedule": ["hypervolume"],
                            "refine_incumbents": 5, "refine_jumps": 0})  # fmt: skip
    policy = RefinePolicy.of(custom, 1000, 10.0)
    assert policy.criteria(0) == ["hypervolume", "fitness"] and policy.incumbents == 5
    assert (policy.learn, policy.optimism) == (True, 1.0)
    blind = RefinePolicy.of(search_config({"name": "x", "sampler": "nsga2", "refine_learn": False,
                                           "refine_optimism": 0.0}), 1000, 10.0)  # fmt: skip
    assert (blind.learn, blind.optimism) == (False, 0.0)
    assert policy.jump_plans(None, None, {}, None) == []  # no jumps asked for: the allocator is not consulted


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"refine_schedule": ["hv"]}, "search.refine_schedule must list criteria of fitness, hypervolume"),
        ({"refine_schedule": []}, "search.refine_schedule must list criteria"),
        ({"refine_incumbents": 0}, "search.refine_incumbents must be >= 1"),
        ({"refine_jumps": -1}, "search.refine_jumps >= 0"),
        ({"refine_jumpz": 3}, "unknown key search.refine_jumpz"),
        ({"refine_share": 1.5}, "search.refine_share must be in [0, 1]"),
        ({"refine_optimism": -1.0}, "search.refine_optimism must be a finite number >= 0"),
    ],
)
def test_bad_refine_knobs_are_refused_naming_the_key(setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        search_config({"name": "x", "sampler": "nsga2", **setting})


def test_the_old_name_of_the_seed_accounting_is_an_alias_with_a_deprecation_line(caplog):
    """``search.size_metric=model`` (what conf comments once said) is ``seed``, with one warning naming it."""
    with caplog.at_level("WARNING", logger="qsweep"):
        s = search_config({"name": "x", "sampler": "nsga2", "size_metric": "model"})
    assert s.size_metric == "seed"
    assert [r.getMessage() for r in caplog.records] == [
        "search.size_metric=model is deprecated; use search.size_metric=seed (the same accounting)"
    ]
    caplog.clear()
    assert search_config({"name": "x", "sampler": "nsga2", "size_metric": "seed"}).size_metric == "seed"
    assert not caplog.records
    with pytest.raises(ConfigError, match=re.escape("unknown search.size_metric 'modl'")):
        search_config({"name": "x", "sampler": "nsga2", "size_metric": "modl"})


def test_the_best_unseen_candidates_are_found_through_ties_and_masked_entries():
    import numpy as np

    from qsweep.search.refine import _best_unseen

    # ties at the partial sort's boundary once hid an unmeasured candidate (fitness ties: equal byte changes)
    values = np.array([0, 0, 1, 0, 0, 2, 0, 1, 2, 1, 0, 2, 2, 1], float)
    assert _best_unseen(values, 1, lambda i: i if i == 0 else None) == [0]
    rng = np.random.default_rng(0)
    for _ in range(300):
        values = rng.integers(0, 3, size=int(rng.integers(1, 60))).astype(float)
        values[rng.random(len(values)) < 0.2] = -np.inf  # masked moves (same unit, no gain)
        unseen = set(rng.choice(len(values), size=min(3, len(values)), replace=False).tolist())
        got = _best_unseen(values, 2, lambda i, unseen=unseen: i if i in unseen else None)
        want = sorted((i for i in unseen if np.isfinite(values[i])), key=lambda i: -values[i])[:2]
        assert len(got) == len(set(got)) == len(want)
        assert [values[i] for i in got] == [values[i] for i in want]  # best first


def test_a_fitness_turn_takes_predicted_gains_then_hopeful_one_unit_moves_then_the_rest():
    import random

    # learned and optimistic: a move whose mean beats the best measured plan outranks a one-unit move that beats it
    # only at its upper bound, which outranks every other move (the largest of many optimistic pairs included)
    plans = [Plan(dict(zip(UNITS, fs, strict=True))) for fs in itertools.product(FORMATS, repeat=4)]
    rng = random.Random(2)
    measured = [Measured(p, pred(p) * rng.uniform(0.8, 1.5), size(p)) for p in rng.sample(plans, 10)]
    got = propose(measured, table(), space(), {u: BYTES for u in UNITS}, baseline_bytes=800, penalty=10.0, n=500,
                  optimism=2.0)  # fmt: skip
    bar = max(fitness(m.plan, m.delta_nll) for m in measured)
    tiers = [(g.predicted_fitness > bar, g.units_moved == 1 and g.value > bar) for g in got]
    assert set(tiers) == {
        (True, True),
        (True, False),
        (False, True),
        (False, False),
    }  # every tier is exercised
    key = [(*t, g.value) for t, g in zip(tiers, got, strict=True)]
    assert key == sorted(key, reverse=True)
    hopeful = [g for g, t in zip(got, tiers, strict=True) if t == (False, True)]
    assert any(
        g.value < max(h.value for h in got if h.units_moved == 2) for g in hopeful
    )  # ranked up, not by value
