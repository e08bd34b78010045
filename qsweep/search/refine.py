"""Refine: local moves from the best measured plans, ranked by a prediction anchored on measurements.

The additive model (one-unit sensitivities summed in log-perplexity) misses interactions, and misses most at low
bits: on the models tried it under-predicts the measured degradation of allocator plans by 20-25%. Refining with
it alone finds nothing; refining blind costs an evaluation per move. This step does neither:

* **Anchored**: a neighbour ``n`` of a measured plan ``m`` is predicted as ``measured(m) + alpha * (pred(n) -
  pred(m))``: only the *difference* comes from the table, so every interaction already inside ``m`` is counted
  exactly, and the additive model is trusted only for a one- or two-unit change.
* **Calibrated**: ``alpha`` is the least-squares slope of measured on predicted log-perplexity change over every plan
  the study has measured (clamped to [0.25, 8]; 1 with fewer than 3 plans), so a model that under-predicts by 25%
  is scaled up before it ranks anything.
* **Moves**: every one-unit change (any other format on the unit's menu) and every two-unit change (one unit up and
  another down, or both down: the trade a knapsack makes), from each of the ``n_incumbents`` best measured plans by
  fitness; ranked by predicted fitness; plans already measured are skipped.
The app evaluates the top proposal, records it in the study, and asks again, so each measurement moves the anchor
and the calibration (qsweep.app.run_search, ``search.refine_trials``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qsweep.plan import Plan
from qsweep.search.allocate import predicted_delta_nll
from qsweep.search.sensitivity import SensitivityTable
from qsweep.search.space import SearchSpace

__all__ = ["Measured", "Proposal", "calibration", "propose"]


@dataclass(frozen=True)
class Measured:
    """A plan the study measured: its log-perplexity change vs the baseline (``log1p(degradation)``) and size."""

    plan: Plan
    delta_nll: float
    size_bytes: int


@dataclass(frozen=True)
class Proposal:
    plan: Plan
    predicted_delta_nll: float
    size_bytes: int
    predicted_fitness: float
    anchor: Plan


def calibration(measured: Sequence[Measured], table: SensitivityTable) -> float:
    """Least-squares slope (through 0) of measured on predicted delta-NLL; see module docstring."""
    pts = [(predicted_delta_nll(table, m.plan), m.delta_nll) for m in measured]
    pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y) and x > 1e-6]
    if len(pts) < 3:
        return 1.0
    alpha = sum(x * y for x, y in pts) / sum(x * x for x, _ in pts)
    return float(min(8.0, max(0.25, alpha)))


def _fitness(baseline_bytes: int, size: np.ndarray, delta: np.ndarray, penalty: float) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore"):  # masked entries (same-unit pairs) may be degenerate
        return baseline_bytes / size - penalty * np.maximum(0.0, np.expm1(delta))


def propose(
    measured: Sequence[Measured],
    table: SensitivityTable,
    space: SearchSpace,
    sizes: Mapping[str, Mapping[str, int]],
    *,
    baseline_bytes: int,
    penalty: float,
    n: int = 1,
    n_incumbents: int = 3,
    exclude: set[str] = frozenset(),
) -> list[Proposal]:
    """The ``n`` unmeasured neighbours of highest predicted fitness (module docstring); ``exclude`` holds plan
    digests not to propose (every measured plan is excluded anyway)."""
    ok = [m for m in measured if math.isfinite(m.delta_nll)]
    if not ok:
        return []
    alpha = calibration(ok, table)
    seen = set(exclude) | {m.plan.digest() for m in measured}
    fit = _fitness(baseline_bytes, np.array([m.size_bytes for m in ok], float), np.array([m.delta_nll for m in ok]),
                   penalty)  # fmt: skip
    incumbents = [ok[i] for i in np.argsort(-fit, kind="stable")[:n_incumbents]]
    found: list[Proposal] = []
    for inc in incumbents:
        units, fmts, dd, ds = [], [], [], []
        for u in space.searchable:
            cur = inc.plan[u]
            for f in space.choices[u]:
                if f != cur:
                    units.append(u)
                    fmts.append(f)
                    dd.append(alpha * (table.delta(u, f) - table.delta(u, cur)))
                    ds.append(sizes[u][f] - sizes[u][cur])
        if not units:
            continue
        dd_a, ds_a, unit_ids = np.array(dd), np.array(ds, float), np.unique(units, return_inverse=True)[1]
        # one-unit moves [m] and two-unit moves [m, m] (different units, i < j)
        single = _fitness(baseline_bytes, inc.size_bytes + ds_a, inc.delta_nll + dd_a, penalty)
        pair = _fitness(baseline_bytes, inc.size_bytes + ds_a[:, None] + ds_a[None, :],
                        inc.delta_nll + dd_a[:, None] + dd_a[None, :], penalty)  # fmt: skip
        pair[np.tril_indices(len(units))] = -np.inf
        pair[unit_ids[:, None] == unit_ids[None, :]] = -np.inf
        order = [((i,), single[i]) for i in np.argsort(-single)[: 4 * n + 8]]
        flat = np.argsort(-pair, axis=None)[: 4 * n + 8]
        order += [((int(k) // len(units), int(k) % len(units)), pair.flat[k]) for k in flat]
        for moves, value in order:
            if not math.isfinite(value):
                continue
            formats = dict(inc.plan.formats)
            for i in moves:
                formats[units[i]] = fmts[i]
            plan = Plan(formats)
            if plan.digest() in seen:
                continue
            seen.add(plan.digest())
            found.append(Proposal(plan, inc.delta_nll + float(sum(dd[i] for i in moves)),
                                  int(inc.size_bytes + sum(ds[i] for i in moves)), float(value), inc.plan))  # fmt: skip
    found.sort(key=lambda p: p.predicted_fitness, reverse=True)
    return found[:n]
