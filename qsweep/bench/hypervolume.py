"""2-D hypervolume of a front of plans, in ratios to the baseline: how much of the size/perplexity plane it covers.

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

``hypervolume_ratio(front, reference_front)`` is the benchmark's score: the fraction of a reference front's
hypervolume (:mod:`qsweep.bench.reference`) that a method's front reaches (it can exceed 1 where the method beats
the reference somewhere).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["REFERENCE_POINT", "hypervolume", "hypervolume_ratio", "nondominated", "ratio_point"]

REFERENCE_POINT: tuple[float, float] = (0.5, 1.2)

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
