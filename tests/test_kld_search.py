"""KL divergence as a search's degradation (``search.degradation=kld``, issue 21): the record's KL fitness and
interval, the KL sensitivity tables (measured and the model-Fisher proxy), racing and the paired comparison on KL,
and a study run end to end with its config errors."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config
from test_sensitivity import evaluator, one_thread, space_of, tiny4  # noqa: F401 (one_thread: autouse fixture)

from qsweep.apply import PlanApplier, apply_plan_
from qsweep.errors import ConfigError
from qsweep.evaluate import EvalResult
from qsweep.metrics import fitness, mean_interval
from qsweep.plan import Plan
from qsweep.score import PERPLEXITY, Degradation, PlanScore
from qsweep.search.racing import Incumbent, verdict
from qsweep.search.select import paired_fitness_difference
from qsweep.search.sensitivity import (
    measure_sensitivity,
    proxy_cost_evals,
    proxy_sensitivity,
    rank_correlation,
    sensitivity_base,
)

KLD = Degradation("kld")


def _result(window_tokens, token_kld, window_nll=None) -> EvalResult:
    tokens = torch.tensor(window_tokens, dtype=torch.int64)
    nll = (
        torch.full((len(window_tokens),), 3.0, dtype=torch.float64) * tokens
        if window_nll is None
        else window_nll
    )
    kld = torch.tensor(token_kld, dtype=torch.float32)
    return EvalResult(float(nll.sum()), int(tokens.sum()), nll, tokens, 0.1, token_kld=kld,
                      same_top1=torch.ones(len(kld), dtype=torch.bool))  # fmt: skip


def _score(result: EvalResult, size: int, plan: Plan | None = None) -> PlanScore:
    return PlanScore(plan=plan or Plan({"a": "int4"}), split="validation", result=result, baseline_perplexity=20.0,
                     model_size_bytes=size, packed_size_bytes=size, baseline_size_bytes=1000,
                     bit_histogram={}, bits_per_param=4.0, penalty=10.0)  # fmt: skip


def test_the_record_holds_the_kl_fitness_and_interval_of_its_windows():
    kld = [0.01, 0.03, 0.02, 0.10, 0.00, 0.04, 0.05]
    r = _result([3, 2, 2], kld)
    assert r.window_kld.tolist() == pytest.approx([0.06, 0.10, 0.09])
    rec = _score(r, 250).record()
    mean = sum(kld) / len(kld)
    assert rec["kld_mean"] == pytest.approx(mean)
    assert rec["fitness_kld_packed"] == fitness(
        4.0, math.expm1(rec["kld_mean"]), 10.0
    )  # the one rule, exactly
    assert rec["fitness_kld_seed"] == rec["fitness_kld_packed"]
    # windows as samples: the ratio estimator's t interval, around the mean
    assert (rec["kld_ci95_low"], rec["kld_ci95_high"]) == mean_interval(r.window_kld, r.window_tokens)
    assert rec["kld_ci95_low"] < mean < rec["kld_ci95_high"]
    # the degradation a KL search reads from the record, and the perplexity one the user's
    assert KLD.delta(rec) == rec["kld_mean"] and KLD.value(rec) == math.expm1(rec["kld_mean"])
    assert KLD.bound(rec, "high") == math.expm1(rec["kld_ci95_high"])
    assert KLD.fitness_key("packed") == "fitness_kld_packed" and KLD.objective_key == "kld_mean"
    assert PERPLEXITY.value(rec) == rec["degradation"] and PERPLEXITY.fitness_key("seed") == "fitness_seed"
    assert PERPLEXITY.delta(rec) == pytest.approx(math.log1p(rec["degradation"]))
    # no reference, no KL: every KL field is None
    bare = EvalResult(30.0, 10, torch.tensor([30.0], dtype=torch.float64), torch.tensor([10]), 0.1)
    rec = _score(bare, 250).record()
    assert rec["fitness_kld_packed"] is None and rec["kld_ci95_low"] is None and KLD.value(rec) is None
    with pytest.raises(ValueError, match="valid: perplexity, kld"):
        Degradation("kl")


def test_racing_and_the_paired_comparison_read_kl_windows():
    """A KL race drops a candidate by its KL windows (its NLL says nothing: it equals the incumbent's); the paired
    comparison of KL fitness is the difference of the two records' KL fitness."""
    k = 16
    tokens = [8] * k
    gen = torch.Generator().manual_seed(0)
    good = (0.01 + 0.002 * torch.rand(8 * k, generator=gen)).tolist()
    bad = (0.20 + 0.02 * torch.rand(8 * k, generator=gen)).tolist()
    inc_r, cand_r = _result(tokens, good), _result(tokens, bad)
    inc, cand = _score(inc_r, 400).record(), _score(cand_r, 400).record()
    j = Incumbent(0, inc_r.window_kld, KLD.delta(inc), 400, inc["fitness_kld_packed"])
    for kind in ("fitness", "multi"):
        why = verdict(cand, cand_r.window_kld, cand_r.window_tokens, [j], kind=kind, size_metric="packed",
                      penalty=10.0, z=2.6, degradation=KLD)  # fmt: skip
        assert why is not None and ("fitness <=" in why or "mean KL lower" in why), why
        # on perplexity the two are the same plan (equal NLL windows): nothing to drop
        assert verdict(cand, cand_r.window_nll, cand_r.window_tokens, [Incumbent(0, inc_r.window_nll, 0.0, 400,
                       inc["fitness_packed"])], kind=kind, size_metric="packed", penalty=10.0, z=2.6) is None  # fmt: skip
    base = _result(tokens, [0.0] * (8 * k))
    diff, lo, hi = paired_fitness_difference(
        _score(inc_r, 400), _score(cand_r, 250), base, "packed", degradation=KLD
    )
    assert diff == pytest.approx(
        inc["fitness_kld_packed"] - _score(cand_r, 250).record()["fitness_kld_packed"]
    )
    assert lo <= diff <= hi


@pytest.fixture(scope="module")
def gpt2_kl():
    """A tiny GPT-2 whose baseline (fp16) distribution is the evaluator's KL reference."""
    model, table = tiny4("gpt2")
    space, applier = space_of(table), PlanApplier(model, table)
    ev = evaluator()
    ev.kld = True
    baseline = sensitivity_base(space, Plan.uniform(table, "fp16"))
    applier.apply_(baseline)
    ev.evaluate(model, record_reference=True)
    measured = measure_sensitivity(applier, ev, space, baseline, degradation="kld")
    return SimpleNamespace(model=model, table=table, space=space, ev=ev, applier=applier, baseline=baseline,
                           measured=measured)  # fmt: skip


def test_a_measured_kl_row_is_the_kl_of_that_one_unit_plan(gpt2_kl):
    g = gpt2_kl
    table, space, ev, applier, baseline, measured = g.table, g.space, g.ev, g.applier, g.baseline, g.measured
    assert measured.degradation == "kld"
    for unit, fmt in [("h.2.mlp", "int2_g32"), ("wte", "int4_g32"), ("h.3.attn", "int8_channel")]:
        one, _ = tiny4("gpt2")
        apply_plan_(one, Plan({**baseline.formats, unit: fmt}), table)
        res = ev.evaluate(one)
        assert measured.delta(unit, fmt) == pytest.approx(
            float(res.token_kld.double().mean()), rel=1e-5, abs=1e-9
        )
        assert measured.delta(unit, fmt) > 0
    # the same table without the prefix cache
    plain = measure_sensitivity(applier, ev, space, baseline, prefix_cache=False, degradation="kld")
    for a, b in zip(measured.rows, plain.rows, strict=True):
        assert a.delta_nll_per_token == pytest.approx(b.delta_nll_per_token, rel=1e-5, abs=1e-9)


def test_the_kl_proxy_is_half_the_model_fisher_times_the_squared_error(gpt2_kl):
    """KL's Taylor expansion at the baseline has no first-order term: where it holds (per-channel INT8) the proxy
    is the measured KL; overall it ranks the measured rows; it costs one backward pass less than the NLL proxy."""
    g = gpt2_kl
    space, ev, applier, baseline, measured = g.space, g.ev, g.applier, g.baseline, g.measured
    proxy = proxy_sensitivity(applier, ev, space, baseline, degradation="kld", seed=1)
    assert proxy.degradation == "kld" and proxy.base_perplexity is None
    assert all(r.delta_nll_per_token >= 0 for r in proxy.rows)  # a sum of squares
    # INT4 rows (KL 3e-7..9e-5 per token here): INT8 ones sit at the measured KL's fp32 rounding floor (qsweep.heads)
    int4 = [r for r in measured.rows if r.format == "int4_g32"]
    ratios = sorted(proxy.delta(r.unit, r.format) / r.delta_nll_per_token for r in int4)
    assert 0.75 < ratios[len(ratios) // 2] < 1.1, ratios  # the diagonal, and one sampled label per token
    assert rank_correlation(measured, proxy) > 0.9
    again = proxy_sensitivity(applier, ev, space, baseline, degradation="kld", seed=1)
    assert [r.delta_nll_per_token for r in again.rows] == [
        r.delta_nll_per_token for r in proxy.rows
    ]  # seeded
    assert proxy.cost_evals == proxy_cost_evals(ev.n_tokens, ev.n_tokens, "rademacher", False, "kld") == 3.0
    assert proxy_cost_evals(ev.n_tokens, ev.n_tokens, "rademacher", False) == 5.0


def test_sampled_labels_are_drawn_again_the_same_when_checkpointing_recomputes_them(gpt2_kl):
    """The KL proxy's labels come from a generator seeded per chunk, so a checkpointed chunk recomputed in the
    backward pass draws the labels its forward drew: the gradients equal the plain pass's."""
    model, ev = gpt2_kl.model, gpt2_kl.ev
    gpt2_kl.applier.apply_(gpt2_kl.baseline)
    w = model.get_output_embeddings().weight
    grads = []
    for checkpoint in (False, True):
        w.requires_grad_(True)
        nll = ev.batch_nll(model, 0, checkpoint=checkpoint, sample_seed=12345)
        nll.sum().backward()
        grads.append(w.grad.clone())
        w.grad = None
    w.requires_grad_(False)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    data = ev.batch_nll(model, 0)
    sampled = ev.batch_nll(model, 0, sample_seed=12345)
    assert not torch.equal(data, sampled) and torch.equal(sampled, ev.batch_nll(model, 0, sample_seed=12345))


# A KL study on the bundled model: 6 evaluations on 512 tokens of each split (3 uniform plans, the KL proxy table,
# allocator plans, one refine trial)
STUDY = ["eval.max_tokens=512", "eval.context=128", "precision=seed", "+search=nsga2", "search.n_trials=6",
         "search.sampler_options.population_size=4", "search.warm_start_plans=2", "search.refine_trials=1",
         "search.sensitivity_tokens=256", "search.degradation=kld"]  # fmt: skip


def test_a_kl_study_ranks_trials_by_kl_and_says_what_the_users_fitness_says(tmp_path, bundled_cache):
    import optuna

    from qsweep.app import run_search

    out = tmp_path / "run"
    out.mkdir()
    summary = run_search(compose_config(*STUDY, tmp_path=tmp_path, cache_dir=bundled_cache), out)
    results = json.loads((out / "results.json").read_text())
    assert results["degradation"] == "kld" and results["fitness"] == "fitness_kld_packed"
    assert results["study_name"].endswith("-kld") and results["identity"]["degradation"] == "kld"
    assert summary["evaluations_spent"] == pytest.approx(6.0)
    table = json.loads((out / "sensitivity.json").read_text())
    assert table["degradation"] == "kld" and table["kind"] == "proxy"
    study = optuna.load_study(study_name=results["study_name"], storage=results["storage"])
    assert study.metric_names == ["kld_mean", "packed_size_bytes"]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert done
    for t in done:  # the trial's values are its record's KL and size
        assert t.values == [t.user_attrs["kld_mean"], t.user_attrs["packed_size_bytes"]]
        assert t.user_attrs["fitness_kld_packed"] == fitness(
            t.user_attrs["compression_packed"], math.expm1(t.user_attrs["kld_mean"]), 10.0
        )
    # the candidates are the (kld_mean, size) front; the verdict is in KL fitness and in the user's
    best, vs = results["best"], results["best_vs_uniform"]
    assert (
        best["search"]["fitness_kld_packed"] is not None and best["report"]["fitness_kld_packed"] is not None
    )
    if not vs["best_is_uniform"]:
        assert vs["best_report_fitness_kld_packed"] == best["report"]["fitness_kld_packed"]
        user = vs["perplexity"]
        assert user["best_report_fitness_packed"] == best["report"]["fitness_packed"]
        assert user["ci95"][0] <= user["difference"] <= user["ci95"][1]
        assert "In the user's fitness (perplexity)" in (out / "report.html").read_text()
    # a resume of the same study with the user's degradation is refused (its trials rank by another loss)
    cfg = compose_config(*STUDY[:-1], f"search.study_name={results['study_name']}",
                         f"storage.url={results['storage']}", tmp_path=tmp_path, cache_dir=bundled_cache)  # fmt: skip
    with pytest.raises(ConfigError, match="degradation 'kld'"):
        run_search(cfg, tmp_path / "again")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.degradation=kl", "unknown search.degradation 'kl'"),
        ("eval.kld=false", "search.degradation=kld needs the baseline's distribution: use eval.kld=true"),
        ("baseline.perplexity=28.5", "unset baseline.perplexity=28.5"),
    ],
)
def test_bad_kl_settings_are_one_line_errors(override, message, tmp_path):
    from qsweep.app import run_search

    cfg = compose_config(*STUDY, override, tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        run_search(cfg, tmp_path)
    assert not list(tmp_path.glob("*.db"))  # refused before a study is stored


def test_a_search_key_set_without_a_search_names_the_fix():
    from qsweep.search.config import search_config

    with pytest.raises(ConfigError, match=r"no search is selected \(search\.degradation was set alone\): choose one "
                       r"with \+search=OPTION \(gp, nsga2, random, tpe\) first"):  # fmt: skip
        search_config({"degradation": "kld"})


def test_a_table_of_the_other_degradation_cannot_steer_a_search():
    from qsweep.search.config import search_config
    from qsweep.search.phases import run_phases

    search = search_config({"name": "nsga2", "sampler": "nsga2", "degradation": "kld"})
    table = SimpleNamespace(degradation="perplexity", cost_evals=1.0, kind="proxy")
    with pytest.raises(
        ConfigError, match=r"table of perplexity cannot steer a search of search\.degradation=kld"
    ):
        run_phases(None, None, None, None, search, table)
