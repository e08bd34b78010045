"""Pareto fronts and hypervolume: the one module that filters non-dominated points and measures fronts.

A plan is the point ``(size ratio, perplexity ratio)`` = ``(plan bytes / baseline bytes, plan ppl / baseline ppl)``,
i.e. ``(1 / compression, 1 + degradation)``; both are minimised. The hypervolume of a set of points is the area of
the region they dominate inside the box bounded by a reference point ``ref``: the union over points ``(x, y)`` of
``[x, ref_x] x [y, ref_y]``. Points outside the box (either coordinate >= the reference's) add nothing, and so do
dominated points, so the measure rewards a front that is both close to the origin and spread along it.

The reference point, :data:`REFERENCE_POINT` = ``(0.5, 1.2)``, is chosen for the user's fitness
``compression - 10 * max(0, degradation)``, so that the box holds the plans worth choosing and little else:

* size ratio 0.5: at least 2x compression. Uniform INT8, which is nearly free on the models measured here (+0.04%
  on the bundled model, fitness about 2), sits just outside (0.503 seed, 0.509 packed accounting on the bundled
  model), so the measure counts what a search adds beyond the plan every user gets for free;
* perplexity ratio 1.2: +20% costs 2 fitness points, as much as INT8's whole gain. On the bundled model's
  ``lowbit`` reference the best fitness beyond +20% is 2.75 (packed) / 3.30 (seed) against 3.62 / 3.97 inside,
  and beyond +50% 0.27 / 0.83.

A wider box mostly measures area that every front covers: with ``(1.0, 1.5)`` the seven uniform plans alone reach
96.5% of the ``lowbit`` reference front's hypervolume (packed accounting), with ``(0.5, 1.2)`` 80%, while the
reference search reaches 99.8% and 98.9% in its first 466 evaluations (uniform plans, single-unit
changes, greedy descent). Pass ``ref`` to use another.

* :func:`pareto_indices`: the non-dominated points of any dimension (the study's (perplexity, size) Pareto set);
* :func:`nondominated` (2-D, sorted by size) and :func:`nondominated_mask` (its numpy form for large arrays);
* :func:`hypervolume`, :func:`hypervolume_ratio` (a benchmark's score: the fraction of a reference front's
  hypervolume a method's front reaches; it can exceed 1 where the method beats the reference somewhere);
* :func:`staircase` and :func:`hypervolume_gain`: how much a new plan would add to a measured front, vectorised
  over candidates. A candidate ``(x, y)`` dominates ``[x, box_x] x [y, box_y]``, and its gain is the part of that
  rectangle the front's staircase does not cover yet. The multi-objective refine step (:mod:`qsweep.search.refine`)
  ranks its moves by this gain, so it fills the front's gaps instead of climbing one point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "REFERENCE_POINT",
    "hypervolume",
    "hypervolume_gain",
    "hypervolume_ratio",
    "nondominated",
    "nondominated_mask",
    "pareto_indices",
    "ratio_point",
    "staircase",
]

REFERENCE_POINT: tuple[float, float] = (0.5, 1.2)  # the default of search.front_box too

Point = tuple[float, float]


def ratio_point(
    size_bytes: float, perplexity: float, baseline_size_bytes: float, baseline_perplexity: float
) -> Point:
    """A plan's point ``(size / baseline size, perplexity / baseline perplexity)``."""
    return (size_bytes / baseline_size_bytes, perplexity / baseline_perplexity)


def _checked(points: Iterable[Sequence[float]]) -> list[Point]:
    out = []
    for p in points:
        if len(p) != 2:
            raise ValueError(f"a point has two coordinates (size ratio, perplexity ratio), got {tuple(p)!r}")
        x, y = float(p[0]), float(p[1])
        if math.isnan(x) or math.isnan(y):
            raise ValueError(f"a point has a NaN coordinate: {(x, y)!r}")
        out.append((x, y))
    return out


def pareto_indices(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (every coordinate minimised); ties: the first of equal points wins."""
    keep = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            no_worse = all(b <= a for a, b in zip(p, q, strict=True))
            if j != i and no_worse and (any(b < a for a, b in zip(p, q, strict=True)) or j < i):
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return keep


def nondominated(points: Iterable[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (<= in both coordinates, < in one), sorted by size ratio.

    Of several identical points only the first is kept. NaN coordinates are an error; infinite ones (a failed
    evaluation) are allowed and are dominated by any finite point of no larger size.
    """
    pts = _checked(points)
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], pts[i][1], i))
    keep: list[int] = []
    best_y = math.inf
    for i in order:
        y = pts[i][1]
        if y < best_y or (not keep and y == best_y):  # strictly better than every smaller point
            keep.append(i)
            best_y = y
    return keep


def nondominated_mask(size: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, keep): ``order`` sorts by (size, delta); ``keep[k]`` is True for the points of ``order`` that no
    other point dominates (the first of equal points kept)."""
    order = np.lexsort((delta, size))
    d = delta[order]
    prev = np.concatenate([[np.inf], np.minimum.accumulate(d)[:-1]])
    return order, d < prev


def hypervolume(points: Iterable[Sequence[float]], ref: Sequence[float] = REFERENCE_POINT) -> float:
    """Area dominated by ``points`` inside the box below ``ref`` (both coordinates minimised); 0 for no point inside.

    A staircase sweep over the non-dominated points sorted by x: each adds ``(next x - x) * (ref_y - y)``.
    """
    rx, ry = float(ref[0]), float(ref[1])
    inside = [(x, y) for x, y in _checked(points) if x < rx and y < ry]
    stairs = [inside[i] for i in nondominated(inside)]
    area = 0.0
    for k, (x, y) in enumerate(stairs):
        next_x = stairs[k + 1][0] if k + 1 < len(stairs) else rx
        area += (next_x - x) * (ry - y)
    return area


def hypervolume_ratio(
    front: Iterable[Sequence[float]],
    reference_front: Iterable[Sequence[float]],
    ref: Sequence[float] = REFERENCE_POINT,
) -> float:
    """``hypervolume(front) / hypervolume(reference_front)`` against the same reference point."""
    denom = hypervolume(reference_front, ref)
    if denom <= 0:
        raise ValueError(f"the reference front has no point inside the reference box {tuple(ref)!r}")
    return hypervolume(front, ref) / denom


def staircase(points: Sequence[Sequence[float]], box: Sequence[float]) -> np.ndarray:
    """The non-dominated points strictly inside ``box``, sorted by size ratio (perplexity ratio decreasing):
    a ``[k, 2]`` array."""
    inside = [(float(x), float(y)) for x, y in points if x < box[0] and y < box[1]]
    return np.array([inside[i] for i in nondominated(inside)], dtype=float).reshape(-1, 2)


def hypervolume_gain(
    front: Sequence[Sequence[float]], x: np.ndarray, y: np.ndarray, box: Sequence[float]
) -> np.ndarray:
    """The hypervolume that adding each point ``(x[i], y[i])`` (any shape, broadcast together) adds to ``front``
    inside ``box``; 0 for a point the front dominates or one outside the box.

    The front's covered height ``h(t)`` is a staircase decreasing along the size axis, so a candidate gains
    ``integral of (h(t) - y)`` from ``t = x`` to where ``h`` first drops to ``y`` or below: two binary searches
    and a cumulative sum per candidate, O(log k) for a front of k points."""
    steps = staircase(front, box)
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    bx, by = float(box[0]), float(box[1])
    xs, ys = steps[:, 0], steps[:, 1]  # x increasing, y decreasing, all inside the box
    heights = np.concatenate([[by], ys])  # h(t) on [-inf, xs[0]), [xs[0], xs[1]), ..., [xs[-1], bx)
    edges = np.concatenate([xs, [bx]])
    # area(t) = integral of h from xs[0] (or bx for an empty front) to t, exact on every segment
    origin = edges[0]
    cum = np.concatenate([[0.0], np.cumsum(ys * np.diff(edges))])  # area at each edge
    ok = (x < bx) & (y < by) & np.isfinite(x) & np.isfinite(y)
    xc, yc = np.where(ok, x, bx), np.where(ok, y, by)

    def area(t: np.ndarray) -> np.ndarray:
        j = np.searchsorted(xs, t, side="right")  # segment index: heights[j] holds on [edges[j-1], edges[j])
        start = np.where(j == 0, origin, edges[np.maximum(j - 1, 0)])
        return np.where(j == 0, 0.0, cum[np.maximum(j - 1, 0)]) + heights[j] * (t - start)

    # the first step at or below y: the region above y ends there (or at the box's edge)
    first_low = np.searchsorted(-ys, -yc, side="left")  # number of steps with ys > y
    upper = np.full(xc.shape, bx)
    if len(xs):
        upper = np.where(first_low < len(xs), xs[np.minimum(first_low, len(xs) - 1)], bx)
    gain = area(upper) - area(np.minimum(xc, upper)) - yc * np.clip(upper - xc, 0.0, None)
    return np.where(ok & (upper > xc), np.clip(gain, 0.0, None), 0.0)
