"""How much a new plan would add to a measured front: exclusive hypervolume gain, vectorised over candidates.

A plan is the point ``(size ratio, perplexity ratio)`` to the baseline, both minimised (as in
:mod:`qsweep.bench.hypervolume`, whose reference point the default ``search.front_box`` matches). The front's dominated region
inside the box below ``box`` is a staircase; a candidate ``(x, y)`` dominates ``[x, box_x] x [y, box_y]``, and its
gain is the part of that rectangle the staircase does not cover yet. The multi-objective refine step
(:mod:`qsweep.search.refine`) ranks its moves by this gain, so it fills the front's gaps instead of climbing one
point.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["hypervolume_gain", "staircase"]


def staircase(points: Sequence[Sequence[float]], box: Sequence[float]) -> np.ndarray:
    """The non-dominated points strictly inside ``box``, sorted by size ratio (perplexity ratio decreasing):
    a ``[k, 2]`` array."""
    pts = sorted((float(x), float(y)) for x, y in points if x < box[0] and y < box[1])
    out: list[tuple[float, float]] = []
    for x, y in pts:
        if not out or y < out[-1][1]:
            out.append((x, y))
    return np.array(out, dtype=float).reshape(-1, 2)


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
