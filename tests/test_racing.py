"""Racing (qsweep.search.racing, issue 19): a candidate is dropped only when its paired interval against a measured
plan says it cannot win; partial evaluations are counted by their share; refine trials do not pop the queue."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

from qsweep.bench.synthetic_problem import ProblemSession
from qsweep.metrics import fitness, paired_delta
from qsweep.search.objective import COST_ATTR, Objective, trial_cost
from qsweep.search.racing import MIN_WINDOWS, Incumbent, Race, verdict
from qsweep.search.study import optimize, spent

TOKENS = torch.full((40,), 100, dtype=torch.int64)


@pytest.fixture
def fake_problem():
    from qsweep.bench.synthetic_generate import Spec, generate

    return generate(Spec("race", n_layers=2, width=64, vocab=512, context=64, saturation=1.0, n_interactions=8,
                         strength=1.5), 4)  # fmt: skip


def _incumbent(delta_per_window, size=100, fit=3.0, trial=0):
    nll = TOKENS.double() * (3.0 + torch.as_tensor(delta_per_window, dtype=torch.float64))
    return Incumbent(trial, nll, float((nll - TOKENS.double() * 3.0).sum() / TOKENS.sum()), size, fit)


def _record(size, degradation=0.05, low=0.04):
    return {"packed_size_bytes": size, "model_size_bytes": size, "compression_packed": 400 / size,
            "degradation": degradation, "degradation_ci95_low": low}  # fmt: skip


def test_paired_delta_is_the_ratio_estimator():
    nll, ref = torch.tensor([10.0, 20.0, 30.0]), torch.tensor([9.0, 18.0, 27.0])
    tokens = torch.tensor([10, 20, 30])
    delta, se = paired_delta(nll, ref, tokens)
    assert delta == pytest.approx(6.0 / 60) and se == pytest.approx(0.0, abs=1e-12)  # d_i = 0.1 * n_i exactly
    assert paired_delta(nll[:1], ref[:1], tokens[:1])[1] == math.inf


def test_a_dominated_candidate_is_dropped_and_a_close_one_is_not():
    rng = torch.Generator().manual_seed(0)
    noise = torch.randn(40, generator=rng, dtype=torch.float64) * 0.01
    inc = _incumbent(0.05 + noise, size=100)
    worse = inc.window_nll[:16] + TOKENS[:16] * 0.05  # 0.05 nats per token worse on every window, same size
    close = inc.window_nll[:16] + TOKENS[:16] * (0.002 + noise[:16].flip(0))  # within noise
    kw = {"kind": "multi", "size_metric": "packed", "penalty": 10.0, "z": Race().z_at(16)}
    assert "dominated by trial 0" in verdict(_record(100), worse, TOKENS[:16], [inc], **kw)
    assert verdict(_record(100), close, TOKENS[:16], [inc], **kw) is None
    # a smaller candidate is never dominated by a larger plan, however worse its perplexity
    assert verdict(_record(99), worse, TOKENS[:16], [inc], **kw) is None
    # fewer windows than MIN_WINDOWS: no verdict at all
    few = MIN_WINDOWS - 1
    assert verdict(_record(100), worse[:few], TOKENS[:few], [inc], **kw) is None


def test_the_fitness_race_compares_the_optimistic_fitness_with_the_best():
    inc = _incumbent(torch.full((40,), 0.05), size=100, fit=fitness(4.0, math.expm1(0.05)))
    kw = {"kind": "fitness", "size_metric": "packed", "penalty": 10.0, "z": Race().z_at(16)}
    same_size_worse = inc.window_nll[:10] + TOKENS[:10] * 0.01
    assert "fitness <=" in verdict(_record(100), same_size_worse, TOKENS[:10], [inc], **kw)
    # much smaller: its compression outweighs a slightly larger loss, so it may still win
    assert verdict(_record(80), same_size_worse, TOKENS[:10], [inc], **kw) is None


def test_a_constraint_drops_a_plan_whose_degradation_is_surely_above_it():
    kw = {
        "kind": "multi",
        "size_metric": "packed",
        "penalty": 10.0,
        "z": Race().z_at(10),
        "max_degradation": 0.02,
    }
    nll = TOKENS[:10].double() * 3.1
    assert "max_degradation" in verdict(_record(100, 0.10, 0.09), nll, TOKENS[:10], [], **kw)
    assert verdict(_record(100, 0.021, 0.015), nll, TOKENS[:10], [], **kw) is None


def test_race_stops_need_min_windows_and_end_on_the_whole_split():
    within = lambda share: int(share * 40)  # noqa: E731
    assert Race((0.1, 0.25, 0.5)).stops(40, within) == [10, 20, 40]  # 0.1 -> 4 windows: too few
    assert Race(()).stops(40, within) == [40]


def _objective(problem, kind="multi", full_labels=()):
    session = ProblemSession(problem, n_windows=64)

    def score(plan, stop=None, resume=None):
        return session.score(plan, "validation", stop, resume)

    obj = Objective(problem.space, score, kind=kind, size_metric="packed", windows=session.windows, race=Race(),
                    penalty=problem.penalty, full_labels=full_labels)  # fmt: skip
    return obj, session


def test_losing_plans_are_pruned_at_a_share_and_a_repeat_is_answered_free(fake_problem):
    """Fitness race: after the uniform int8 plan (a reference: evaluated whole), the fp16 plan (compression 1,
    fitness <= 1, far below int8's ~1.9) is dropped at the first stage, a quarter of the split; its trial records
    that share as its cost, the session evaluated exactly that much, and asking for it again costs nothing and is
    pruned again."""
    p = fake_problem
    obj, session = _objective(p, kind="fitness", full_labels=["uniform:int8"])
    study = optuna.create_study(directions=obj.directions)
    plans = p.space.uniform_plans()
    for label, fmt in (("uniform:int8", "int8"), ("x", "fp16"), ("again", "fp16")):
        study.enqueue_trial(p.space.params_of(plans[fmt]), user_attrs={"enqueued_as": label})
    optimize(study, obj, 3, progress=False)
    t0, t1, t2 = study.trials[:3]
    assert t0.state.name == "COMPLETE" and t0.user_attrs[COST_ATTR] == 1.0
    assert t1.state.name == "PRUNED" and t1.user_attrs["pruned"].startswith("racing: fitness <=")
    assert 0.2 < t1.user_attrs[COST_ATTR] <= 0.25 and t1.user_attrs[COST_ATTR] == t1.user_attrs["eval_share"]
    assert (
        t2.state.name == "PRUNED" and t2.user_attrs[COST_ATTR] == 0.0 and t2.user_attrs["duplicate_of"] == 1
    )
    assert session.evaluations == pytest.approx(sum(trial_cost(t) for t in study.trials))
    assert len(study.trials) > 3  # the budget left by the cheap trials went to more trials


def test_refine_trials_run_their_own_plan_and_leave_the_queue_alone(fake_problem):
    p = fake_problem
    obj, _ = _objective(p)
    study = optuna.create_study(directions=obj.directions)
    plans = list(p.space.uniform_plans().values())
    study.enqueue_trial(p.space.params_of(plans[0]), user_attrs={"enqueued_as": "uniform:x"})
    ran = optimize(study, obj, 5, progress=False, params=p.space.params_of(plans[1]),
                   attrs={"enqueued_as": "refine:0"})  # fmt: skip
    assert ran == 1
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["enqueued_as"] for t in waiting] == ["uniform:x"]
    mine = next(t for t in study.trials if t.user_attrs.get("enqueued_as") == "refine:0")
    assert mine.params == p.space.params_of(plans[1]) and mine.state.name in ("COMPLETE", "PRUNED")


def test_the_last_trial_of_a_budget_is_a_partial_evaluation_of_what_is_left(fake_problem):
    p = fake_problem
    obj, _ = _objective(p, full_labels=())
    study = optuna.create_study(directions=obj.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    optimize(study, obj, 2.3, progress=False)
    last = study.trials[-1]
    assert 2.3 - 1 / 64 < spent(study) <= 2.3 + 1e-9
    assert last.user_attrs[COST_ATTR] < 1.0 and last.state.name == "PRUNED"
    assert last.user_attrs["pruned"].startswith(("budget", "racing"))
