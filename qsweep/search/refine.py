"""Refine: local moves from the best measured plans, ranked by a prediction anchored on measurements.

The additive model (one-unit sensitivities summed in log-perplexity) misses interactions, and misses most at low
bits: on the models tried it under-predicts the measured degradation of allocator plans by 20-25%. Refining with
it alone finds nothing; refining blind costs an evaluation per move. This step does neither:

* **Anchored**: a neighbour ``n`` of a measured plan ``m`` is predicted as ``measured(m) + g(pred(n)) - g(pred(m))``:
  only the *difference* comes from the table, so every interaction already inside ``m`` is counted exactly, and the
  additive model is trusted only for a one- or two-unit change (or, for a jump, the units ``n`` and ``m`` differ in).
* **Calibrated**: ``g(p) = scale * p ** power`` is fitted (least squares in log-log) to every plan the study has
  measured, predicted vs measured log-perplexity change (``power`` clamped to [0.5, 3]; the identity with fewer than
  3 plans). Interactions grow with the damage already done, so ``power`` comes out above 1 and the slope ``g'`` is
  local: a one-unit change is priced steeply on a low-bit plan and gently on a mild one. (A single through-zero
  slope, fitted mostly to the low-bit plans, over-predicted what one unit's upgrade saves on a mild plan several
  times: the hypervolume criterion then chased plans predicted *better than the baseline*, and measured them at
  +2%.)
* **Moves**: every one-unit change (any other format on the unit's menu) and every two-unit change (one unit up and
  another down, or both down: the trade a knapsack makes); plans already measured are skipped. Two criteria:

  - ``fitness`` (the single-objective study): moves from each of the ``n_incumbents`` best measured plans by
    fitness, ranked by predicted fitness;
  - ``hypervolume`` (the multi-objective study, two turns in three; ``fitness`` takes the third): moves from
    *every* member of the measured front inside ``search.front_box``, ranked by the hypervolume their predicted
    point would add to the measured front (:mod:`qsweep.search.front`): the step fills the front's widest gaps,
    where the additive model says a plan should exist, instead of polishing one point.

  **One-unit moves first**: a ``fitness`` turn takes, in this order, the moves whose *mean* prediction beats the
  best measured fitness, then the one-unit moves whose ranked value (the upper bound) beats it, then every move by
  its ranked value; a ``hypervolume`` turn takes the one-unit moves with a gain first. There are about half the
  square of the one-unit moves as pairs, so the best-ranked pair is the largest of thousands of optimistic
  predictions: ranked by the upper bound alone it outranked every one-unit move, turn after turn, while measuring
  below them, and the small moves that finish a plan were never tried; ranked one-unit moves first without the
  mean's tier, the refine step spent its turns on small moves while a pair was predicted, on its mean, to improve
  (the Quickstart's 40 evaluations). On the bundled model, ``tpe_warm`` at 60 evaluations: 99.52% -> 99.82% of the
  reference's best validation fitness. The candidates are the best *unmeasured* moves however deep in the ranking
  they sit, so a long refine does not run out of proposals while a neighbourhood still has unmeasured plans.
* **Learned** (``search.refine_learn``): before each turn the table's rows are moved to their posterior mean given
  every measured plan (:mod:`qsweep.search.posterior`), so a row the table got wrong is repriced once a move holding
  it is measured, instead of every pair holding it ranking first again.
* **Optimistic** (``search.refine_optimism``): a move is ranked with its change taken that many posterior standard
  deviations lower, so moves whose rows no measurement has settled get measured once (upper confidence bound).

:class:`RefinePolicy` is the step's one owner: its schedule of criteria (``search.refine_schedule``, with the
other criterion as the fallback of a turn that has nothing to propose), its candidates (``search.refine_incumbents``
incumbents, and ``search.refine_jumps`` plans of the allocator's front as jumps) and its ranking (:func:`propose`).
The search phases (:func:`qsweep.search.phases.run_phases`, ``search.refine_trials`` turns) evaluate the policy's
proposal, record it in the study and ask again, so each measurement moves the anchor and the calibration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qsweep.metrics import compression, fitness
from qsweep.plan import Plan
from qsweep.search.allocate import Allocator, predicted_delta_nll
from qsweep.search.config import CRITERIA
from qsweep.search.front import hypervolume_gain, staircase
from qsweep.search.posterior import posterior_table
from qsweep.search.sensitivity import SensitivityTable
from qsweep.search.space import SearchSpace

__all__ = [
    "CRITERIA",
    "POWER_RANGE",
    "Calibration",
    "Measured",
    "Proposal",
    "RefinePolicy",
    "calibration",
    "propose",
]


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
    value: float  # what it was ranked by: its predicted fitness, or its predicted hypervolume gain

    @property
    def units_moved(self) -> int:
        """How many units the plan changes from its anchor (1 or 2 for a neighbour; any number for a jump)."""
        a, b = self.plan.formats, self.anchor.formats
        return sum(a.get(u) != b.get(u) for u in a.keys() | b.keys())


@dataclass(frozen=True)
class Calibration:
    """Measured delta-NLL as a power of the additive prediction: ``scale * p ** power`` (odd-extended to p < 0)."""

    scale: float = 1.0
    power: float = 1.0

    def __call__(self, p):
        p = np.asarray(p, float)
        return self.scale * np.sign(p) * np.abs(p) ** self.power

    def inverse(self, y):
        """The additive prediction ``p`` with ``self(p) == y``."""
        y = np.asarray(y, float)
        return np.sign(y) * (np.abs(y) / self.scale) ** (1.0 / self.power)


POWER_RANGE = (0.5, 3.0)


def calibration(measured: Sequence[Measured], table: SensitivityTable) -> Calibration:
    """The power law fitted (least squares in log-log) to every measured plan's (predicted, measured) delta-NLL;
    identity with fewer than 3 usable plans. See module docstring."""
    pts = [(predicted_delta_nll(table, m.plan), m.delta_nll) for m in measured]
    pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y) and x > 1e-6 and y > 1e-6]
    if len(pts) < 3:
        return Calibration()
    lx, ly = np.log([x for x, _ in pts]), np.log([y for _, y in pts])
    power = float(np.polyfit(lx, ly, 1)[0]) if np.ptp(lx) > 1e-9 else 1.0
    power = min(POWER_RANGE[1], max(POWER_RANGE[0], power))
    return Calibration(float(np.exp(np.mean(ly - power * lx))), power)


def _fitness(baseline_bytes: int, size: np.ndarray, delta: np.ndarray, penalty: float) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore"):  # masked entries (same-unit pairs) may be degenerate
        return fitness(compression(baseline_bytes, size), np.expm1(delta), penalty)


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
    criterion: str = "fitness",
    box: Sequence[float] = (0.5, 1.2),
    jumps: Sequence[Plan] = (),
    learn: bool = True,
    optimism: float = 1.0,
) -> list[Proposal]:
    """The ``n`` unmeasured neighbours ranked best by ``criterion`` (module docstring); ``exclude`` holds plan
    digests not to propose (every measured plan is excluded anyway). ``criterion="hypervolume"`` ranks by predicted
    hypervolume gain over the measured front in ``box`` (size ratio, perplexity ratio), from every front member,
    and proposes only plans with a positive gain. ``jumps`` are plans anywhere in the space (the allocator's
    predicted front), each anchored on the measured plan that shares most units with it. ``learn``: the table
    corrected by the measurements first (qsweep.search.posterior); ``optimism``: every ranking (gains included)
    takes a change that many posterior standard deviations lower, while a Proposal's predictions stay the mean."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown refine criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    ok = [m for m in measured if math.isfinite(m.delta_nll)]
    if not ok:
        return []
    g = calibration(ok, table)
    cov = None
    if learn:  # every row corrected by what the study measured (qsweep.search.posterior)
        table, cov = posterior_table(table, [m.plan for m in ok], [m.delta_nll for m in ok], g.inverse,
                                     covariance=optimism > 0)  # fmt: skip
    spread = (lambda moves: _spread(cov, moves, optimism)) if cov is not None else None
    seen = set(exclude) | {m.plan.digest() for m in measured}
    size = np.array([m.size_bytes for m in ok], float)
    delta = np.array([m.delta_nll for m in ok])

    def fitness(s: np.ndarray, d: np.ndarray) -> np.ndarray:
        return _fitness(baseline_bytes, s, d, penalty)

    if criterion == "fitness":
        measured_fitness = fitness(size, delta)
        incumbents = [ok[i] for i in np.argsort(-measured_fitness, kind="stable")][:n_incumbents]
        value = fitness
        bar = float(np.max(measured_fitness))  # what a move must beat: the best measured plan

    else:
        bar = 0.0  # what a move must add: any hypervolume
        points = np.stack([size / baseline_bytes, np.exp(delta)], axis=1)
        front = staircase(points, box)
        incumbents = [m for m, p in zip(ok, points, strict=True) if any((p == f).all() for f in front)]

        def value(s: np.ndarray, d: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore"):
                gain = hypervolume_gain(front, s / baseline_bytes, np.exp(d), box)
            return np.where(gain > 0, gain, -np.inf)

    found: list[Proposal] = []
    for inc in incumbents:
        found += _neighbours(inc, table, space, sizes, g, value, fitness, n, seen, spread)
    fresh: dict[str, Plan] = {}
    for p in jumps:
        if p.digest() not in seen:
            fresh.setdefault(p.digest(), p)
    jumps = list(fresh.values())
    if jumps:  # each jump's anchor: the first measured plan that differs from it in fewest units
        codes = {u: {f: i for i, f in enumerate(space.choices[u])} for u in space.searchable}

        def encode(plans: Sequence[Plan]) -> np.ndarray:
            return np.array([[codes[u].get(p[u], -1) for u in space.searchable] for p in plans]).reshape(
                len(plans), len(space.searchable)
            )

        nearest = (encode(jumps)[:, None, :] != encode([m.plan for m in ok])[None, :, :]).sum(-1).argmin(1)
    for plan, a in zip(jumps, nearest if jumps else (), strict=True):
        seen.add(plan.digest())
        anchor = ok[int(a)]
        base, pred = predicted_delta_nll(table, anchor.plan), predicted_delta_nll(table, plan)
        d = anchor.delta_nll + float(g(pred) - g(base))
        s = anchor.size_bytes + sum(sizes[u][plan[u]] - sizes[u][anchor.plan[u]] for u in space.searchable)
        optimistic = d
        if cov is not None:  # ranked as the neighbours are: the change lowered by its posterior spread
            sd = optimism * cov.sd(
                [(u, anchor.plan[u], plan[u]) for u in space.searchable if plan[u] != anchor.plan[u]]
            )
            optimistic = anchor.delta_nll + float(g(pred - sd) - g(base))
        v = float(value(np.array(float(s)), np.array(optimistic)))
        if math.isfinite(v):
            found.append(
                Proposal(plan, d, int(s), float(fitness(np.array(float(s)), np.array(d))), anchor.plan, v)
            )
    # (fitness) moves whose mean beats the bar, then one-unit moves whose rank does, then by rank (docstring)
    mean_tier = criterion == "fitness"
    found.sort(key=lambda p: (mean_tier and p.predicted_fitness > bar, p.units_moved == 1 and p.value > bar, p.value),
               reverse=True)  # fmt: skip
    return found[:n]


def _spread(cov, moves, optimism: float) -> tuple[np.ndarray, np.ndarray]:
    """``optimism`` posterior standard deviations of each one-unit move's row change, and of each pair's."""
    v = cov.vectors(moves)
    c = v @ cov.cov @ v.T
    d = np.maximum(np.diag(c), 0.0)
    return optimism * np.sqrt(d), optimism * np.sqrt(np.maximum(d[:, None] + d[None, :] + 2 * c, 0.0))


def _neighbours(inc: Measured, table, space, sizes, g: Calibration, value, fitness, n: int, seen: set[str],
                spread=None):  # fmt: skip
    """The best one- and two-unit moves from ``inc`` by ``value(size, delta_nll)`` (anchored, calibrated), the
    change taken ``spread`` lower (optimism where the learned rows are still uncertain; None: none)."""
    units, fmts, dd, ds = [], [], [], []
    for u in space.searchable:
        cur = inc.plan[u]
        for f in space.choices[u]:
            if f != cur:
                units.append(u)
                fmts.append(f)
                dd.append(table.delta(u, f) - table.delta(u, cur))
                ds.append(sizes[u][f] - sizes[u][cur])
    if not units:
        return []
    dd_a, ds_a, unit_ids = np.array(dd), np.array(ds, float), np.unique(units, return_inverse=True)[1]
    base = predicted_delta_nll(table, inc.plan)

    def anchored(change):  # the anchor's measurement plus the calibrated change of the additive prediction
        return inc.delta_nll + g(base + change) - g(base)

    # one-unit moves [m] and two-unit moves [m, m] (different units, i < j)
    s1, s2 = spread([(u, inc.plan[u], f) for u, f in zip(units, fmts, strict=True)]) if spread else (0.0, 0.0)
    single = value(inc.size_bytes + ds_a, anchored(dd_a - s1))
    pair = value(inc.size_bytes + ds_a[:, None] + ds_a[None, :], anchored(dd_a[:, None] + dd_a[None, :] - s2))
    pair[np.tril_indices(len(units))] = -np.inf
    pair[unit_ids[:, None] == unit_ids[None, :]] = -np.inf

    def proposal(moves: tuple[int, ...], v: float) -> Proposal | None:
        formats = dict(inc.plan.formats)
        for i in moves:
            formats[units[i]] = fmts[i]
        plan = Plan(formats)
        if plan.digest() in seen:
            return None
        seen.add(plan.digest())
        d = float(anchored(sum(dd[i] for i in moves)))
        s = int(inc.size_bytes + sum(ds[i] for i in moves))
        return Proposal(plan, d, s, float(fitness(np.array(s, float), np.array(d))), inc.plan, float(v))

    found = _best_unseen(single, n, lambda k: proposal((k,), single[k]))
    found += _best_unseen(pair, n, lambda k: proposal(divmod(k, len(units)), pair.flat[k]))
    return found


def _best_unseen(values: np.ndarray, n: int, make) -> list[Proposal]:
    """The ``n`` best finite entries of ``values`` (flattened) that ``make(index)`` turns into a proposal (None: a
    plan already measured or proposed), best first. The first ``4 n + 8`` candidates come from a partial sort; only
    when they hold too few unmeasured plans is every finite entry sorted, so that a long refine, whose best moves
    around an incumbent are all measured, still reaches the unmeasured ones below them."""
    flat = values.ravel()
    ok = np.flatnonzero(np.isfinite(flat))
    found: list[Proposal] = []
    read: set[int] = set()
    k = 4 * n + 8
    rounds = [ok[np.argpartition(-flat[ok], k - 1)[:k]]] if k < len(ok) else []
    rounds.append(ok)  # the full ranking, read only if the partial one falls short
    for top in rounds:
        for i in top[np.argsort(-flat[top], kind="stable")]:
            if int(i) in read:
                continue
            read.add(int(i))
            p = make(int(i))
            if p is not None:
                found.append(p)
                if len(found) == n:
                    return found
    return found


@dataclass(frozen=True)
class RefinePolicy:
    """The refine step's schedule, candidates and ranking (module docstring); its knobs are ``search.refine_*``.

    ``multi``: a multi-objective study turns through ``schedule``; a single-objective one ranks by fitness only."""

    baseline_bytes: int
    penalty: float
    multi: bool
    schedule: tuple[str, ...] = ("fitness", "hypervolume", "hypervolume")
    incumbents: int = 3
    jumps: int = 64
    box: tuple[float, float] = (0.5, 1.2)
    learn: bool = True
    optimism: float = 1.0

    @classmethod
    def of(cls, search, baseline_bytes: int, penalty: float) -> RefinePolicy:
        """The policy of a validated search config (``qsweep.search.config.SearchConfig``)."""
        return cls(baseline_bytes, penalty, search.objective == "multi", tuple(search.refine_schedule),
                   search.refine_incumbents, search.refine_jumps, tuple(search.front_box),
                   search.refine_learn, search.refine_optimism)  # fmt: skip

    def criteria(self, turn: int) -> list[str]:
        """Turn ``turn``'s criteria in order: the schedule's, then the other as the fallback."""
        if not self.multi:
            return ["fitness"]
        first = self.schedule[turn % len(self.schedule)]
        return [first, *(c for c in CRITERIA if c != first)]

    def jump_plans(
        self, table: SensitivityTable, space: SearchSpace, sizes: Mapping, allocator: Allocator
    ) -> list[Plan]:
        """The allocator's predicted front inside the box (multi-objective only): where the hypervolume criterion
        may jump."""
        if not self.multi or self.jumps < 1:
            return []
        top = int(self.box[0] * self.baseline_bytes)
        front = allocator.predicted_front(table, space.choices, sizes, n_points=self.jumps, max_size=top)
        return [a.plan for a in front]

    def next(
        self,
        turn: int,
        measured: Sequence[Measured],
        table: SensitivityTable,
        space: SearchSpace,
        sizes: Mapping[str, Mapping[str, int]],
        jumps: Sequence[Plan] = (),
        exclude: set[str] = frozenset(),
    ) -> tuple[Proposal, str] | None:
        """The proposal of turn ``turn`` and the criterion that ranked it; None when no criterion has one.
        ``exclude``: plan digests never to propose (the study's plans, those racing dropped included)."""
        for criterion in self.criteria(turn):
            props = propose(measured, table, space, sizes, baseline_bytes=self.baseline_bytes, penalty=self.penalty,
                            n_incumbents=self.incumbents, criterion=criterion, box=self.box, exclude=exclude,
                            jumps=jumps if criterion == "hypervolume" else (), learn=self.learn, optimism=self.optimism)  # fmt: skip
            if props:
                return props[0], criterion
        return None
