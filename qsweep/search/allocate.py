"""Exact allocation from a sensitivity table: a multiple-choice knapsack solved by HiGHS (scipy.optimize.milp).

The additive model: a plan's predicted log-perplexity change vs the table's base plan is the sum of its units'
one-unit changes, ``delta(plan) = sum_u delta(u, plan[u])``, so its predicted degradation is ``expm1(delta)``.
Under that model, the best plan for a size budget is a multiple-choice knapsack (one binary ``x[u, f]`` per
searchable unit and menu format, ``sum_f x[u, f] = 1``, ``sum sizes <= budget - fixed units' bytes``, minimise
``sum delta * x``), which :func:`allocate` solves exactly. Two things keep "exactly" honest:

* HiGHS stops at an absolute gap of 1e-6 and scipy exposes only the relative gap (set to 0), so the objective is
  rescaled to a largest |row| of 1e3 first: the answer is optimal to 1e-9 of the largest per-unit delta;
* among plans with the optimal predicted delta the smallest is returned (a second solve minimises size subject to
  the optimal delta), so every answer is a point of the predicted Pareto front.

Rows with a non-finite delta (a one-unit plan that failed to evaluate) are never chosen. Fixed units (one format
on the menu) add their bytes and delta. :func:`predicted_front` sweeps budgets evenly along the size axis;
:func:`best_predicted_fitness` maximises the user's fitness (:func:`qsweep.metrics.fitness`)
over all budgets, exactly, by a best-first branch and bound over size intervals: solving at an interval's top
size ``hi`` gives a plan ``a`` and the least delta of every smaller plan, so the fitness of size ``lo`` and
delta ``delta_a`` bounds the fitness of the plans left in ``[lo, size_a)``, which is split in two until
every interval's bound is below the best plan found.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from qsweep.errors import QsweepError
from qsweep.metrics import fitness
from qsweep.plan import Plan
from qsweep.search.front import nondominated
from qsweep.search.sensitivity import SensitivityTable

__all__ = [
    "EXACT",
    "Allocation",
    "AllocationError",
    "Allocator",
    "allocate",
    "best_predicted_fitness",
    "predicted_delta_nll",
    "predicted_front",
]


class AllocationError(QsweepError, ValueError):
    """The menu, sizes and sensitivity table do not fit together (a row or a size is missing)."""


@contextlib.contextmanager
def _solver_stdout_muted():
    """File descriptor 1 points to /dev/null inside (C code writes there, not to ``sys.stdout``)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedding host): nothing to mute
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


@dataclass(frozen=True)
class Allocation:
    """A plan chosen under the additive model, with its exact size and predicted loss change."""

    plan: Plan
    size_bytes: int
    delta_nll: float  # predicted mean per-token log-perplexity change vs the table's base plan
    budget_bytes: int | None = None

    @property
    def predicted_degradation(self) -> float:
        return math.expm1(self.delta_nll)

    def fitness(self, baseline_bytes: int, penalty: float = 10.0) -> float:
        """The user's fitness (:func:`qsweep.metrics.fitness`) under the prediction."""
        return fitness(baseline_bytes / self.size_bytes, self.predicted_degradation, penalty)


def predicted_delta_nll(table: SensitivityTable, plan: Plan) -> float:
    """The additive model's log-perplexity change of any ``plan`` (every unit must have a row)."""
    return sum(table.delta(u, f) for u, f in plan.formats.items())


class _Problem:
    """The knapsack's arrays, built once per (table, menu, sizes) and solved for many budgets."""

    def __init__(self, table: SensitivityTable, choices: Mapping[str, Sequence[str]], sizes: Mapping):
        def size(u: str, f: str) -> int:
            try:
                return int(sizes[u][f])
            except KeyError:
                raise AllocationError(f"no size given for unit {u!r} in format {f!r}") from None

        self.units = list(choices)
        self.fixed = {u: c[0] for u, c in choices.items() if len(c) == 1}
        self.fixed_bytes = sum(size(u, f) for u, f in self.fixed.items())
        self.fixed_delta = sum(table.delta(u, f) for u, f in self.fixed.items())
        if not math.isfinite(self.fixed_delta):
            raise AllocationError("a fixed unit's only format has a non-finite sensitivity row")
        self.var: list[tuple[str, str]] = []
        cost, raw, sz, group = [], [], [], []
        for g, (u, c) in enumerate((u, c) for u, c in choices.items() if len(c) > 1):
            opts = [(f, table.delta(u, f)) for f in c]
            opts = [(f, d) for f, d in opts if math.isfinite(d)]
            if not opts:
                raise AllocationError(
                    f"every format of unit {u!r} failed to evaluate in the sensitivity table"
                )
            lo = min(d for _, d in opts)
            for f, d in opts:
                self.var.append((u, f))
                cost.append(d - lo)  # shifted per unit: same argmin, smaller numbers
                raw.append(d)
                sz.append(size(u, f))
                group.append(g)
        self.cost = np.array(cost, dtype=np.float64)
        self.raw = np.array(raw, dtype=np.float64)
        self.sizes = np.array(sz, dtype=np.float64)
        self.group = np.array(group)
        n_groups = int(self.group.max()) + 1 if len(group) else 0
        self.onehot = np.zeros((n_groups, len(self.var)))
        self.onehot[self.group, np.arange(len(self.var))] = 1.0
        top = float(np.abs(self.cost).max()) if len(cost) else 0.0
        self.scale = 1e3 / top if top > 0 else 1.0
        per_group = [self.sizes[self.group == g] for g in range(n_groups)]
        self.min_size = self.fixed_bytes + int(sum(s.min() for s in per_group))
        self.max_size = self.fixed_bytes + int(sum(s.max() for s in per_group))
        # HiGHS is given sizes in units of 2**k bytes (exact in floating point) so that the largest plan is at most
        # about 1e7 units: sizes of 1e10 bytes (a 7B model) otherwise break its numerics (status 4). Small models
        # keep bytes. Budgets are still checked in bytes (solve).
        self.unit = float(2 ** max(0, math.ceil(math.log2(max(self.max_size, 1) / 1e7))))
        self.scaled = self.sizes / self.unit

    def _milp(self, c: np.ndarray, extra: list[LinearConstraint]):
        cons = [LinearConstraint(self.onehot, 1, 1), *extra]
        # HiGHS 1.x now and then prints a stray debug line ("HighsMipSolverData::transformNewIntegerFeasibleSolution
        # tmpSolver.run();", ERGO-Code/HiGHS#2783) straight to file descriptor 1, presolve or not: the command's
        # stdout is its JSON result, so the solver's stdout goes to /dev/null
        # presolve: 2.3x faster on a 7B model's 131 units x 7 formats (12.2 -> 5.4 s for 16 warm-start plans), and
        # the optimum is still exact (mip_rel_gap 0)
        options = {"mip_rel_gap": 0, "presolve": True}
        with _solver_stdout_muted():
            return milp(
                c, integrality=np.ones_like(c), bounds=Bounds(0, 1), constraints=cons, options=options
            )

    def _allocation(self, x: np.ndarray, budget: int) -> Allocation:
        pick = x > 0.5
        formats = dict(self.fixed)
        formats.update({self.var[i][0]: self.var[i][1] for i in np.flatnonzero(pick)})
        plan = Plan({u: formats[u] for u in self.units})
        size = self.fixed_bytes + int(self.sizes[pick].sum())
        delta = self.fixed_delta + float(self.raw[pick].sum())
        return Allocation(plan, size, delta, budget)

    def solve(self, budget: int, smallest: bool = True) -> Allocation | None:
        """A plan of least predicted delta among those of at most ``budget`` bytes (None: none fits); with
        ``smallest``, the smallest such plan (a second solve)."""
        if budget < self.min_size:
            return None
        if not self.var:
            return self._allocation(np.zeros(0), budget)
        cap = budget - self.fixed_bytes
        # The solver's integrality tolerance lets a chosen x sit 1e-9 below 1, which on units of 1e8-1e9 bytes (a
        # 7B model) overshoots the budget by a few bytes once rounded: tighten by the overshoot, doubling each try.
        for attempt in range(40):
            c = self.cost * self.scale
            fit = LinearConstraint(self.scaled[None, :], -np.inf, cap / self.unit)
            res = self._milp(c, [fit])
            if res.status == 2:
                return None
            if res.x is None:
                raise RuntimeError(f"HiGHS failed on the allocation problem: {res.message}")
            x = np.round(res.x)
            if smallest:
                least = LinearConstraint(c[None, :], -np.inf, float(c @ x) + 1e-6)
                second = self._milp(self.scaled, [fit, least])
                x = np.round(second.x) if second.x is not None else x
            over = int(self.sizes @ x) - (budget - self.fixed_bytes)
            if over <= 0:
                return self._allocation(x, budget)
            cap -= over * 2**attempt
        raise RuntimeError("HiGHS kept returning allocations over the size budget")


def allocate(
    table: SensitivityTable,
    space_choices: Mapping[str, Sequence[str]],
    unit_sizes: Mapping[str, Mapping[str, int]],
    budget_bytes: int,
) -> Allocation | None:
    """The plan with the least predicted delta of size <= ``budget_bytes`` (the smallest such plan), or None when
    no plan the menu allows fits the budget.

    ``space_choices`` is unit -> allowed formats (``SearchSpace.choices``), every unit of the model included;
    ``unit_sizes`` is unit -> format -> bytes in the accounting the budget uses (``table.unit_sizes(metric)``).
    """
    return _Problem(table, space_choices, unit_sizes).solve(int(budget_bytes))


def predicted_front(
    table: SensitivityTable,
    space_choices: Mapping[str, Sequence[str]],
    unit_sizes: Mapping[str, Mapping[str, int]],
    n_points: int = 20,
    max_size: int | None = None,
) -> list[Allocation]:
    """Up to ``n_points`` predicted-Pareto plans for budgets evenly spread from the smallest size the menu allows
    to the largest (or ``max_size`` bytes, as ``Allocation.size_bytes`` counts them); duplicates and dominated plans dropped;
    sorted by size."""
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    prob = _Problem(table, space_choices, unit_sizes)
    top = prob.max_size if max_size is None else max(prob.min_size, min(prob.max_size, max_size))
    budgets = np.linspace(prob.min_size, top, n_points) if n_points > 1 else [top]
    found: dict[Plan, Allocation] = {}
    for b in budgets:
        a = prob.solve(int(b))
        if a is not None and a.plan not in found:
            found[a.plan] = a
    plans = list(found.values())
    return [plans[i] for i in nondominated([(a.size_bytes, a.delta_nll) for a in plans])]


def best_predicted_fitness(
    table: SensitivityTable,
    space_choices: Mapping[str, Sequence[str]],
    unit_sizes: Mapping[str, Mapping[str, int]],
    baseline_bytes: int,
    penalty: float = 10.0,
) -> Allocation:
    """The plan of highest predicted fitness (``metrics.fitness`` of ``baseline_bytes/size`` and ``expm1(delta)``) over every
    budget (exact under the additive model; see module docstring)."""
    prob = _Problem(table, space_choices, unit_sizes)

    def fit(a: Allocation) -> float:
        return a.fitness(baseline_bytes, penalty)

    def bound(lo: int, delta: float) -> float:  # no plan of >= lo bytes and delta >= `delta` does better
        return fitness(baseline_bytes / lo, math.expm1(delta), penalty)

    best: Allocation | None = None
    best_fit = -math.inf
    # best-first branch and bound over size intervals [lo, hi], keyed by the bound on their plans' fitness
    heap = [(-bound(prob.min_size, -math.inf), prob.min_size, prob.max_size)]
    while heap:
        neg, lo, hi = heapq.heappop(heap)
        if -neg <= best_fit:
            break
        if best_fit > 0:  # a plan can win only if baseline/size > best fitness
            hi = min(hi, math.ceil(baseline_bytes / best_fit) - 1)
        a = prob.solve(hi, smallest=False) if hi >= lo else None
        if a is None:
            continue
        if fit(a) > best_fit:
            best, best_fit = a, fit(a)
        # plans in (a.size, hi] have delta >= a's and more bytes: none beats `a`; split the rest in two
        top = a.size_bytes - 1
        mid = (lo + top) // 2
        for left, right in ((lo, mid), (mid + 1, top)):
            if left <= right and bound(left, a.delta_nll) > best_fit:
                heapq.heappush(heap, (-bound(left, a.delta_nll), left, right))
    assert best is not None
    # the smallest plan with the winner's predicted delta (same or better fitness)
    return max(best, prob.solve(best.size_bytes) or best, key=fit)


class Allocator:
    """The allocator's two questions as one object that callers are handed (``warmstart.allocator_plans``,
    ``phases.run_phases``): :func:`predicted_front` and :func:`best_predicted_fitness`.

    With ``cache=True`` each question (table, menu, sizes and arguments) is solved once: a benchmark asks the same
    ones for every method, seed and budget. Cached tables are held alive, so their ids stay unique; the answers
    are the solver's, unchanged (it is deterministic)."""

    def __init__(self, cache: bool = False):
        self._memo: dict | None = {} if cache else None

    def _ask(self, fn, table: SensitivityTable, choices: Mapping, sizes: Mapping, **kwargs):
        if self._memo is None:
            return fn(table, choices, sizes, **kwargs)
        key = (fn.__name__, id(table), repr(sorted(choices.items())), repr(sorted(sizes.items())),
               tuple(sorted(kwargs.items())))  # fmt: skip
        if key not in self._memo:
            self._memo[key] = (table, fn(table, choices, sizes, **kwargs))
        return self._memo[key][1]

    def predicted_front(
        self, table: SensitivityTable, choices: Mapping, sizes: Mapping, n_points: int = 20, max_size=None
    ) -> list[Allocation]:
        return self._ask(predicted_front, table, choices, sizes, n_points=n_points, max_size=max_size)

    def best_predicted_fitness(
        self,
        table: SensitivityTable,
        choices: Mapping,
        sizes: Mapping,
        baseline_bytes: int,
        penalty: float = 10.0,
    ) -> Allocation:
        return self._ask(
            best_predicted_fitness, table, choices, sizes, baseline_bytes=baseline_bytes, penalty=penalty
        )


EXACT = Allocator()  # no cache: what a study uses
