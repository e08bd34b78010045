"""Compression, degradation, the user's fitness, and a paired confidence interval for the degradation.

Fitness (the user's): ``compression - penalty * max(0, degradation)`` with ``compression = baseline bytes / plan
bytes`` and ``degradation = (ppl - base_ppl) / base_ppl``; the seed used penalty 10.

Perplexities measured on a few thousand tokens are noisy in absolute terms, but a plan and its baseline are scored
on the same windows, so their difference is far more precise. ``paired_degradation_ci`` treats windows as the
sampling unit (see its docstring); with fewer than two windows there is no spread to estimate and no interval.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qsweep.evaluate import EvalResult

__all__ = ["compression", "degradation", "fitness", "mean_interval", "paired_degradation_ci", "paired_delta"]


def compression(baseline_bytes: int, plan_bytes: int) -> float:
    return baseline_bytes / plan_bytes


def degradation(ppl: float, base_ppl: float) -> float:
    return (ppl - base_ppl) / base_ppl


def fitness(compression_ratio, degradation_value, penalty: float = 10.0):
    """The user's fitness, the one place it is written: ``compression - penalty * max(0, degradation)``.

    Floats give a float (``max``, so a NaN degradation counts as 0, as it always has); numpy arrays (0-d included)
    broadcast through ``np.maximum`` and torch tensors through ``clamp``, both of which keep a NaN. Every module
    (search, allocator, refine, benchmarks) calls this, so their numbers agree to the last bit.
    """
    if isinstance(degradation_value, torch.Tensor):
        return compression_ratio - penalty * degradation_value.clamp(min=0)
    if isinstance(degradation_value, np.ndarray) or isinstance(compression_ratio, np.ndarray):
        return compression_ratio - penalty * np.maximum(0.0, degradation_value)
    return compression_ratio - penalty * max(0.0, degradation_value)


def paired_delta(nll: torch.Tensor, ref_nll: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    """The mean per-token NLL difference of two evaluations on the same windows and its standard error: with
    ``d_i`` the per-window NLL difference and ``n_i`` the scored tokens of window i (k windows, N tokens), the ratio
    estimator ``delta = sum(d_i) / N`` and ``se = sqrt(k / (k - 1) * sum(z_i^2)) / N`` from the window residuals
    ``z_i = d_i - delta * n_i`` (the delta method for a ratio of means; se is inf with fewer than 2 windows)."""
    d = (nll - ref_nll).double()
    n = tokens.double()
    k, total = d.numel(), float(n.sum())
    delta = float(d.sum()) / total
    if k < 2:
        return delta, math.inf
    z = d - delta * n
    return delta, math.sqrt(float((z**2).sum()) * k / (k - 1)) / total


def paired_degradation_ci(
    plan: EvalResult, base: EvalResult, level: float = 0.95
) -> tuple[float, float] | None:
    """A ``level`` confidence interval for the plan's relative perplexity degradation vs ``base``, or None.

    Both results must come from the same windows. With ``d_i`` the per-window NLL difference (plan - base) and
    ``n_i`` the scored tokens of window i (k windows, N tokens), the mean per-token log-perplexity change is the
    ratio estimator ``delta = sum(d_i) / N`` (exactly ``log(ppl / base_ppl)``). Its standard error comes from the
    spread of the window residuals ``z_i = d_i - delta * n_i`` (the delta method for a ratio of means):
    ``se = sqrt(k / (k - 1) * sum(z_i^2)) / N``. The interval ``delta +/- t * se``, with ``t`` the two-sided
    Student-t quantile of ``k - 1`` degrees of freedom, is mapped through ``exp(.) - 1`` onto the relative
    degradation, so it contains the point estimate but is not symmetric about it. Windows are treated as
    independent draws from the evaluated text, which they are not quite (neighbouring windows share a document;
    overlapping windows share context), and the interval says nothing about a different corpus.

    None when either evaluation failed or there are fewer than 2 windows (one window has no spread).
    """
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if not torch.equal(plan.window_tokens, base.window_tokens):
        raise ValueError("paired CI needs both results on the same windows (same tokens and protocol)")
    if not (plan.ok and base.ok):
        return None
    bounds = mean_interval(plan.window_nll - base.window_nll, plan.window_tokens, level)
    return None if bounds is None else (math.expm1(bounds[0]), math.expm1(bounds[1]))


def mean_interval(
    window_sums: torch.Tensor, window_tokens: torch.Tensor, level: float = 0.95
) -> tuple[float, float] | None:
    """A two-sided ``level`` Student-t interval of the per-token mean ``sum(x) / sum(n)`` of per-window sums ``x``
    (``n``: each window's tokens), windows as the sampling unit (the ratio estimator of :func:`paired_delta`, with
    ``k - 1`` degrees of freedom); None with fewer than 2 windows. :func:`paired_degradation_ci` takes it of the
    NLL differences; a record's KL interval (``kld_ci95_*``) of the KL sums."""
    k = window_tokens.numel()
    if k < 2:
        return None
    delta, se = paired_delta(window_sums, torch.zeros_like(window_sums), window_tokens)
    # stdtrit is the Student-t inverse CDF behind scipy.stats.t.ppf; imported here because scipy.stats alone
    # costs about a second at import time and most imports of qsweep never compute an interval.
    from scipy.special import stdtrit

    half = float(stdtrit(k - 1, 0.5 + level / 2)) * se
    return (delta - half, delta + half)
