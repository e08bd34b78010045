"""Selection without a model: the Pareto set against brute force, top-k and feasibility, the paired comparison."""

from __future__ import annotations

import itertools
import json
import math
import random

import optuna
import pytest
import torch

from qsweep.evaluate import EvalResult
from qsweep.plan import Plan
from qsweep.score import PlanScore
from qsweep.search.objective import constraint_of, is_done
from qsweep.search.select import candidates, paired_fitness_difference, pareto_indices


def brute_front(points):
    """Non-dominated points by definition (minimisation); of equal points the first is kept."""
    out = []
    for i, p in enumerate(points):
        dominated = any(
            all(b <= a for a, b in zip(p, q, strict=True)) and (q != p or j < i)
            for j, q in enumerate(points)
            if j != i
        )
        if not dominated:
            out.append(i)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_pareto_indices_equal_brute_force(seed):
    rng = random.Random(seed)
    n, dims = rng.randint(1, 40), rng.choice([2, 3])
    # small integer grids: many ties and equal points, the cases a sloppy front gets wrong
    points = [tuple(rng.randint(0, 6) for _ in range(dims)) for _ in range(n)]
    got = pareto_indices(points)
    assert got == brute_front(points)
    for i in got:  # and nothing outside the front dominates anything inside it
        assert not any(
            all(b <= a for a, b in zip(points[i], q, strict=True)) and q != points[i] for q in points
        )


def _trial(number, ppl, size, *, fitness, degradation, state="COMPLETE", digest=None, error=None):
    attrs = {"plan": json.dumps({"version": 1, "units": {"a": "fp16"}}), "plan_digest": digest or f"d{number}",
             "perplexity": ppl, "packed_size_bytes": size, "model_size_bytes": size, "fitness_packed": fitness,
             "degradation": degradation, "enqueued_as": "", "error": error}  # fmt: skip
    t = optuna.trial.create_trial(
        state=getattr(optuna.trial.TrialState, state),
        values=None if state != "COMPLETE" else [ppl, size],
        user_attrs=attrs,
    )
    t.number = number
    return t


def test_top_k_by_fitness_skips_infeasible_failed_and_duplicate_plans():
    trials = [
        _trial(0, 10.0, 100, fitness=1.0, degradation=0.00),
        _trial(1, 10.5, 60, fitness=1.6, degradation=0.04),
        _trial(2, 12.0, 40, fitness=2.2, degradation=0.20),  # best fitness, but over a 5% ceiling
        _trial(3, 10.4, 70, fitness=1.4, degradation=0.03),
        _trial(4, 10.5, 60, fitness=1.6, degradation=0.04, digest="d1"),  # the same plan as trial 1
        _trial(5, 0, 0, fitness=9.9, degradation=None, state="FAIL", error="non-finite loss"),
    ]
    got = candidates(trials, kind="fitness", size_metric="packed", top_k=2, max_degradation=0.05)
    assert [c.trial for c in got] == [1, 3]
    got = candidates(trials, kind="fitness", size_metric="packed", top_k=10)
    assert [c.trial for c in got] == [2, 1, 3, 0]
    front = candidates(trials, kind="multi", size_metric="packed")
    assert [c.trial for c in front] == [2, 1, 3, 0]  # sorted by size; trial 4 repeats trial 1's plan
    front = candidates(trials, kind="multi", size_metric="packed", max_degradation=0.05)
    assert [c.trial for c in front] == [1, 3, 0]
    assert is_done(trials[5]) and not is_done(_trial(6, 1, 1, fitness=0, degradation=0, state="FAIL"))


def test_constraint_values():
    assert constraint_of(0.03, None) is None
    assert constraint_of(0.03, 0.05) == pytest.approx(-0.02)
    assert constraint_of(None, 0.05) == 1e300  # a failed plan is infeasible, stored as a finite number


def _score(window_nll, tokens, base_ppl, size, penalty=10.0):
    nll = torch.tensor(window_nll, dtype=torch.float64)
    toks = torch.tensor(tokens, dtype=torch.int64)
    result = EvalResult(float(nll.sum()), int(toks.sum()), nll, toks, 0.0)
    plan = Plan({"a": "fp16"})
    return PlanScore(plan, "test", result, base_ppl, size, size, 1000, {}, 16.0, penalty)


def test_paired_fitness_difference_known_answers():
    tokens = [50, 70, 60, 40, 80, 55]
    rng = random.Random(0)
    base_nll = [n * (3.0 + rng.uniform(-0.5, 0.5)) for n in tokens]
    base = _score(base_nll, tokens, 0, 1000).result
    base_ppl = math.exp(sum(base_nll) / sum(tokens))
    # a: every token 0.01 nats worse (exactly +1.005% perplexity), half the size; b: identical to the baseline
    a = _score([x + 0.01 * n for x, n in zip(base_nll, tokens, strict=True)], tokens, base_ppl, 500)
    b = _score(base_nll, tokens, base_ppl, 1000)
    diff, lo, hi = paired_fitness_difference(a, b, base, "packed")
    expected = (2.0 - 10 * math.expm1(0.01)) - 1.0
    assert diff == pytest.approx(expected, rel=1e-9)
    assert lo == pytest.approx(expected, abs=1e-9) and hi == pytest.approx(
        expected, abs=1e-9
    )  # no noise: no width
    same = paired_fitness_difference(b, b, base, "packed")
    assert same == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)


def test_paired_fitness_difference_interval_reflects_window_noise():
    gen = torch.Generator().manual_seed(1)
    tokens = [64] * 40
    base_nll = (3.0 + 0.3 * torch.randn(40, generator=gen, dtype=torch.float64)) * 64
    noise = 0.02 * torch.randn(40, generator=gen, dtype=torch.float64) * 64
    base = _score(base_nll.tolist(), tokens, 0, 1000).result
    base_ppl = math.exp(float(base_nll.sum()) / (64 * 40))
    a = _score((base_nll + 0.02 * 64 + noise).tolist(), tokens, base_ppl, 400)
    b = _score(base_nll.tolist(), tokens, base_ppl, 500)
    diff, lo, hi = paired_fitness_difference(a, b, base, "packed")
    # b is the baseline itself, so (paired) diff = const - 10 * expm1(mean per-token shift of a): by the delta
    # method its standard error is 10 * exp(shift) * sd(window shifts) / sqrt(40). A bootstrap that resampled the
    # baseline apart from the plans widens the interval by ~75% and moves its centre by ~1.5 standard errors.
    shift = noise / 64  # [40] per-token shift of each window, minus the common 0.02
    se = 10 * math.exp(0.02 + float(shift.mean())) * float(shift.std(unbiased=False)) / math.sqrt(40)
    assert hi - lo == pytest.approx(2 * 1.959964 * se, rel=0.15)
    assert abs((lo + hi) / 2 - diff) < 0.25 * se
    # the interval is the bootstrap's: a second seed moves its ends by little, never the point
    d2, lo2, hi2 = paired_fitness_difference(a, b, base, "packed", seed=1)
    assert d2 == diff and abs(lo2 - lo) < 0.05 and abs(hi2 - hi) < 0.05


def test_pareto_of_three_objectives_all_orderings():
    pts = [(1, 3, 2), (2, 1, 3), (3, 2, 1), (2, 2, 2), (3, 3, 3)]
    for perm in itertools.permutations(range(len(pts))):
        shuffled = [pts[i] for i in perm]
        assert sorted(shuffled[i] for i in pareto_indices(shuffled)) == sorted(pts[:4])


def test_the_lower_bound_rule_prefers_the_plan_whose_loss_is_known_best():
    """Two plans with the same point fitness on the search split: ``lcb`` takes the one with the narrower
    degradation interval (its fitness at the interval's upper end is higher); ``fitness`` takes the larger point
    estimate even when its interval is wide; a record without an interval counts its point estimate."""
    from qsweep.search.select import Candidate, Verified, choose, selection_score

    def rec(comp, deg, hi):
        return {"fitness_packed": comp - 10 * max(0.0, deg), "compression_packed": comp, "degradation": deg,
                "degradation_ci95_high": hi, "packed_size_bytes": int(1e6 / comp)}  # fmt: skip

    wide, narrow = rec(4.0, 0.05, 0.09), rec(3.99, 0.049, 0.055)  # point: 3.5 vs 3.50; lcb: 3.1 vs 3.44
    assert selection_score(wide, "packed", 10.0, "lcb") == pytest.approx(4.0 - 0.9)
    assert selection_score(narrow, "packed", 10.0, "lcb") == pytest.approx(3.99 - 0.55)
    assert (
        selection_score({**wide, "degradation_ci95_high": None}, "packed", 10.0, "lcb")
        == wide["fitness_packed"]
    )
    assert selection_score(wide, "packed", 0.0, "lcb") == 4.0  # no penalty: compression alone
    vs = [
        Verified(Candidate(i, "", Plan({"u": f}), r), None)
        for i, (f, r) in enumerate([("int8", wide), ("int4", narrow)])
    ]
    assert choose(vs, "lcb", "packed", 10.0).candidate.trial == 1
    assert choose(vs, "fitness", "packed", 10.0).candidate.trial == 0
    assert choose([], "lcb", "packed", 10.0) is None


def test_the_verdict_compares_with_the_best_uniform_plan_within_the_ceiling():
    """A uniform plan over search.max_degradation is no reference (the user ruled it out); a chosen plan that is one
    of the uniform plans is said to be, whichever it is."""
    from qsweep.search.select import Candidate, Verified, best_vs_uniform

    def uniform(number, fmt, fitness, degradation):
        t = _trial(number, 10.0, 100, fitness=fitness, degradation=degradation, digest=f"u-{fmt}")
        t.user_attrs["enqueued_as"] = f"uniform:{fmt}"
        t.user_attrs["plan"] = json.dumps({"version": 1, "units": {"a": fmt}})
        return t

    trials = [uniform(0, "int4", 3.5, 0.06), uniform(1, "int8", 3.0, 0.02), _trial(2, 10.1, 80, fitness=3.2,
              degradation=0.03, digest="mixed")]  # fmt: skip
    ref = _score([30.0, 31.0], [10, 10], 20.0, 100)

    def verified(trial):
        return Verified(Candidate.of(trial), ref)

    asked = []

    def score(plan):
        asked.append(plan)
        raise StopIteration  # which plan the verdict scores is all this test needs

    with pytest.raises(StopIteration):  # the mixed plan: compared with int8, not with the infeasible int4
        best_vs_uniform(
            verified(trials[2]), trials, lambda split: ref.result, score, "packed", max_degradation=0.05
        )
    with pytest.raises(StopIteration):  # without a ceiling, int4 is the best uniform plan
        best_vs_uniform(verified(trials[2]), trials, lambda split: ref.result, score, "packed")
    assert asked == [Plan({"a": "int8"}), Plan({"a": "int4"})]
    got = best_vs_uniform(
        verified(trials[1]), trials, lambda split: ref.result, score, "packed", max_degradation=0.05
    )
    assert got == {"uniform": "uniform:int8", "best_is_uniform": True, "difference": 0.0, "ci95": [0.0, 0.0]}
    got = best_vs_uniform(verified(trials[1]), trials, lambda split: ref.result, score, "packed")
    assert (
        got["uniform"] == "uniform:int8" and got["best_is_uniform"]
    )  # a uniform plan, if not the fittest one
