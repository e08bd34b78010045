"""Known optima of synthetic problems: brute force, an exact Pareto DP (separable problems), a long reference run.

* :func:`brute_force` scores every plan (``n_formats ** n_units``; up to :data:`BRUTE_FORCE_MAX` plans): the exact
  best fitness and the exact Pareto front, with or without interactions.
* :func:`pareto_dp` is exact for separable problems (no interaction terms): the front of ``(size, sum D)`` is built
  unit by unit, keeping only non-dominated partial sums (a sum dominated after unit k stays dominated, since later
  units add the same options to both), as AutoRound's AutoScheme does; the saturation ``g`` is monotone, so the
  front and the best fitness on it are exact for the true objective. Independent of the HiGHS allocator
  (qsweep.search.allocate), which a test checks against it.
* :func:`reference_run` is for problems with interactions too large to enumerate: the best plan found by a long
  search (the separable relaxation's exact front scored for real, best-improvement local search with one- and
  two-unit moves from its best plans, a large genetic algorithm, and perturbation restarts), plus a front made by
  descending from every separable front point (least delta at no larger size). It is stated as what it is: the
  best found in that many evaluations, not a proven optimum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qsweep.bench.synthetic_problem import Problem
from qsweep.search.front import nondominated_mask

__all__ = [
    "BRUTE_FORCE_MAX",
    "Front",
    "Optimum",
    "brute_force",
    "known_optimum",
    "neighbours",
    "nondominated_mask",
    "pareto_dp",
    "reference_run",
]

BRUTE_FORCE_MAX = 2_000_000


@dataclass(frozen=True)
class Front:
    """Non-dominated plans by (size, delta): sorted by size, delta strictly decreasing."""

    plans: np.ndarray  # [m, n_units] format indices
    size: np.ndarray  # [m] packed bytes
    delta: np.ndarray  # [m] true log-perplexity change


@dataclass(frozen=True)
class Optimum:
    plan: np.ndarray  # [n_units]
    fitness: float
    how: str  # "brute force" | "exact Pareto DP" | "reference run (not proven)"
    evaluations: int
    front: Front


def _front(plans: np.ndarray, size: np.ndarray, delta: np.ndarray) -> Front:
    order, keep = nondominated_mask(size, delta)
    idx = order[keep]
    return Front(plans[idx], size[idx], delta[idx])


def _optimum(p: Problem, front: Front, how: str, evaluations: int) -> Optimum:
    fit = p.fitness_of(front.size, front.delta)
    k = int(np.argmax(fit))
    return Optimum(front.plans[k].copy(), float(fit[k]), how, evaluations, front)


def brute_force(p: Problem, chunk: int = 1 << 16) -> Optimum:
    """Every plan scored (module docstring)."""
    n, F = p.n_plans, len(p.formats)
    if n > BRUTE_FORCE_MAX:
        raise ValueError(f"problem {p.name!r} has {n} plans, more than brute force's {BRUTE_FORCE_MAX}")
    powers = F ** np.arange(p.n_units - 1, -1, -1)
    best: Front | None = None
    for start in range(0, n, chunk):
        codes = np.arange(start, min(n, start + chunk))
        X = (codes[:, None] // powers[None, :]) % F  # [c, n_units]
        part = _front(X, p.sizes(X), p.delta_nll(X))
        if best is not None:
            part = _front(np.concatenate([best.plans, part.plans]), np.concatenate([best.size, part.size]),
                          np.concatenate([best.delta, part.delta]))  # fmt: skip
        best = part
    assert best is not None
    return _optimum(p, best, "brute force", n)


def pareto_dp(p: Problem) -> Optimum:
    """The exact front and best fitness of a separable problem (module docstring)."""
    if not p.separable:
        raise ValueError(f"problem {p.name!r} has interactions: the Pareto DP is exact only without them")
    F = len(p.formats)
    size, add = np.zeros(1, np.int64), np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for u in range(p.n_units):
        s = (size[:, None] + p.size[u][None, :]).ravel()
        a = (add[:, None] + p.delta[u][None, :]).ravel()
        order, keep = nondominated_mask(s, a)
        idx = order[keep]
        back.append((idx // F, idx % F))  # parent, choice
        size, add = s[idx], a[idx]
    plans = np.zeros((len(size), p.n_units), np.int64)
    cur = np.arange(len(size))
    for u in range(p.n_units - 1, -1, -1):
        parent, choice = back[u]
        plans[:, u] = choice[cur]
        cur = parent[cur]
    return _optimum(p, Front(plans, size, p.saturate(add)), "exact Pareto DP", 0)


def neighbours(x: np.ndarray, n_formats: int, pairs: bool = True) -> np.ndarray:
    """Every plan one unit (and, with ``pairs``, two units) away from ``x``. [k, n_units]"""
    U = len(x)
    moves = [(u, f) for u in range(U) for f in range(n_formats) if f != x[u]]
    single = np.repeat(x[None, :], len(moves), axis=0)
    mu = np.array([m[0] for m in moves])
    mf = np.array([m[1] for m in moves])
    single[np.arange(len(moves)), mu] = mf
    if not pairs:
        return single
    i, j = np.triu_indices(len(moves), k=1)
    ok = mu[i] != mu[j]
    i, j = i[ok], j[ok]
    double = single[i].copy()
    double[np.arange(len(i)), mu[j]] = mf[j]
    return np.concatenate([single, double])


class _Counter:
    def __init__(self, p: Problem):
        self.p, self.n = p, 0
        self.archive: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fitness, size, delta) of each row, recorded for the front."""
        self.n += len(X)
        s, d = self.p.sizes(X), self.p.delta_nll(X)
        f = _front(X, s, d)
        self.archive.append((f.plans, f.size, f.delta))
        if len(self.archive) > 64:
            self.compact()
        return self.p.fitness_of(s, d), s, d

    def compact(self) -> Front:
        plans, s, d = (np.concatenate(a) for a in zip(*self.archive, strict=True))
        f = _front(plans, s, d)
        self.archive = [(f.plans, f.size, f.delta)]
        return f


def _climb(
    x: np.ndarray, value: Callable[[np.ndarray], np.ndarray], F: int, cur: float
) -> tuple[np.ndarray, float]:
    """Best-improvement local search on one- and two-unit moves: maximise ``value``."""
    while True:
        N = neighbours(x, F)
        v = value(N)
        k = int(np.argmax(v))
        if v[k] <= cur + 1e-12:
            return x, cur
        x, cur = N[k], float(v[k])


def _ga(
    ev: _Counter, p: Problem, rng: np.random.Generator, starts: np.ndarray, pop: int, gens: int
) -> np.ndarray:
    F, U = len(p.formats), p.n_units
    X = rng.integers(0, F, (pop, U))
    X[: len(starts)] = starts[:pop]
    fit = ev(X)[0]
    for _ in range(gens):
        a = rng.integers(0, pop, (2, pop, 3))  # two tournaments of 3 per child
        pa = X[a[0][np.arange(pop), np.argmax(fit[a[0]], axis=1)]]
        pb = X[a[1][np.arange(pop), np.argmax(fit[a[1]], axis=1)]]
        child = np.where(rng.random((pop, U)) < 0.5, pa, pb)
        mut = rng.random((pop, U)) < 1.5 / U
        child[mut] = rng.integers(0, F, int(mut.sum()))
        cf = ev(child)[0]
        allx, allf = np.concatenate([X, child]), np.concatenate([fit, cf])
        keep = np.argsort(-allf, kind="stable")[:pop]  # (mu + lambda) survival
        X, fit = allx[keep], allf[keep]
    return X[int(np.argmax(fit))]


def reference_run(
    p: Problem,
    seed: int = 0,
    *,
    restarts: int = 30,
    ga_pop: int = 200,
    ga_gens: int = 150,
    front_starts: int = 48,
) -> Optimum:
    """The best plan of a long search, and a reference front (module docstring); not a proven optimum."""
    rng = np.random.default_rng(seed)
    F = len(p.formats)
    ev = _Counter(p)
    fitness = lambda X: ev(X)[0]  # noqa: E731
    relaxed = pareto_dp(p.with_(interactions=())).front.plans
    starts = np.concatenate([relaxed, np.stack([p.uniform(f) for f in range(F)])])
    f0 = fitness(starts)
    best_x, best_f = starts[int(np.argmax(f0))], float(f0.max())
    for k in np.argsort(-f0, kind="stable")[:5]:
        x, f = _climb(starts[k], fitness, F, float(f0[k]))
        if f > best_f:
            best_x, best_f = x, f
    g = _ga(ev, p, rng, np.concatenate([best_x[None, :], starts[np.argsort(-f0, kind="stable")[:20]]]), ga_pop,
            ga_gens)  # fmt: skip
    x, f = _climb(g, fitness, F, float(fitness(g[None, :])[0]))
    if f > best_f:
        best_x, best_f = x, f
    for _ in range(restarts):  # iterated local search: perturb a few units of the best, climb, keep if better
        y = best_x.copy()
        idx = rng.choice(p.n_units, size=min(p.n_units, int(rng.integers(2, 6))), replace=False)
        y[idx] = rng.integers(0, F, len(idx))
        y, f = _climb(y, fitness, F, float(fitness(y[None, :])[0]))
        if f > best_f:
            best_x, best_f = y, f
    # the front: from relaxed front points inside the hypervolume box (up to ``front_starts``, evenly spread),
    # descend to less delta at no larger size
    pts = p.ratio_points(p.sizes(relaxed), p.delta_nll(relaxed))
    inside = np.flatnonzero((pts[:, 0] < 0.5) & (pts[:, 1] < 1.2))
    if len(inside) > front_starts:
        inside = inside[np.unique(np.linspace(0, len(inside) - 1, front_starts).round().astype(int))]
    for x in relaxed[inside]:
        s0 = int(p.sizes(x[None, :])[0])
        cur = -float(p.delta_nll(x[None, :])[0])

        def value(X: np.ndarray, s0: int = s0) -> np.ndarray:
            _, s, d = ev(X)
            return np.where(s <= s0, -d, -np.inf)

        _climb(x, value, F, cur)
    front = ev.compact()
    return Optimum(best_x, best_f, "reference run (not proven)", ev.n, front)


def known_optimum(p: Problem, seed: int = 0) -> Optimum:
    """Brute force when the problem is small, the exact DP when it is separable, else a reference run."""
    if p.n_plans <= BRUTE_FORCE_MAX:
        return brute_force(p)
    if p.separable:
        return pareto_dp(p)
    return reference_run(p, seed)
