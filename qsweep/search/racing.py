"""Racing: a candidate is scored on growing shares of the search split and dropped as soon as its paired interval
shows it cannot beat what the study has already measured.

A plan's evaluation is a sum over windows, so scoring it on the split's first windows is a partial evaluation
(:meth:`qsweep.evaluate.Evaluator.evaluate` with ``stop``), and extending it later costs only the windows added.
After each stage (``search.racing``: shares of the split, e.g. ``[0.25, 0.5]``, then the whole split) the candidate
``c`` is compared with fully measured plans ``j`` *on the same windows*: with ``x_w`` the NLL difference of ``c``
and ``j`` summed over window ``w`` and ``n_w`` its scored tokens, the per-token gap ``m = sum(x) / sum(n)`` and its
standard error ``se`` (the ratio estimator of :func:`qsweep.metrics.paired_delta`) bound ``c``'s full-split
log-perplexity change from below by ``delta_j + m - t * se`` (``t``: the one-sided Student-t quantile of
``search.racing_confidence`` with k - 1 degrees of freedom, k windows). Pairing against ``j`` rather than the baseline removes most of the window-to-window
spread, since two quantized plans find the same windows hard. With ``search.degradation=kld`` the same holds of
the per-window KL sums and ``delta_j`` is ``kld_mean`` (qsweep.score.Degradation). The candidate is dropped (an Optuna ``PRUNED``
trial, its partial record kept) when, even at that bound,

* ``objective=fitness``: its fitness is below the best measured fitness (``j`` is that plan);
* ``objective=multi``: it is dominated, i.e. some plan ``j`` of the measured front is no larger and has a lower
  perplexity (the bound's gap is above 0);
* ``max_degradation``: its degradation (paired with the baseline) is above the ceiling.

What the confidence does not cover: a candidate is tested at each stage and, in the multi-objective study, against
each front member no larger than it, with no correction for the repeated tests; and a stage is the split's first
windows, neighbours in the text rather than a random sample, so its spread may understate the whole split's. Both
make a wrong drop likelier than ``1 - confidence`` says; a wrong drop loses a plan, never budget.

A stage needs ``MIN_WINDOWS`` windows (an interval from fewer is not worth trusting); the reference plans
(``search.enqueue``: the uniform plans a study reports against) are never raced. Each trial records the share of
one full evaluation it used (``cost_evals``), which is what the study's budget counts (qsweep.search.study).

Why racing and not Optuna's pruners: a pruner compares a trial's intermediate *values* with other trials' at the
same step; here the question is paired (the same windows of two plans), has a known noise level, and must work for
the multi-objective study (Optuna's ``trial.report`` is single-objective only). Why not successive halving in
refine only: every phase (allocator plans, sampler trials, refine) proposes plans that lose, and racing saves on
all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from qsweep.metrics import fitness, paired_delta
from qsweep.score import PERPLEXITY, Degradation

__all__ = ["MIN_WINDOWS", "Incumbent", "Race", "verdict"]

MIN_WINDOWS = 8  # windows a stage needs before its interval may drop a candidate


@dataclass(frozen=True)
class Race:
    """The stages (shares of the split before the full evaluation) and the confidence of a drop."""

    stages: tuple[float, ...] = (0.25, 0.5)
    confidence: float = 0.99

    def z_at(self, k: int) -> float:
        """The one-sided Student-t quantile of ``confidence`` with ``k - 1`` degrees of freedom (``k`` windows)."""
        from scipy.special import stdtrit

        return float(stdtrit(max(1, k - 1), self.confidence))

    def stops(self, n_windows: int, windows_within) -> list[int]:
        """The window counts of the stages (``windows_within(share)``), increasing, each with at least
        MIN_WINDOWS windows, then all ``n_windows``."""
        out: list[int] = []
        for share in self.stages:
            k = windows_within(share)
            if MIN_WINDOWS <= k < n_windows and (not out or k > out[-1]):
                out.append(k)
        return [*out, n_windows]


@dataclass(frozen=True)
class Incumbent:
    """A fully measured plan a candidate may be compared with: its per-window loss (NLL, or KL), full-split change
    vs the baseline in nats (qsweep.score.Degradation.delta: ``log1p(degradation)``, or ``kld_mean``), size and
    fitness."""

    trial: int
    window_nll: torch.Tensor
    delta_nll: float
    size_bytes: int
    fitness: float


def verdict(
    partial: Mapping,
    window_nll: torch.Tensor,
    window_tokens: torch.Tensor,
    incumbents: Sequence[Incumbent],
    *,
    kind: str,
    size_metric: str,
    penalty: float,
    z: float,
    max_degradation: float | None = None,
    degradation: Degradation = PERPLEXITY,
) -> str | None:
    """Why the candidate of partial record ``partial`` (its loss per window on the first windows, ``window_nll``:
    NLL, or KL with ``degradation`` kld) cannot beat ``incumbents`` (module docstring), or None while it still may."""
    k = len(window_nll)
    if k < MIN_WINDOWS:
        return None
    bottom = degradation.bound(partial, "low")
    if max_degradation is not None and bottom is not None:
        low = _one_sided_low(degradation.delta(partial), math.log1p(bottom), z)
        if low > max_degradation:
            return f"degradation >= {low:.4f} > search.max_degradation={max_degradation}"
    size = partial["packed_size_bytes" if size_metric == "packed" else "model_size_bytes"]
    compression = partial[f"compression_{size_metric}"]
    if kind == "fitness":
        best = max(incumbents, key=lambda j: j.fitness, default=None)
        if best is None:
            return None
        gap, se = paired_delta(window_nll, best.window_nll[:k], window_tokens)
        low = best.delta_nll + gap - z * se
        high_fitness = fitness(compression, math.expm1(low), penalty)
        if high_fitness < best.fitness:
            return f"fitness <= {high_fitness:.4f} < {best.fitness:.4f} of trial {best.trial}"
        return None
    for j in incumbents:
        if j.size_bytes > size:
            continue
        gap, se = paired_delta(window_nll, j.window_nll[:k], window_tokens)
        if gap - z * se > 0:
            what = "mean KL" if degradation.kld else "log-perplexity"
            return f"dominated by trial {j.trial} (no larger, {what} lower by >= {gap - z * se:.4f})"
    return None


def _one_sided_low(delta: float, low: float, z: float) -> float:
    """The degradation's one-sided lower bound at ``z`` from ``delta`` and the low end ``low`` of its two-sided 95%
    interval, both in nats (the half-width rescaled from 1.96 to ``z``)."""
    return math.expm1(delta - (delta - low) * z / 1.959964)
