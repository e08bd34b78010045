"""Baseline allocation strategies (the seed's benchmark had them beside its evolved strategy), on a budget.

Each baseline proposes plans and learns their fitness through a :class:`Budget`: it scores plans with the
session (a repeated plan is answered from memory and costs nothing, as a study's duplicate cache does) and stops
the baseline once ``n`` plans are scored. None of them knows its budget, so one run to the largest budget can be
read at every smaller one.

* ``uniform``: every uniform plan, lowest-bit first (fewer bytes first).
* ``first_k``: the seed's hand-made family: blocks ``0..k-1`` one format above the rest (e.g. h.0-3 INT8, the rest
  INT4), embeddings with the rest; every k and every (rest, protected) pair of adjacent menu formats.
* ``greedy``: the classic sensitivity allocator: from the all-lowest plan, repeatedly raise by one format the
  unit with the largest predicted loss reduction per added byte (the table's additive prediction); the plans on
  this path are scored in order of predicted fitness. It reads the sensitivity table, so its cost counts.
* ``ga``: a genetic algorithm in the seed's style: a population (the uniform plans plus random ones), tournament
  selection, uniform crossover, per-unit mutation to a neighbouring format, elitism; generations until the budget.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable

import numpy as np

from qsweep.metrics import fitness
from qsweep.plan import Plan
from qsweep.score import PlanScore
from qsweep.search.sensitivity import SensitivityTable
from qsweep.search.space import SearchSpace

__all__ = ["BASELINES", "Budget", "BudgetSpent", "first_k", "ga", "greedy", "uniform"]


class BudgetSpent(Exception):
    """The baseline's evaluations are spent."""


class Budget:
    """``budget(plan) -> fitness``: scores at most ``n`` distinct plans with ``score``; ``records`` in order."""

    def __init__(self, score: Callable[[Plan], PlanScore], n: int, metric: str = "packed"):
        self.score, self.n, self.metric = score, n, metric
        self.records: list[PlanScore] = []
        self._memo: dict[str, float] = {}

    def __call__(self, plan: Plan) -> float:
        key = plan.digest()
        if key not in self._memo:
            if len(self.records) >= self.n:
                raise BudgetSpent
            s = self.score(plan)
            self.records.append(s)
            f = s.fitness(self.metric)
            self._memo[key] = -math.inf if f is None else f
        return self._memo[key]


def _bits_order(space: SearchSpace) -> list[str]:
    """The menu's formats, most bits first (the menu's order for the synthetic problems and qsweep's menus)."""
    return list(dict.fromkeys(f for u in space.searchable for f in space.choices[u]))


def uniform(space: SearchSpace, budget: Budget, **_) -> None:
    for plan in reversed(list(space.uniform_plans().values())):
        budget(plan)


def _block(unit: str) -> int:
    m = re.search(r"(?:^|\.)(\d+)\.", unit + ".")
    return int(m.group(1)) if m else -1


def first_k(space: SearchSpace, budget: Budget, **_) -> None:
    formats = _bits_order(space)
    blocks = sorted({_block(u) for u in space.choices} - {-1})
    for k in range(len(blocks) + 1):
        for hi, lo in itertools.pairwise(formats):
            protect = set(blocks[:k])
            budget(Plan({u: (hi if _block(u) in protect else lo) if lo in c and hi in c else c[0]
                         for u, c in space.choices.items()}))  # fmt: skip


def greedy(space: SearchSpace, budget: Budget, *, table: SensitivityTable, baseline_bytes: int, penalty: float,
           metric: str = "packed", **_) -> None:  # fmt: skip
    sizes = table.unit_sizes(metric)
    cur = {u: c[-1] for u, c in space.choices.items()}
    size = sum(sizes[u][f] for u, f in cur.items())
    delta = sum(table.delta(u, f) for u, f in cur.items())
    path = [(Plan(cur), size, delta)]
    while True:
        best = None
        for u, c in space.choices.items():
            i = c.index(cur[u])
            if i == 0:
                continue
            up = c[i - 1]
            gain = table.delta(u, cur[u]) - table.delta(u, up)
            cost = max(1, sizes[u][up] - sizes[u][cur[u]])
            if best is None or gain / cost > best[0]:
                best = (gain / cost, u, up)
        if best is None:
            break
        _, u, up = best
        size += sizes[u][up] - sizes[u][cur[u]]
        delta += table.delta(u, up) - table.delta(u, cur[u])
        cur[u] = up
        path.append((Plan(cur), size, delta))
    predicted = [fitness(baseline_bytes / s, math.expm1(d), penalty) for _, s, d in path]
    for k in sorted(range(len(path)), key=lambda k: -predicted[k]):
        budget(path[k][0])


def ga(space: SearchSpace, budget: Budget, *, seed: int = 0, population: int = 16, tournament: int = 3,
       crossover: float = 0.9, elite: int = 2, **_) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    units = list(space.choices)
    choices = [space.choices[u] for u in units]

    def plan(genes: list[int]) -> Plan:
        return Plan({u: c[g] for u, c, g in zip(units, choices, genes, strict=True)})

    pop = [
        [c.index(p[u]) for u, c in zip(units, choices, strict=True)] for p in space.uniform_plans().values()
    ]
    while len(pop) < population:
        pop.append([int(rng.integers(len(c))) for c in choices])
    pop = pop[:population]
    fit = [budget(plan(g)) for g in pop]
    stale = 0
    while stale < 10 * population:  # a population that only repeats itself ends the run
        order = sorted(range(len(pop)), key=lambda i: -fit[i])
        children, child_fit = [pop[i] for i in order[:elite]], [fit[i] for i in order[:elite]]
        while len(children) < population:
            a, b = (
                max(rng.choice(len(pop), tournament, replace=False), key=lambda i: fit[i]) for _ in range(2)
            )
            child = [x if rng.random() < 0.5 else y for x, y in zip(pop[a], pop[b], strict=True)] if (
                rng.random() < crossover) else list(pop[a])  # fmt: skip
            for k, c in enumerate(choices):
                if len(c) > 1 and rng.random() < 1.0 / len(units):
                    child[k] = int(np.clip(child[k] + rng.choice((-1, 1)), 0, len(c) - 1))
            n_before = len(budget.records)
            children.append(child)
            child_fit.append(budget(plan(child)))
            stale = 0 if len(budget.records) > n_before else stale + 1
        pop, fit = children, child_fit


BASELINES: dict[str, Callable[..., None]] = {
    "uniform": uniform,
    "first_k": first_k,
    "greedy": greedy,
    "ga": ga,
}
