"""Warm start: plans from an exact allocator over a sensitivity table, enqueued as a study's first trials.

Black-box samplers over 20-50 categorical dimensions spend their budget relearning what a per-unit measurement
says directly. So a study starts from plans the additive model already rates well: a sensitivity table
(qsweep.search.sensitivity: ``proxy``, one forward+backward pass, or ``measured``, one evaluation per unit and
format) feeds the exact multiple-choice knapsack (qsweep.search.allocate), and the allocator's plans are enqueued
beside the uniform plans. The refine step (qsweep.search.refine) starts from them and corrects the prediction with
measurements; when the sampler has a share of the budget (``search.refine_share`` < 1), NSGA-II takes them as
generation 0 and TPE as startup trials, and its job becomes finding what the additive model misses.

Which allocator plans (``search.warm_start_plans`` of them, labelled ``allocator:<i>``):
  * the plan of best predicted fitness (what a single-objective user wants), and its neighbours on the predicted
    front (one size step smaller and larger: where the additive model is least trusted, the trade-off is closest);
  * the rest spread evenly along the predicted front's size axis (what NSGA-II's front needs).
"""

from __future__ import annotations

import logging

from qsweep.plan import Plan
from qsweep.score import Degradation
from qsweep.search.allocate import EXACT, Allocation, Allocator
from qsweep.search.sensitivity import SensitivityTable
from qsweep.search.space import SearchSpace

__all__ = ["allocator_plans"]

log = logging.getLogger("qsweep")


def allocator_plans(
    table: SensitivityTable,
    space: SearchSpace,
    *,
    size_metric: str,
    baseline_bytes: int,
    penalty: float,
    n_plans: int,
    exclude: set[Plan] = frozenset(),
    allocator: Allocator = EXACT,
) -> dict[str, Allocation]:
    """Up to ``n_plans`` allocator plans by label (module docstring); plans in ``exclude`` (e.g. the uniform plans
    already enqueued) are skipped; ``allocator`` answers the knapsack questions (a benchmark's caches them)."""
    if n_plans <= 0:
        return {}
    sizes = table.unit_sizes(size_metric)
    front = allocator.predicted_front(table, space.choices, sizes, n_points=min(max(4 * n_plans, 24), 64))
    best = allocator.best_predicted_fitness(table, space.choices, sizes, baseline_bytes, penalty)
    chosen: list[Allocation] = [best]
    # the best's neighbours on the front (which predicted_front returns sorted by size)
    smaller = [a for a in front if a.size_bytes < best.size_bytes]
    larger = [a for a in front if a.size_bytes > best.size_bytes]
    chosen += smaller[-1:] + larger[:1]
    # the rest, evenly along the front's size axis
    rest = [a for a in front if a not in chosen]
    k = max(0, n_plans - len(chosen))
    if rest and k:
        picks = (
            [len(rest) // 2] if k == 1 else sorted({round(i * (len(rest) - 1) / (k - 1)) for i in range(k)})
        )
        chosen += [rest[i] for i in picks]
    out: dict[str, Allocation] = {}
    for a in chosen:
        if a.plan in exclude or any(a.plan == b.plan for b in out.values()):
            continue
        out[f"allocator:{len(out)}"] = a
        if len(out) == n_plans:
            break
    log.info("warm start: %d allocator plans from the %s sensitivity table; best predicted %s %.4f "
             "(%d bytes, predicted degradation %+.2f%%)", len(out), table.kind,
             Degradation(table.degradation).fitness_key(size_metric),
             best.fitness(baseline_bytes, penalty), best.size_bytes, 100 * best.predicted_degradation)  # fmt: skip
    return out
