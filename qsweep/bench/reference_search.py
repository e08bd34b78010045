"""The long search behind a reference front: every plan it measures is kept, with its perplexity and both sizes.

It is not a search method offered to users (those live in :mod:`qsweep.search`); it spends thousands of real
evaluations to find, as well as measurements can, the best plans of a menu on one model, so that cheaper methods
have a yardstick. Phases, each ending at a share of the evaluation budget (and of the time limit, if any):

1. ``uniform``: the menu's uniform plans.
2. ``sensitivity``: every single-unit change from the top plan (each unit's first format, fp16 on the menus
   here): one measurement per (unit, format). These seed the greedy's priorities.
3. ``greedy`` (per size metric): a descent from the top plan. Each step applies the one-unit move (to any smaller
   format under that metric) with the smallest *measured* increase of log-perplexity per byte saved, so the path
   follows the lower edge of the perplexity/size cloud. Candidates are ranked by their last measured efficiency
   (lazy evaluation, as CELF does for submodular greedy): the best-ranked one is re-measured on the current plan,
   and accepted once a freshly measured move is still the best ranked (at most ``RECHECK`` re-measurements a
   step). The descent stops at the smallest plan or once perplexity exceeds ``stop_ratio`` x baseline (no plan
   beyond that helps the fitness or the hypervolume).
4. ``local`` (per size metric): hill climbing on the measured fitness from the best plans found. One-unit moves are
   tried in order of their last measured gain, and the best improving one is taken after at least ``MIN_SCAN``
   have been measured; when no one-unit move improves (every one measured), the two-unit moves that the measured
   one-unit changes predict best (sizes exactly, perplexity ratios multiplied) are measured, ``PAIRS`` of them:
   this is where the interactions that an additive model misses are found. Climbs restart, alternating metrics,
   from the best plan at least 3 units away from every earlier climb's start and end, until the phase's budget
   is spent.
5. ``random``: perturbations of the current non-dominated plans and best plans (one to four units moved one or
   two steps along their size-sorted formats), plus one uniformly random plan in ten.
6. ``polish``: a last climb from the best plan of each metric, then random perturbations until the budget is spent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

from qsweep.formats import get_format
from qsweep.metrics import fitness
from qsweep.plan import Plan
from qsweep.score import SIZE_METRICS
from qsweep.search.front import nondominated
from qsweep.search.space import SearchSpace

__all__ = ["PHASES", "Measured", "ReferenceSearch"]

log = logging.getLogger(__name__)

# phase -> cumulative share of the evaluation budget (and of the time limit) at which it ends; the uniform plans
# (a handful) are always measured
PHASES = {"uniform": 1.0, "sensitivity": 0.08, "greedy": 0.40, "local": 0.68, "random": 0.90, "polish": 1.0}
RECHECK = 12  # most re-measurements per greedy step
MIN_SCAN = 12  # one-unit moves measured before an improving one is taken
TOP_SINGLES = 40  # the one-unit moves whose pairs are predicted
PAIRS = 30  # two-unit moves measured per stalled climb

Key = tuple[str, ...]  # one format per searchable unit


class _OutOfBudget(Exception):
    pass


@dataclass(frozen=True)
class Measured:
    """One measured plan: ``perplexity`` is inf when the evaluation failed; ``index`` counts from 1."""

    key: Key
    perplexity: float
    model_size_bytes: int
    packed_size_bytes: int
    index: int
    phase: str

    def size_bytes(self, metric: str) -> int:
        return self.packed_size_bytes if metric == "packed" else self.model_size_bytes


class ReferenceSearch:
    """Measures plans of ``space`` on ``split`` of ``session`` until ``evals`` plans (or ``seconds``) are spent."""

    def __init__(
        self,
        session,
        space: SearchSpace,
        *,
        split: str = "validation",
        evals: int = 3000,
        seconds: float | None = None,
        seed: int = 0,
        stop_ratio: float = 1.6,
    ):
        self.session, self.split = session, split
        self.evals, self.seconds, self.stop_ratio = int(evals), seconds, stop_ratio
        self.rng = random.Random(seed)
        self.space = space
        self.units = list(space.searchable)
        self.choices = [tuple(space.choices[u]) for u in self.units]
        self.fixed = {u: c[0] for u, c in space.choices.items() if len(c) == 1}
        self.table_order = list(session.table.names)
        by_unit = {u.name: u for u in session.table}
        self._bytes: dict[str, list[dict[str, int]]] = {}
        self._fixed_bytes: dict[str, int] = {}
        for metric in SIZE_METRICS:
            self._bytes[metric] = [{f: self._unit_bytes(by_unit[u], f, metric) for f in c} for u, c in
                                   zip(self.units, self.choices, strict=True)]  # fmt: skip
            self._fixed_bytes[metric] = sum(
                self._unit_bytes(by_unit[u], f, metric) for u, f in self.fixed.items()
            )
        self.base_ppl = float(session.baseline_perplexity(split))
        self.base_size = int(session.baseline_size_bytes)
        self.penalty = float(session.penalty)
        self.archive: dict[Key, Measured] = {}
        self.phase_counts: dict[str, int] = {}
        self.top: Key = tuple(c[0] for c in self.choices)
        self._phase, self._cap, self._deadline = "", 0, math.inf
        self._start = time.perf_counter()

    # ---- plans, sizes, fitness ----
    @staticmethod
    def _unit_bytes(unit, fmt: str, metric: str) -> int:
        f = get_format(fmt)
        if metric == "seed":
            return sum(f.seed_bytes(p.numel) for p in unit.params)
        return sum(f.packed_bytes(p.shape, p.channel_dim) for p in unit.params)

    def plan(self, key: Key) -> Plan:
        """The full plan (every unit of the table, fixed ones included) of ``key``."""
        formats = dict(zip(self.units, key, strict=True)) | self.fixed
        return Plan({u: formats[u] for u in self.table_order})

    def size(self, key: Key, metric: str) -> int:
        return self._fixed_bytes[metric] + sum(b[f] for b, f in zip(self._bytes[metric], key, strict=True))

    def fitness(self, m: Measured, metric: str) -> float:
        if not math.isfinite(m.perplexity):
            return -math.inf
        deg = m.perplexity / self.base_ppl - 1
        return fitness(self.base_size / m.size_bytes(metric), deg, self.penalty)

    def best(self, metric: str, n: int = 1) -> list[Measured]:
        return sorted(self.archive.values(), key=lambda m: (-self.fitness(m, metric), m.index))[:n]

    def front(self, metric: str) -> list[Measured]:
        ok = [m for m in self.archive.values() if math.isfinite(m.perplexity)]
        return [ok[i] for i in nondominated([(m.size_bytes(metric), m.perplexity) for m in ok])]

    # ---- measuring ----
    @property
    def n(self) -> int:
        return len(self.archive)

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def measure(self, key: Key) -> Measured:
        """The archived measurement of ``key``, or a new one (raises _OutOfBudget past the phase's share)."""
        if key in self.archive:
            return self.archive[key]
        if self.n >= self._cap or self.elapsed() >= self._deadline:
            raise _OutOfBudget
        result = self.session.evaluate(self.plan(key), self.split)
        ppl = result.perplexity if result.ok else math.inf
        m = Measured(key, ppl, self.size(key, "seed"), self.size(key, "packed"), self.n + 1, self._phase)
        self.archive[key] = m
        self.phase_counts[self._phase] = self.phase_counts.get(self._phase, 0) + 1
        return m

    @staticmethod
    def moved(key: Key, i: int, fmt: str) -> Key:
        return (*key[:i], fmt, *key[i + 1 :])

    def run(self) -> None:
        """All phases in order; each ends at its share of the budget (module docstring)."""
        steps = {"uniform": self._uniform, "sensitivity": self._sensitivity, "greedy": self._greedy,
                 "local": self._local, "random": self._random, "polish": self._polish}  # fmt: skip
        for phase, share in PHASES.items():
            self._phase, self._cap = phase, round(share * self.evals)
            self._deadline = math.inf if self.seconds is None else share * self.seconds
            before = self.n
            with contextlib.suppress(_OutOfBudget):
                steps[phase]()
            best = (
                {m: round(self.fitness(self.best(m)[0], m), 4) for m in SIZE_METRICS} if self.archive else {}
            )
            log.info("phase %-11s %5d evaluations (total %5d, %.0f s); best fitness %s",
                     phase, self.n - before, self.n, self.elapsed(), best)  # fmt: skip

    # ---- phases ----
    def _uniform(self) -> None:
        self.measure(self.top)
        for plan in self.space.uniform_plans().values():
            self.measure(tuple(plan[u] for u in self.units))

    def _singles(self, key: Key) -> Iterator[tuple[int, str]]:
        for i, c in enumerate(self.choices):
            for f in c:
                if f != key[i]:
                    yield i, f

    def _sensitivity(self) -> None:
        for i, f in self._singles(self.top):
            self.measure(self.moved(self.top, i, f))

    def _per_metric(self, fn) -> None:
        """``fn(metric)`` for each size metric, each given an equal part of what is left of the phase's budget."""
        cap, deadline, n0, t0 = self._cap, self._deadline, self.n, self.elapsed()
        for k, metric in enumerate(SIZE_METRICS, 1):
            share = k / len(SIZE_METRICS)
            self._cap = n0 + round(share * (cap - n0))
            self._deadline = t0 + share * (deadline - t0)
            with contextlib.suppress(_OutOfBudget):
                fn(metric)
        self._cap, self._deadline = cap, deadline

    def _greedy(self) -> None:
        self._per_metric(self._descend)

    def _descend(self, metric: str) -> None:
        """One greedy descent under ``metric`` (module docstring, phase 3)."""
        sizes = self._bytes[metric]
        stale: dict[tuple[int, str], float] = {}  # move -> efficiency last measured (on an earlier plan)

        def estimate(i: int, f: str, cur: Key) -> float:
            if (i, f) in stale:
                return stale[(i, f)]
            a = self.archive.get(self.moved(self.top, i, f))
            b = self.archive.get(self.moved(self.top, i, cur[i]))
            if a is None or b is None or not math.isfinite(a.perplexity):
                return 0.0
            return (math.log(a.perplexity) - math.log(b.perplexity)) / (sizes[i][cur[i]] - sizes[i][f])

        cur = self.top
        while self.measure(cur).perplexity < self.stop_ratio * self.base_ppl:
            moves = [(i, f) for i, f in self._singles(cur) if sizes[i][f] < sizes[i][cur[i]]]
            if not moves:
                return
            fresh: dict[tuple[int, str], float] = {}
            here = math.log(self.measure(cur).perplexity)
            for _ in range(RECHECK):
                pick = min(moves, key=lambda mv: fresh.get(mv, estimate(*mv, cur)))
                if pick in fresh:
                    break
                new = self.measure(self.moved(cur, *pick))
                lp = math.log(new.perplexity) if math.isfinite(new.perplexity) else math.inf
                fresh[pick] = (lp - here) / (sizes[pick[0]][cur[pick[0]]] - sizes[pick[0]][pick[1]])
            pick = min(fresh, key=fresh.get)
            stale.update(fresh)
            for f in self.choices[pick[0]]:  # the moved unit's old efficiencies referred to its old format
                stale.pop((pick[0], f), None)
            cur = self.moved(cur, *pick)

    def _climb(self, metric: str, start: Key) -> Key:
        """Hill climbing on ``metric``'s measured fitness from ``start`` (module docstring, phase 4)."""
        cur, gain = start, {}  # gain: move -> fitness change last measured (on an earlier plan)
        while True:
            here = self.fitness(self.measure(cur), metric)
            singles = sorted(self._singles(cur), key=lambda mv: -gain.get(mv, 0.0))
            if not singles:
                return cur
            fresh: dict[tuple[int, str], Measured] = {}
            for k, mv in enumerate(singles):
                fresh[mv] = self.measure(self.moved(cur, *mv))
                gain[mv] = self.fitness(fresh[mv], metric) - here
                if k + 1 >= MIN_SCAN and max(gain[m] for m in fresh) > 1e-12:
                    break
            best = max(fresh, key=lambda m: gain[m])
            if gain[best] > 1e-12:
                cur = self.moved(cur, *best)
                for f in self.choices[best[0]]:
                    gain.pop((best[0], f), None)
                continue
            pair = self._best_pair(metric, cur, fresh)
            if pair is None:
                return cur
            cur = pair

    def _best_pair(self, metric: str, cur: Key, singles: dict[tuple[int, str], Measured]) -> Key | None:
        """Measure the ``PAIRS`` two-unit moves predicted best from the measured singles; the best improving one."""
        base = self.measure(cur)
        here, size = self.fitness(base, metric), base.size_bytes(metric)
        top = sorted(singles, key=lambda mv: -self.fitness(singles[mv], metric))[:TOP_SINGLES]
        predicted = []
        for a in range(len(top)):
            for b in range(a + 1, len(top)):
                (i, f), (j, g) = top[a], top[b]
                if i == j:
                    continue
                ma, mb = singles[top[a]], singles[top[b]]
                ppl = ma.perplexity * mb.perplexity / base.perplexity
                s = ma.size_bytes(metric) + mb.size_bytes(metric) - size
                fit = fitness(self.base_size / s, ppl / self.base_ppl - 1, self.penalty)
                predicted.append((fit, self.moved(self.moved(cur, i, f), j, g)))
        predicted.sort(key=lambda t: -t[0])
        tried = [self.measure(key) for _, key in predicted[:PAIRS]]
        best = max(tried, key=lambda m: self.fitness(m, metric), default=None)
        return best.key if best is not None and self.fitness(best, metric) > here + 1e-12 else None

    def _local(self) -> None:
        """Climbs from the best plans, alternating metrics; a restart is >= 3 units away from earlier climbs."""
        climbed: list[Key] = []

        def far(key: Key) -> bool:
            return all(sum(a != b for a, b in zip(key, c, strict=True)) >= 3 for c in climbed)

        while True:
            progress = False
            for metric in SIZE_METRICS:
                start = next((m.key for m in self.best(metric, 500) if far(m.key)), None)
                if start is not None:
                    climbed.append(start)
                    climbed.append(self._climb(metric, start))
                    progress = True
            if not progress:
                return

    def _random(self) -> None:
        order = [
            sorted(c, key=lambda f, i=i: self._bytes["packed"][i][f]) for i, c in enumerate(self.choices)
        ]
        parents: list[Key] = []
        repeats = refreshed = 0
        while True:
            if self.n >= refreshed + 50 or not parents:
                refreshed = self.n
                limit = 1.5 * self.base_ppl
                parents = [
                    m.key for metric in SIZE_METRICS for m in self.front(metric) if m.perplexity < limit
                ]
                parents += [m.key for metric in SIZE_METRICS for m in self.best(metric, 20)]
            if self.rng.random() < 0.1:
                key = tuple(self.rng.choice(c) for c in self.choices)
            else:
                key = list(self.rng.choice(parents))
                k = min(len(key), 1 + min(3, int(-math.log2(1 - self.rng.random()))))  # 1: 1/2, 2: 1/4, ...
                for i in self.rng.sample(range(len(key)), k):
                    pos = order[i].index(key[i]) + self.rng.choice((-2, -1, 1, 2))
                    key[i] = order[i][min(max(pos, 0), len(order[i]) - 1)]
                key = tuple(key)
            before = self.n
            self.measure(key)
            repeats = repeats + 1 if self.n == before else 0
            if repeats > 10_000:  # everything near the parents is measured already (a tiny space)
                return

    def _polish(self) -> None:
        """A climb from each metric's best plan; what budget is left goes to more random perturbations."""
        self._per_metric(lambda metric: self._climb(metric, self.best(metric)[0].key))
        self._random()
