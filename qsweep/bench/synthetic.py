"""Synthetic allocation benchmark: every search method and baseline on problems with known optima, in seconds.

    python -m qsweep.bench.synthetic                      # the table for the default (test) problem set
    python -m qsweep.bench.synthetic run --budgets 50,200 --seeds 0,1,2 --warm-seeds 0,1 --methods nsga2_warm,ga
    python -m qsweep.bench.synthetic generate --out-dir qsweep/bench/data   # regenerate train/valid/test sets
    python -m qsweep.bench.synthetic from-sensitivity outputs/.../sensitivity.json --out problem.json

Problems (qsweep.bench.synthetic_problem) stand in for a model: :class:`ProblemSession` scores a plan instantly,
and every qsweep method runs on it unchanged, configured by ``conf/search/<sampler>.yaml`` as a user gets it
(the same study builder, ``phases.build_study``, and phases: allocator, sampler and refine, as
``python -m qsweep +search=...``; only the allocator is shared, cached, across runs):

  random, tpe, nsga2, gp        the Optuna samplers, uniform plans enqueued, no warm start
  allocator                     the sensitivity table + the exact allocator's plans only (no sampler, no refine)
  tpe_warm, nsga2_warm, gp_warm warm start (proxy table, allocator plans) + refine (+ the sampler's share, if
                                search.refine_share < 1): the default study
  uniform, first_k, greedy, ga  baselines (qsweep.bench.synthetic_baselines)

The default set leaves out gp and gp_warm (GPSampler's fit per trial would take the run past 5 minutes on 2 CPU
cores) and random (NSGA-II's first generation is random sampling; it scores as nsga2 does); name them with
``--methods``.

A budget counts evaluations; methods that read the sensitivity table (warm, allocator, greedy) pay its cost
(``proxy_cost_evals`` of the problem) out of it, as a study does. Methods that do not know their budget run once
to the largest and are read at each (``--seeds``); the others run once per budget (``--warm-seeds``: they depend
little on the seed and cost the most). Columns per problem and method (medians over seeds): best fitness / the known optimum at each budget, the hypervolume ratio of the evaluated plans' front
to the reference front (qsweep.search.front, its reference point; the exact front where the optimum is exact), the evaluations
to reach 99% of the optimum (table cost included; median of the largest budget's runs, '-' unless more than half
reach it) and the wall time of all its runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import optuna
import yaml
from omegaconf import OmegaConf

from qsweep.bench.synthetic_baselines import BASELINES, Budget, BudgetSpent
from qsweep.bench.synthetic_generate import from_sensitivity, solved, write_sets
from qsweep.bench.synthetic_optima import brute_force, pareto_dp
from qsweep.bench.synthetic_problem import Problem, ProblemSession, load_problems, save_problems
from qsweep.errors import ConfigError, one_line_errors
from qsweep.paths import config_dir
from qsweep.score import PlanScore
from qsweep.search.allocate import EXACT, Allocator
from qsweep.search.config import SearchConfig, search_config
from qsweep.search.front import hypervolume_ratio
from qsweep.search.objective import trial_cost
from qsweep.search.phases import build_study
from qsweep.search.select import evaluated_trials
from qsweep.search.sensitivity import SensitivityTable
from qsweep.search.warmstart import allocator_plans

__all__ = [
    "DATA",
    "DEFAULT_SETS",
    "METHODS",
    "Trace",
    "benchmark",
    "main",
    "reference_front",
    "run_method",
    "search_settings",
    "summarize",
    "table_lines",
]

DATA = Path(__file__).parent / "data"
DEFAULT_SETS = (DATA / "synthetic_test.json", DATA / "synthetic_real_tiny.json")
SAMPLER_METHODS = ("random", "tpe", "nsga2", "gp", "allocator", "tpe_warm", "nsga2_warm", "gp_warm")
METHODS = (*BASELINES, *SAMPLER_METHODS)
DEFAULT_METHODS = (
    "uniform",
    "first_k",
    "greedy",
    "ga",
    "tpe",
    "nsga2",
    "allocator",
    "tpe_warm",
    "nsga2_warm",
)
_USES_TABLE = ("greedy", "allocator", "tpe_warm", "nsga2_warm", "gp_warm")
_SEEDLESS = ("uniform", "first_k", "greedy", "allocator")  # deterministic: one run serves every seed
_ANYTIME = (*BASELINES, "random", "tpe", "nsga2", "gp")  # budget-blind: one run, read at every budget


@dataclass(frozen=True)
class Trace:
    """One run: its full evaluations in order as (fitness, size ratio, perplexity ratio), the evaluations spent
    when each ended (``spends``: partial evaluations racing dropped in between counted by their share), and the
    table's cost."""

    points: tuple[tuple[float, float, float], ...]
    cost: float
    seconds: float
    spends: tuple[float, ...] = ()

    @classmethod
    def of(cls, scores: Sequence[PlanScore], cost: float, seconds: float) -> Trace:
        pts = tuple((s.fitness("packed"), s.packed_size_bytes / s.baseline_size_bytes,
                     s.perplexity / s.baseline_perplexity) for s in scores)  # fmt: skip
        return cls(pts, cost, seconds, tuple(float(k + 1) for k in range(len(pts))))

    def within(self, budget: float) -> tuple[tuple[float, float, float], ...]:
        """The points evaluated within ``budget`` (the table's cost included)."""
        return tuple(
            p for p, s in zip(self.points, self.spends, strict=True) if s + self.cost <= budget + 1e-9
        )

    def reached(self, target: float) -> float | None:
        """The evaluations spent (table included) when a point first reached fitness ``target``."""
        return next((round(s + self.cost, 2) for p, s in zip(self.points, self.spends, strict=True)
                     if p[0] >= target), None)  # fmt: skip


BENCH_OWNS = ("seed", "n_trials", "warm_start", "name", "sampler")  # what each run sets; --set may not


def search_settings(method: str, seed: int, n_trials: int, settings: Mapping[str, Any] = MappingProxyType({})
                    ) -> SearchConfig:  # fmt: skip
    """``conf/search/<sampler>.yaml`` as a user gets it, with ``settings`` (``--set``), the method's warm start,
    seed and budget."""
    sampler = "random" if method == "allocator" else method.removesuffix("_warm")
    raw = OmegaConf.to_container(OmegaConf.load(config_dir() / "search" / f"{sampler}.yaml"), resolve=True)
    raw.update(settings)
    raw.update(seed=seed, n_trials=n_trials, warm_start=method.endswith("_warm") or method == "allocator")
    if method == "allocator":  # the allocator's plans only, whole (not raced): as many as the budget holds
        raw.update(refine_trials=0, warm_start_plans=n_trials, name="allocator", racing=[])
    return search_config(raw)


def run_method(
    method: str,
    problem: Problem,
    seed: int,
    budget: int,
    table: SensitivityTable | None = None,
    allocator: Allocator = EXACT,
    n_windows: int = 1,
    settings: Mapping[str, Any] = MappingProxyType({}),
) -> Trace:
    """One run of ``method`` on ``problem`` with ``budget`` evaluations (the table's cost included); a cached
    ``allocator`` shared by the runs of one table solves each knapsack question once. ``n_windows`` > 1: the
    problem's evaluations have windows (:class:`ProblemSession`), so the study races its candidates."""
    session = ProblemSession(problem, n_windows=n_windows)
    space = problem.space
    table = table or problem.sensitivity_table("proxy")
    cost = table.cost_evals if method in _USES_TABLE else 0.0
    start = time.perf_counter()
    if method in BASELINES:
        b = Budget(session.score, max(0, budget - math.ceil(cost)))
        with contextlib.suppress(BudgetSpent):
            BASELINES[method](space, b, table=table, baseline_bytes=problem.baseline_bytes,
                              penalty=problem.penalty, seed=seed)  # fmt: skip
        return Trace.of(b.records, cost, time.perf_counter() - start)
    search = search_settings(method, seed, budget, settings)
    uniform = {f"uniform:{f}": p for f, p in space.uniform_plans().items()}
    if method == "allocator":  # the allocator's plans only: as many as the budget holds, then the run ends
        search.warm_start_plans = max(1, budget - math.ceil(cost) - len(uniform))
        n = len(allocator_plans(table, space, size_metric=search.size_metric, n_plans=search.warm_start_plans,
                                          baseline_bytes=problem.baseline_bytes, penalty=problem.penalty,
                                exclude=set(uniform.values()), allocator=allocator))  # fmt: skip
        search.n_trials = min(budget, math.ceil(cost) + len(uniform) + n)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    run = build_study(space, session.score, search, reference=uniform,
                      windows=session.windows if n_windows > 1 else None, penalty=problem.penalty)  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bars: one per phase, per run
        run.run(session, table if search.warm_start else None, allocator)
    trials = sorted(run.study.get_trials(deepcopy=False), key=lambda t: t.number)
    full = {t.number for t in evaluated_trials(trials)}
    pts, spends, used = [], [], 0.0
    for t in trials:
        used += trial_cost(t)
        if t.number in full:
            a = t.user_attrs
            pts.append((a["fitness_packed"], a["packed_size_bytes"] / problem.baseline_bytes,
                        a["perplexity"] / problem.base_perplexity))  # fmt: skip
            spends.append(used)
    return Trace(tuple(pts), cost, time.perf_counter() - start, tuple(spends))


def reference_front(problem: Problem) -> list[tuple[float, float]]:
    """The exact front (brute force or Pareto DP) where the problem is solved exactly, else its stored one."""
    how = (problem.optimum or {}).get("how", "")
    if how == "brute force":
        f = brute_force(problem).front
    elif how == "exact Pareto DP":
        f = pareto_dp(problem).front
    else:
        return [tuple(p) for p in problem.reference_front]
    return [tuple(p) for p in problem.ratio_points(f.size, f.delta)]


def summarize(trace: Trace, budget: int, optimum: float, ref_front) -> dict:
    """Best fitness / optimum, HV ratio within ``budget``; the evaluation that first reached 99% of the optimum."""
    pts = trace.within(budget)
    best = max((p[0] for p in pts), default=-math.inf)
    hv = hypervolume_ratio([p[1:] for p in pts], ref_front) if pts and ref_front else None
    reach = trace.reached(0.99 * optimum)
    return {"ratio": best / optimum if pts else None, "hv": hv, "reach99": reach}


def _runs(method: str, problem: Problem, seeds: Sequence[int], budgets: Sequence[int], table,
          allocator: Allocator, n_windows: int = 1, settings: Mapping[str, Any] = MappingProxyType({})
          ) -> list[dict]:  # fmt: skip
    rows = []
    for seed in seeds[:1] if method in _SEEDLESS else seeds:
        once = [max(budgets)] if method in _ANYTIME else budgets
        runs = {b: run_method(method, problem, seed, b, table, allocator, n_windows, settings) for b in once}
        for b in budgets:
            rows.append({"seed": seed, "budget": b, "trace": runs.get(b) or runs[max(budgets)],
                         "seconds": runs[b].seconds if b in runs else 0.0})  # fmt: skip
    return rows


def benchmark(problems: Sequence[Problem], methods: Sequence[str], seeds: Sequence[int], budgets: Sequence[int],
              warm_seeds: Sequence[int] | None = None, log=print, n_windows: int = 1,
              settings: Mapping[str, Any] = MappingProxyType({})) -> list[dict]:  # fmt: skip
    """Every method on every problem: one row per (problem, method, seed, budget); the methods run once per budget
    (warm-started, allocator) use ``warm_seeds`` when given (they depend little on the seed and cost the most)."""
    out = []
    allocator = Allocator(cache=True)  # one benchmark asks the same knapsack questions many times
    for p in problems:
        opt, ref = p.optimum["fitness"], reference_front(p)
        table = p.sensitivity_table("proxy")
        for m in methods:
            t0 = time.perf_counter()
            rows = _runs(m, p, warm_seeds if warm_seeds and m not in _ANYTIME else seeds, budgets, table,
                         allocator, n_windows, settings)  # fmt: skip
            for r in rows:
                out.append({"problem": p.name, "method": m, "seed": r["seed"], "budget": r["budget"],
                            **summarize(r["trace"], r["budget"], opt, ref), "seconds": r["seconds"]})  # fmt: skip
            log(f"  {p.name} {m}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table_lines(
    rows: Sequence[dict], problems: Sequence[Problem], methods: Sequence[str], budgets: Sequence[int]
) -> list[str]:
    f3 = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    head = " | ".join(f"fit/opt @{b}" for b in budgets) + " | " + " | ".join(f"HV @{b}" for b in budgets)
    lines = [f"| problem (optimum) | method | {head} | evals to 99% | wall s |",
             "| --- | --- | " + " | ".join("---" for _ in range(2 * len(budgets))) + " | --- | --- |"]  # fmt: skip
    for p in problems:
        how = p.optimum["how"].replace("reference run (not proven)", "reference")
        for m in methods:
            rs = [r for r in rows if r["problem"] == p.name and r["method"] == m]
            if not rs:
                continue
            cells = [f3(_med([r["ratio"] for r in rs if r["budget"] == b]), 4) for b in budgets]
            cells += [f3(_med([r["hv"] for r in rs if r["budget"] == b])) for b in budgets]
            top = [r for r in rs if r["budget"] == max(budgets)]
            reach = [r["reach99"] for r in top]
            reached = [x for x in reach if x is not None]
            r99 = (
                "-" if len(reached) * 2 <= len(reach) else f"{statistics.median(reached):.0f}"
            )  # median of seeds
            lines.append(f"| {p.name} ({p.optimum['fitness']:.4f}, {how}) | {m} | {' | '.join(cells)} | {r99} | "
                         f"{sum(r['seconds'] for r in rs):.1f} |")  # fmt: skip
    return lines


@one_line_errors("python -m qsweep.bench.synthetic")
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qsweep.bench.synthetic", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="the benchmark table (the default command)")
    run.add_argument("--problems", nargs="*", default=[str(p) for p in DEFAULT_SETS])
    run.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"any of {','.join(METHODS)}")
    run.add_argument("--budgets", default="50,200")
    run.add_argument("--seeds", default="0,1", help="seeds of the budget-blind methods (default: 0,1)")
    run.add_argument(
        "--warm-seeds", default="0", help="seeds of the methods run once per budget (default: 0)"
    )
    run.add_argument("--out", default=None, help="write the per-run rows as JSON")
    run.add_argument("--windows", type=int, default=64,
                     help="windows of a synthetic evaluation, so that studies race their candidates (1: whole "
                          "evaluations only, no racing)")  # fmt: skip
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a search setting for every study (e.g. refine_learn=false); repeatable")  # fmt: skip
    gen = sub.add_parser("generate", help="write synthetic_{train,valid,test}.json (seeded, deterministic)")
    gen.add_argument("--out-dir", default=str(DATA))
    gen.add_argument("--seed", type=int, default=0)
    fs = sub.add_parser(
        "from-sensitivity", help="a problem from a study's sensitivity.json plus interactions"
    )
    fs.add_argument("path")
    fs.add_argument("--out", required=True)
    fs.add_argument("--name", default=None)
    fs.add_argument("--seed", type=int, default=0)
    fs.add_argument("--interactions", type=int, default=None, help="how many pairs (default: one per unit)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*sub.choices, "-h", "--help"):
        argv = ["run", *argv]  # run is the default command
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        for path in write_sets(args.out_dir, seed=args.seed):
            print(path)
        return 0
    if args.cmd == "from-sensitivity":
        table = SensitivityTable.load(args.path)
        name = args.name or Path(args.out).stem
        p = solved(from_sensitivity(table, args.seed, name=name, n_interactions=args.interactions), args.seed)
        save_problems([p], args.out, "test")
        print(f"{args.out}: {p.n_units} units x {len(p.formats)} formats; optimum {p.optimum['fitness']:.4f} "
              f"({p.optimum['how']})")  # fmt: skip
        return 0
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {', '.join(bad)}; valid: {', '.join(METHODS)}")
    problems = [p for path in args.problems for p in load_problems(path)]
    start, cpu = time.perf_counter(), time.process_time()
    warm_seeds = [int(s) for s in args.warm_seeds.split(",")]
    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"--set {item!r}: expected KEY=VALUE (a search setting, e.g. refine_learn=false)"
            )
        key = key.removeprefix("search.")
        if key in BENCH_OWNS:
            raise ConfigError(f"--set {key}: the benchmark sets it for each run ({', '.join(BENCH_OWNS)}); use "
                              "--seeds/--warm-seeds, --budgets or --methods")  # fmt: skip
        settings[key] = yaml.safe_load(value)
    search_settings("nsga2_warm", 0, max(budgets), settings)  # a bad setting: one line now, not after any run
    rows = benchmark(problems, methods, seeds, budgets, warm_seeds, n_windows=args.windows, settings=settings)
    print(f"\n# {len(problems)} problems, seeds {args.seeds} (methods run per budget: {args.warm_seeds}), budgets "
          f"{args.budgets}, {args.windows} windows per evaluation: "
          f"{time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU\n")  # fmt: skip
    print("\n".join(table_lines(rows, problems, methods, budgets)))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
