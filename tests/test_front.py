"""One module for Pareto fronts and hypervolume (issue 17): its filters agree with each other and with brute force."""

from __future__ import annotations

import random

import numpy as np
import pytest

from qsweep.search.front import nondominated, nondominated_mask, pareto_indices, staircase


def _brute(points) -> set[int]:
    """Indices no other point dominates; of equal points the first."""
    return {
        i
        for i, p in enumerate(points)
        if not any(
            q[0] <= p[0] and q[1] <= p[1] and (q != p or j < i) for j, q in enumerate(points) if j != i
        )
    }


@pytest.mark.parametrize("seed", range(10))
def test_the_2d_filters_agree(seed):
    rng = random.Random(seed)
    pts = [(float(rng.randint(0, 5)), float(rng.randint(0, 5))) for _ in range(rng.randint(1, 30))]
    want = _brute(pts)
    assert set(nondominated(pts)) == want
    assert set(pareto_indices(pts)) == want
    order, keep = nondominated_mask(np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    assert [int(i) for i in order[keep]] == nondominated(pts)  # same points, same order (by size)
    box = (4.5, 4.5)
    inside = [p for p in pts if p[0] < box[0] and p[1] < box[1]]
    assert staircase(pts, box).tolist() == [list(inside[i]) for i in nondominated(inside)]


def test_nondominated_is_sorted_by_size():
    pts = [(3.0, 1.0), (1.0, 3.0), (2.0, 2.0), (2.0, 2.5)]
    assert nondominated(pts) == [1, 2, 0]
