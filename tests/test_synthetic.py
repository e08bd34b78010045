"""Synthetic allocation problems: generator determinism, known optima (brute force, exact DP, HiGHS), the session
every qsweep method runs on, baselines, problems from a real sensitivity table, and the search-quality guard."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from qsweep.bench import synthetic as bench
from qsweep.bench.synthetic_baselines import Budget, BudgetSpent, first_k, ga, greedy
from qsweep.bench.synthetic_generate import (
    DEFAULT_SPECS,
    Spec,
    from_sensitivity,
    generate,
    solved,
    write_sets,
)
from qsweep.bench.synthetic_optima import brute_force, pareto_dp
from qsweep.bench.synthetic_problem import Problem, ProblemError, ProblemSession, load_problems
from qsweep.errors import ConfigError
from qsweep.plan import Plan
from qsweep.search.allocate import best_predicted_fitness

SMALL = Spec("small", n_layers=2, width=64, vocab=512, context=64, saturation=1.0)
SMALL_X = Spec("small-x", n_layers=2, width=64, vocab=512, context=64, saturation=1.0, n_interactions=8,
               strength=1.5)  # fmt: skip
# The guard: a GPT-2-like problem (50 units, fp16/int8/int4), separable (exact optimum by the Pareto DP) but with
# saturation and a noisy proxy table, so the allocator's first plans are not the optimum and the search must climb.
GUARD = Spec("guard", saturation=1.0, proxy_noise=0.5)
GUARD_SEED, GUARD_BUDGET = 7, 30


def test_generator_is_deterministic(tmp_path):
    specs = (SMALL, SMALL_X, DEFAULT_SPECS[2])  # brute force, brute force, exact DP
    a, b, c = (write_sets(tmp_path / d, specs, seed=s) for d, s in (("a", 0), ("b", 0), ("c", 1)))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert all(x.read_bytes() != y.read_bytes() for x, y in zip(a, c, strict=True))
    train, _, test = (load_problems(p) for p in a)
    assert [p.name for p in test] == ["small", "small-x", "gpt2-separable"]
    assert not np.array_equal(train[0].delta, test[0].delta)  # the splits are other draws of the same specs
    p = test[2]
    assert (
        p.n_units == 50
        and p.formats == ("fp16", "int8", "int4")
        and p.units[:3] == ("wte", "wpe", "h.0.attn.c_attn")
    )
    assert p.baseline_bytes == 2 * (
        50257 * 768 + 1024 * 768 + 12 * 12 * 768 * 768
    )  # GPT-2 small's weights, fp16
    # round trip: the file reads back to the same problem, optimum included
    assert json.dumps(p.to_dict()) == json.dumps(
        Problem.from_dict(json.loads(json.dumps(p.to_dict()))).to_dict()
    )


def test_brute_force_is_the_optimum_of_every_plan_scored_by_the_session():
    p = generate(
        Spec("tiny", n_layers=1, width=32, vocab=128, context=32, n_interactions=4, saturation=1.0), 3
    )
    session = ProblemSession(p)  # 6 units x 3 formats: 729 plans through the PlanScore path
    fits = {}
    for x in itertools.product(range(3), repeat=p.n_units):
        fits[x] = session.score(p.plan(x)).fitness("packed")
    best = max(fits, key=fits.get)
    opt = brute_force(p)
    assert opt.how == "brute force" and opt.evaluations == 729
    assert opt.fitness == pytest.approx(fits[best], rel=1e-12) and tuple(opt.plan) == best
    # every plan is dominated by (or on) the front
    front = set(zip(opt.front.size.tolist(), opt.front.delta.tolist(), strict=True))
    for x in fits:
        s, d = int(p.sizes(np.array(x))[0]), float(p.delta_nll(np.array(x))[0])
        assert (s, d) in front or any(fs <= s and fd <= d for fs, fd in front)


def test_pareto_dp_equals_brute_force_and_the_highs_allocator():
    p = generate(SMALL, 5)
    bf, dp = brute_force(p), pareto_dp(p)
    assert dp.fitness == pytest.approx(bf.fitness, rel=1e-12)
    assert np.array_equal(dp.front.size, bf.front.size) and np.allclose(
        dp.front.delta, bf.front.delta, rtol=1e-12
    )
    with pytest.raises(ValueError, match="interactions"):
        pareto_dp(generate(SMALL_X, 5))
    # no saturation: the additive model is exact, so HiGHS's exact allocator must find the DP's optimum
    mid = generate(Spec("mid", n_layers=5, width=256, vocab=8192, context=256), 11)
    table = mid.sensitivity_table("measured")
    a = best_predicted_fitness(table, mid.space.choices, table.unit_sizes("packed"), mid.baseline_bytes)
    assert a.fitness(mid.baseline_bytes) == pytest.approx(pareto_dp(mid).fitness, rel=1e-9)


def test_interactions_are_invisible_to_one_unit_changes():
    p = generate(SMALL_X, 2)
    table = p.sensitivity_table("measured")
    base = p.uniform(0)
    for u in range(p.n_units):
        for f in range(1, 3):
            x = base.copy()
            x[u] = f
            assert p.delta_nll(x[None])[0] == pytest.approx(table.delta(p.units[u], p.formats[f]), rel=1e-12)
    i, j, _ = p.interactions[0]
    x = base.copy()
    x[i] = x[j] = (
        2  # both in their worst format (exposure 1): each pair between them adds c x the other's penalty
    )
    extra = sum(c * p.delta[b, 2] for a, b, c in p.interactions if {a, b} == {i, j})
    assert extra > 0
    assert p.delta_nll(x[None])[0] == pytest.approx(
        p.saturate(p.delta[i, 2] + p.delta[j, 2] + extra), rel=1e-12
    )
    s = ProblemSession(p).score(p.plan(x))
    assert s.degradation == pytest.approx(math.expm1(p.delta_nll(x[None])[0]), rel=1e-9)
    assert s.fitness("packed") == pytest.approx(p.fitness(x[None])[0], rel=1e-12)
    assert p.sensitivity_table("proxy").cost_evals == p.proxy_cost_evals


def test_committed_sets_hold_their_stated_optima():
    sets = [load_problems(bench.DATA / f"synthetic_{split}.json") for split in ("train", "valid", "test")]
    assert all([p.name for p in problems] == [s.name for s in DEFAULT_SPECS] for problems in sets)
    (real,) = load_problems(bench.DATA / "synthetic_real_tiny.json")  # the bundled model's proxy table
    assert real.n_units == 26 and real.formats[0] == "fp16" and len(real.formats) == 7 and real.interactions
    for problems in [*sets, [real]]:
        for p in problems:
            o = p.optimum
            x = p.indices(o["plan"])
            assert p.fitness(x[None])[0] == pytest.approx(o["fitness"], rel=1e-9), p.name
            if o["how"] == "brute force":
                assert p.n_units == 10 and p.n_plans == o["evaluations"]
            elif o["how"] == "exact Pareto DP":
                assert p.separable and pareto_dp(p).fitness == pytest.approx(o["fitness"], rel=1e-9)
            else:  # a reference run: at least as good as the separable relaxation's best and every uniform plan
                assert o["how"] == "reference run (not proven)" and o["evaluations"] > 100_000
                relaxed = pareto_dp(p.with_(interactions=())).plan
                assert o["fitness"] >= p.fitness(relaxed[None])[0]
                assert o["fitness"] > max(p.fitness(p.uniform(f)[None])[0] for f in range(len(p.formats)))
                assert len(p.reference_front) > 10


def test_bad_problem_files_are_user_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "problems": [{"name": "x"}]}')
    with pytest.raises(ProblemError, match=r"problem 0: malformed \(KeyError: 'units'\)"):
        load_problems(bad)
    with pytest.raises(ProblemError, match="cannot be read"):
        load_problems(tmp_path / "missing.json")
    p = generate(SMALL, 0)
    with pytest.raises(ProblemError, match="delta has shape"):
        p.with_(delta=p.delta[:, :2])
    with pytest.raises(ProblemError, match="plan does not fit"):
        p.indices(Plan({u: "int2_g32" for u in p.units}))


def test_baselines_respect_their_budget_and_shapes():
    p = generate(GUARD, 1)
    session, space = ProblemSession(p), p.space
    b = Budget(session.score, 20)
    with pytest.raises(BudgetSpent):
        first_k(space, b)
    assert len(b.records) == 20 and session.n_scored == 20
    # k = 0 first (fp16/int8 over everything, then int8/int4), then the first block protected
    assert b.records[0].plan == Plan({u: "int8" for u in p.units})
    third = b.records[2].plan
    assert {third[u] for u in p.units if u.startswith("h.0.")} == {"fp16"} and third["h.1.mlp.c_fc"] == "int8"
    b = Budget(session.score, 10**6)
    greedy(
        space, b, table=p.sensitivity_table("measured"), baseline_bytes=p.baseline_bytes, penalty=p.penalty
    )
    assert len(b.records) == p.n_units * 2 + 1  # the whole path, from all int4 to all fp16
    b = Budget(session.score, 200)
    with pytest.raises(BudgetSpent):
        ga(space, b, seed=0)
    fits = [r.fitness("packed") for r in b.records]
    assert len({r.plan.digest() for r in b.records}) == 200  # distinct plans only: repeats are free
    assert max(fits[100:]) > max(fits[:16])  # it improves on its first population


@pytest.mark.slow  # builds a model and its proxy table: about 8 s on a 2-core CPU
def test_problem_from_a_real_sensitivity_table(tmp_path):
    """The proxy table of a tiny random GPT-2 (what a study writes as sensitivity.json) -> a problem."""
    import torch
    from test_sensitivity import evaluator, tiny4

    from qsweep.apply import PlanApplier
    from qsweep.search.sensitivity import SensitivityTable, proxy_sensitivity, sensitivity_base
    from qsweep.search.space import SearchSpace

    torch.set_num_threads(1)
    model, units = tiny4("gpt2")
    menu = [{"pattern": ".*(ln|norm).*", "formats": ["fp32"]}, {"pattern": ".*", "formats": ["fp16", "int4_g32",
                                                                                              "int2_g32"]}]  # fmt: skip
    space = SearchSpace.from_menu(units, menu)
    base = sensitivity_base(space, Plan.uniform(units, "fp16"))
    table = proxy_sensitivity(PlanApplier(model, units), evaluator(), space, base, split="validation",
                              full_eval_seconds=1.0)  # fmt: skip
    path = table.save(tmp_path / "sensitivity.json")
    loaded = SensitivityTable.load(path)
    p = from_sensitivity(loaded, seed=0, name="tiny-proxy")
    assert p.units == tuple(space.searchable) and p.formats == ("fp16", "int4_g32", "int2_g32")
    assert len(p.interactions) == p.n_units and p.proxy_cost_evals == loaded.cost_evals
    for u, name in enumerate(p.units):  # a one-unit plan scores exactly what the table measured
        assert p.size[u, 1] == loaded.row(name, "int4_g32").packed_size_bytes
        for f in (1, 2):
            x = p.uniform(0)
            x[u] = f
            want = max(0.0, loaded.delta(name, p.formats[f]))
            assert p.delta_nll(x[None])[0] == pytest.approx(want, rel=1e-6, abs=1e-12)
    worst = p.uniform(
        2
    )  # interactions and saturation: all-int2 is worse than the sum of its one-unit changes
    assert p.delta_nll(worst[None])[0] > sum(max(0.0, loaded.delta(u, "int2_g32")) for u in p.units)
    assert json.dumps(from_sensitivity(loaded, seed=0, name="tiny-proxy").to_dict()) == json.dumps(
        p.to_dict()
    )
    # the CLI route: file in, solved problem out (10 units x 3 formats: brute force)
    out = tmp_path / "problem.json"
    assert bench.main(["from-sensitivity", str(path), "--out", str(out)]) == 0
    (q,) = load_problems(out)
    assert q.optimum["how"] == "brute force" and q.optimum["fitness"] == pytest.approx(brute_force(q).fitness)


@pytest.mark.slow  # about 15 s of study machinery on a 2-core CPU
def test_every_method_runs_on_a_problem_and_the_table_prints(capsys, tmp_path):
    path = tmp_path / "set.json"
    from qsweep.bench.synthetic_problem import save_problems

    save_problems([solved(generate(SMALL_X, 4))], path, "test")
    methods = ["uniform", "first_k", "greedy", "ga", "tpe", "allocator", "nsga2_warm"]
    assert bench.main(["--problems", str(path), "--methods", ",".join(methods), "--budgets", "10,20",
                       "--seeds", "0"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| small-x")]
    assert [r.split(" | ")[1] for r in rows] == methods
    ratios = [float(r.split(" | ")[3]) for r in rows]  # fit/opt at 20 evaluations
    assert all(r <= 1 + 1e-9 for r in ratios)  # nothing beats a brute-force optimum


def test_search_settings_take_set_values_and_a_bad_one_is_one_line(capsys):
    """``--set KEY=VALUE`` reaches every study's search settings (a knob A/B-tested on the problems)."""
    s = bench.search_settings("nsga2_warm", 0, 30, {"refine_learn": False, "refine_optimism": 0.0})
    assert (s.refine_learn, s.refine_optimism, s.n_trials, s.warm_start) == (False, 0.0, 30, True)
    with pytest.raises(ConfigError, match=r"search\.refine_share must be in"):
        bench.search_settings("tpe_warm", 0, 30, {"refine_share": 2})
    assert bench.main(["--set", "refine_learn", "--budgets", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set 'refine_learn': expected KEY=VALUE" in err[0]
    assert bench.main(["--set", "search.seed=3", "--budgets", "10"]) == 2
    assert "--set seed: the benchmark sets it for each run" in capsys.readouterr().err
    assert bench.main(["--set", "refine_optimism=-1", "--budgets", "10"]) == 2  # refused before any run
    assert "search.refine_optimism must be a finite number >= 0" in capsys.readouterr().err


def test_guard_default_warm_search_reaches_the_exact_optimum():
    """Search quality from now on: on a seeded 50-unit problem with an exact optimum (Pareto DP), the default
    warm-started study (conf/search/nsga2.yaml: proxy table, allocator plans, NSGA-II, refine) reaches >= 99.5%
    of the optimum within GUARD_BUDGET evaluations (the proxy's cost included); the same sampler without the warm
    start does not, so the test can fail."""
    p = solved(generate(GUARD, GUARD_SEED))
    assert p.optimum["how"] == "exact Pareto DP" and p.n_units == 50
    ref = bench.reference_front(p)
    warm = bench.summarize(
        bench.run_method("nsga2_warm", p, 0, GUARD_BUDGET), GUARD_BUDGET, p.optimum["fitness"], ref
    )
    cold = bench.summarize(
        bench.run_method("nsga2", p, 0, GUARD_BUDGET), GUARD_BUDGET, p.optimum["fitness"], ref
    )
    assert warm["ratio"] >= 0.995, warm
    assert cold["ratio"] < 0.995, cold


def test_multi_objective_refine_turns_are_fitness_then_twice_hypervolume():
    """The refine schedule of a multi-objective study (qsweep.search.phases): one turn in three by fitness; the
    other two fill the front; each turn's criterion is recorded in the trial."""
    from qsweep.search.phases import build_study

    p = solved(generate(SMALL_X, 4))
    session, space = ProblemSession(p), p.space
    search = bench.search_settings("nsga2_warm", 0, 40)
    search.sampler_options = {}
    uniform = {f"uniform:{f}": plan for f, plan in space.uniform_plans().items()}
    run = build_study(space, session.score, search, reference=uniform)
    assert run.objective.kind == "multi"
    run.run(session, p.sensitivity_table("proxy"))
    study = run.study
    refine = sorted(
        (int(t.user_attrs["enqueued_as"].split(":")[1]), t.user_attrs["refine_criterion"])
        for t in study.trials
        if t.user_attrs.get("enqueued_as", "").startswith("refine:")
    )
    assert len(refine) >= 6
    assert [c for _, c in refine] == [["fitness", "hypervolume", "hypervolume"][k % 3] for k, _ in refine]


@pytest.mark.parametrize("n_trials", [6, 12, 40, 60])
def test_a_warm_study_spends_exactly_its_budget_and_a_resume_the_difference(n_trials):
    """Issue 19: a study spends ``search.n_trials`` evaluation-equivalents, the table's cost (2.5 here) included,
    never more, whatever the warm start enqueues (7 uniform + 16 allocator plans: more than 6 or 12 trials hold):
    trials dropped by racing count the share of the split they used, the last trial is a partial evaluation of
    what is left, so the spend falls short by less than one window's share (1/64 here), the smallest unit of work.
    The enqueued plans are cut from the end, none is left waiting but those the cut left. A resume from 6 to 9
    spends 3 more."""
    import optuna

    from qsweep.search.objective import is_done
    from qsweep.search.phases import build_study
    from qsweep.search.study import spent

    p = generate(SMALL_X, 4).with_(proxy_cost_evals=2.5)
    session, space = ProblemSession(p, n_windows=64), p.space
    table = p.sensitivity_table("proxy")
    search = bench.search_settings("nsga2_warm", 0, n_trials)
    search.refine_share = 0.5  # the sampler gets half of what the enqueued plans leave: every phase runs
    search.racing = [
        0.25,
        0.5,
    ]  # off by default; on here, so that partial evaluations are counted mid-study too
    uniform = {f"uniform:{f}": plan for f, plan in space.uniform_plans().items()}
    run = build_study(
        space, session.score, search, reference=uniform, windows=session.windows, penalty=p.penalty
    )
    budget = run.run(session, table)
    window = 1 / 64
    assert budget == n_trials - 2.5
    assert budget - window < spent(run.study) <= budget + 1e-9
    assert abs(session.evaluations - spent(run.study)) < 1e-9  # what the trials record is what was evaluated
    done = [t for t in run.study.get_trials(deepcopy=False) if is_done(t)]
    labels = [t.user_attrs.get("enqueued_as", "sampler") for t in done]
    assert labels[: min(len(done), len(uniform))] == list(uniform)[: len(done)]  # references first
    assert all(t.user_attrs["eval_share"] == 1.0 for t in done if t.user_attrs.get("enqueued_as") in uniform)
    if n_trials >= 40:  # room for every enqueued plan, the sampler and refine; racing drops some of them
        assert any(lb.startswith("refine:") for lb in labels) and "sampler" in labels
        assert any(str(t.user_attrs.get("pruned")).startswith("racing") for t in done)
    waiting = run.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert all(not t.user_attrs["enqueued_as"].startswith(("refine:", "allocator:")) for t in waiting)
    if n_trials == 6:
        before = spent(run.study)
        run.search.n_trials = 9
        assert run.run(session, table) == 6.5
        assert 3 - 2 * window < spent(run.study) - before <= 3 + window


def test_with_the_default_refine_share_and_racing_the_budget_is_still_spent_exactly():
    """The default (search.refine_share=1.0: refine takes all that the enqueued plans leave) with racing on: what
    racing saves goes to more trials, and the study still spends its budget to within one window's share."""
    from qsweep.search.phases import build_study
    from qsweep.search.study import spent

    p = generate(SMALL_X, 4).with_(proxy_cost_evals=2.5)
    session, space = ProblemSession(p, n_windows=64), p.space
    search = bench.search_settings("nsga2_warm", 0, 40)
    assert search.refine_share == 1.0
    search.racing = [0.25, 0.5]
    uniform = {f"uniform:{f}": plan for f, plan in space.uniform_plans().items()}
    run = build_study(
        space, session.score, search, reference=uniform, windows=session.windows, penalty=p.penalty
    )
    budget = run.run(session, p.sensitivity_table("proxy"))
    assert budget - 1 / 64 < spent(run.study) <= budget + 1e-9
    assert abs(session.evaluations - spent(run.study)) < 1e-9
    labels = [
        t.user_attrs.get("enqueued_as", "sampler") for t in run.study.trials if "plan_digest" in t.user_attrs
    ]
    assert sum(lb.startswith("refine:") for lb in labels) >= 5
