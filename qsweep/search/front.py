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
    inside ``box``; 0 for a point the front dominates or one outside the box."""
    steps = staircase(front, box)
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    bx, by = float(box[0]), float(box[1])
    # segments [a_j, b_j) of the size axis with the front's covered height h_j above which it dominates
    a = np.concatenate([[-np.inf], steps[:, 0]])
    b = np.concatenate([steps[:, 0], [bx]])
    h = np.concatenate([[by], steps[:, 1]])
    gain = np.zeros(x.shape)
    with np.errstate(invalid="ignore"):  # an infinite candidate (a failed plan's prediction) gains nothing
        for aj, bj, hj in zip(a, b, h, strict=True):
            width = np.clip(np.minimum(bj, bx) - np.maximum(aj, x), 0.0, None)
            height = np.clip(min(hj, by) - y, 0.0, None)
            gain += np.nan_to_num(width * height, nan=0.0, posinf=0.0)
    return gain
