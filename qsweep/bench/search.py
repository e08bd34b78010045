"""Benchmark: do the search methods find mixed plans better than uniform ones, and how fast? Prints tables.

    python -m qsweep.bench.search --menu lowbit --budgets 25,50,100,200 --seeds 0,1,2 --out bench_search.json

On the bundled model (model=tiny data=tiny, eval=standard), every method searches the validation split with the
budget counted in full evaluations (the sensitivity pass of the warm-started methods included, as a study counts
it), and the best plan by validation fitness is then scored on the test split (fitness with a paired 95% interval
from the degradation's interval). Methods:

  random, tpe, nsga2        the Optuna samplers, uniform plans enqueued, no warm start (search.warm_start=false)
  allocator                 proxy sensitivity + the exact allocator's plans (best predicted fitness first), no sampler
  tpe_warm, nsga2_warm      warm start (proxy sensitivity, allocator plans) + refine (+ the sampler's share, if
                            search.refine_share < 1): the default study

Samplers without a refine step are anytime: one run to the largest budget, read at every budget. Warm-started runs
end with a refine step sized to their budget, so each budget is its own run. Columns: best validation fitness
(median over seeds, and min-max), its percentage of the reference front's best (qsweep/bench/data, built by
``python -m qsweep.bench.reference``), the same plan's test fitness (median) and the interval of the median seed,
the hypervolume of the validation front relative to the reference front's, and the first evaluation at which a
run reached 99% and 100% of the reference best (median over seeds; '-' if not within the budget).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence

import optuna
import torch
from omegaconf import OmegaConf

from qsweep.bench.reference import load_reference, session_token_fingerprint
from qsweep.errors import ConfigError, one_line_errors
from qsweep.metrics import fitness
from qsweep.search.allocate import EXACT, Allocator
from qsweep.search.config import search_config
from qsweep.search.front import hypervolume_ratio, ratio_point
from qsweep.search.phases import build_study, new_sensitivity
from qsweep.search.select import Candidate, evaluated_trials
from qsweep.search.space import SearchSpace
from qsweep.search.study import reference_plans

__all__ = ["METHODS", "main", "run_method"]

METHODS = ("random", "tpe", "nsga2", "allocator", "tpe_warm", "nsga2_warm")
_SAMPLER = {"random": "random", "tpe": "tpe", "nsga2": "nsga2", "allocator": "random", "tpe_warm": "tpe",
            "nsga2_warm": "nsga2"}  # fmt: skip
METRIC = "packed"


def _session(menu: str, device: str, extra: Sequence[str] = ()):
    from qsweep.config import compose_config
    from qsweep.session import EvalSession

    cfg = compose_config(["model=tiny", "data=tiny", "eval=standard", f"precision={menu}", f"eval.device={device}",
                          "+search=tpe", *extra])  # fmt: skip
    return cfg, EvalSession(cfg)


def run_method(method: str, cfg, session, space: SearchSpace, table, seed: int, budget: int,
               allocator: Allocator = EXACT) -> list:  # fmt: skip
    """One study of ``method`` with ``budget`` full evaluations on the validation split (in memory); its trials.
    One benchmark run has one table and one space: pass one cached ``Allocator`` to every run so that each
    knapsack question is solved once, not once per method, seed and budget."""
    warm = method in ("allocator", "tpe_warm", "nsga2_warm")
    raw = OmegaConf.to_container(cfg.search, resolve=True)
    raw.update(sampler=_SAMPLER[method], name=method, seed=seed, n_trials=budget, warm_start=warm,
               objective="multi" if method.startswith("nsga2") or method == "random" else "fitness")  # fmt: skip
    if method.startswith("nsga2"):
        raw["sampler_options"] = {"population_size": 24}
    if _SAMPLER[method] == "random":
        raw["sampler_options"] = {}
    uniform = reference_plans(["uniform"], space, session.table, cfg.precision.name)
    if (
        method == "allocator"
    ):  # the allocator's plans only: as many as the budget holds, no sampler, no refine
        raw["warm_start_plans"] = max(1, budget - math.ceil(table.cost_evals) - len(uniform))
    if method == "allocator" or not warm:
        raw["refine_trials"] = 0
    if method == "allocator":  # whole evaluations, so that no budget is left over for a sampler
        raw["racing"] = []
    raw["size_metric"] = METRIC
    raw["degradation"] = "perplexity"  # the benchmark measures the user's fitness (its reference is of it)
    search = search_config(raw)
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    def score(plan, stop=None, resume=None):
        return session.score(plan, "validation", stop, resume)

    run = build_study(space, score, search, reference=uniform, windows=session.evaluator("validation"),
                      penalty=session.penalty)  # fmt: skip
    run.run(session, table if warm else None, allocator)
    return run.study.get_trials(deepcopy=False)


def _fit(t) -> float:
    return t.user_attrs[f"fitness_{METRIC}"]


def _within(trials, n: float) -> list:
    """The trials of the first ``n`` evaluations, each with the evaluations spent when it ended: a trial costs its
    ``cost_evals`` (a duplicate, answered from the study, none; a trial racing dropped, the share it used)."""
    out, used = [], 0.0
    for t in sorted(trials, key=lambda t: t.number):
        if "plan_digest" not in t.user_attrs:
            continue
        cost = t.user_attrs.get("cost_evals", 0.0 if "duplicate_of" in t.user_attrs else 1.0)
        if used + cost > n + 1e-9:
            break
        used += cost
        out.append((used, t))
    return out


def _summary(trials, budget: int, cost: float, ref, session) -> dict:
    """Best validation fitness within ``budget`` evaluations (sensitivity cost counted), and the front's HV."""
    within = _within(trials, max(0.0, budget - cost))
    done = evaluated_trials([t for _, t in within])
    if not done:  # the budget is spent before the first trial (a sensitivity pass dearer than the budget)
        return None
    best = max(done, key=_fit)
    base = session.baseline_perplexity("validation")
    pts = [ratio_point(t.user_attrs[f"{METRIC}_size_bytes"], t.user_attrs["perplexity"], session.baseline_size_bytes,
                       base) for t in done]  # fmt: skip
    reach = dict.fromkeys((0.99, 1.0))
    for target in reach if ref else ():
        hit = next((k for k, t in within if t in done and _fit(t) >= target * ref.best_fitness[METRIC]), None)
        reach[target] = None if hit is None else round(hit + cost, 2)
    hv = hypervolume_ratio(pts, ref.points(METRIC)) if ref else None  # dominated points add nothing
    return {"best": best, "fitness": _fit(best), "hv": hv, "reach": reach}


def _test(best, session) -> tuple[float, float, float]:
    return _test_plan(Candidate.of(best).plan, session)


def _test_plan(plan, session) -> tuple[float, float, float]:
    """A plan's test fitness and the fitness at the ends of its degradation's paired 95% interval."""
    s = session.score(plan, "test")
    lo, hi = s.degradation_ci95 or (math.nan, math.nan)
    c = s.compression(METRIC)
    return s.fitness(METRIC), fitness(c, hi, s.penalty), fitness(c, lo, s.penalty)


def _reference_held_out(ref, session, n_top: int = 20) -> dict:
    """How the reference's best validation plans score on the test split. A search that measured thousands of plans
    picks, among near-equal ones, those the validation split's tokens happen to favour: its best validation fitness
    is a yardstick for the search split, not for what a plan is worth on text it has not seen."""
    top = sorted(ref.plans, key=lambda p: (-ref.fitness(p, METRIC), p.found_at))[:n_top]
    best = _test_plan(ref.best(METRIC).plan, session)
    tests = [
        f for f in (_test_plan(p.plan, session)[0] for p in top) if f is not None
    ]  # None: failed to evaluate
    return {"best_test": best[0], "best_test_ci95": best[1:], "n_top": len(top),
            "top_val": (ref.fitness(top[-1], METRIC), ref.fitness(top[0], METRIC)),
            "top_test_median": statistics.median(tests), "top_test_max": max(tests)}  # fmt: skip


@one_line_errors("qsweep.bench.search")
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--menu", default="lowbit")
    ap.add_argument("--budgets", default="25,50,100,200")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="write the per-run numbers as JSON")
    ap.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides (e.g. eval.max_tokens=2048 for a smoke run)"
    )
    args = ap.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    cfg, session = _session(args.menu, args.device, args.overrides)
    allocator = Allocator(cache=True)
    space = SearchSpace.from_menu(session.table, OmegaConf.to_container(cfg.precision.menu, resolve=True))
    try:
        ref = load_reference(args.menu)
    except ConfigError as e:  # no reference front for this menu: no reference columns
        print(f"# {e}")
        ref = None
    if ref is not None and ref.protocol.get("token_sha256") != session_token_fingerprint(
        session, "validation"
    ):
        print("# the reference front was measured on other validation tokens (the bundled corpus depends on the "
              "Python version; pass the reference's data.path): no reference columns")  # fmt: skip
        ref = None
    session.baseline("validation")
    session.baseline("test")
    full = statistics.median(session.evaluate(session.baseline_plan, "validation").seconds for _ in range(3))
    print(f"# bundled model, menu {args.menu}, {METRIC} sizes; device {session.device} "
          f"({torch.cuda.get_device_name() if session.device.type == 'cuda' else 'cpu'}); one validation evaluation "
          f"{full:.3f} s" + (f"; reference best fitness_{METRIC} {ref.best_fitness[METRIC]:.4f} ({ref.n_evaluations} "
          "evaluations)" if ref else ""))  # fmt: skip
    held_out = _reference_held_out(ref, session) if ref else None
    if held_out:
        print(f"# the reference's best validation plan on test: fitness_{METRIC} {held_out['best_test']:.4f} "
              f"(95% CI {held_out['best_test_ci95'][0]:.3f}, {held_out['best_test_ci95'][1]:.3f}); its "
              f"{held_out['n_top']} best validation plans (validation {held_out['top_val'][0]:.4f}-"
              f"{held_out['top_val'][1]:.4f}) score {held_out['top_test_median']:.4f} on test (median; max "
              f"{held_out['top_test_max']:.4f})")  # fmt: skip
    # as a study makes it (search.sensitivity_tokens of the split); one table serves every seed
    table = new_sensitivity(session, space, "proxy", "validation", cfg.search.sensitivity_tokens, full)
    print(f"# proxy sensitivity: {table.seconds:.2f} s = {table.cost_evals:.2f} evaluations", flush=True)
    rows = []
    for method in methods:
        for seed in seeds:
            start = time.perf_counter()
            anytime = method in ("random", "tpe", "nsga2")
            runs = {max(budgets): run_method(method, cfg, session, space, table, seed, max(budgets), allocator)} if anytime else {
                b: run_method(method, cfg, session, space, table, seed, b, allocator) for b in budgets}  # fmt: skip
            for b in budgets:
                trials = runs[max(budgets)] if anytime else runs[b]
                cost = 0.0 if method in ("random", "tpe", "nsga2") else table.cost_evals
                s = _summary(trials, b, cost, ref, session)
                if s is None:
                    print(
                        f"  {method} seed {seed} budget {b}: the sensitivity pass ({cost:.1f}) spends the budget"
                    )
                    continue
                test = _test(s["best"], session)
                rows.append({"method": method, "seed": seed, "budget": b, "val_fitness": s["fitness"], "hv": s["hv"],
                             "test_fitness": test[0], "test_ci95": test[1:], "reach99": s["reach"][0.99],
                             "reach100": s["reach"][1.0], "uniform_best": s["best"].user_attrs.get("enqueued_as", "").startswith("uniform:"),
                             "sensitivity_cost": cost})  # fmt: skip
            print(f"  {method} seed {seed}: {time.perf_counter() - start:.1f} s", flush=True)
    _print(rows, methods, budgets, ref)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "menu": args.menu,
                    "reference_best": ref and ref.best_fitness[METRIC],
                    "reference_held_out": held_out,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return 0


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _print(rows, methods, budgets, ref) -> None:
    best = ref.best_fitness[METRIC] if ref else math.nan
    print(
        "\n| budget | method | val fitness (median [min, max]) | % of ref | test fitness (median seed's 95% CI) "
        "| HV ratio | evals to 99% / 100% of ref | best is uniform |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in budgets:
        for m in methods:
            rs = sorted(
                (r for r in rows if r["method"] == m and r["budget"] == b), key=lambda r: r["val_fitness"]
            )
            if not rs:
                continue
            mid = rs[len(rs) // 2]
            v = [r["val_fitness"] for r in rs]
            r99, r100 = _med([r["reach99"] for r in rs]), _med([r["reach100"] for r in rs])
            fmt = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
            fmt3 = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            print(f"| {b} | {m} | {mid['val_fitness']:.4f} [{v[0]:.4f}, {v[-1]:.4f}] | {100 * mid['val_fitness'] / best:.1f} "
                  f"| {_med([r['test_fitness'] for r in rs]):.4f} ({mid['test_ci95'][0]:.3f}, {mid['test_ci95'][1]:.3f}) "
                  f"| {fmt3(_med([r['hv'] for r in rs]))} | {fmt(r99)} / {fmt(r100)} | {sum(r['uniform_best'] for r in rs)}/{len(rs)} |")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
