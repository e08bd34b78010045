"""Compression, degradation, the user's fitness, and a paired confidence interval for the degradation.

Fitness (the user's): ``compression - penalty * max(0, degradation)`` with ``compression = baseline bytes / plan
bytes`` and ``degradation = (ppl - base_ppl) / base_ppl``; the seed used penalty 10.

Perplexities measured on a few thousand tokens are noisy in absolute terms, but a plan and its baseline are scored
on the same windows, so their difference is far more precise. ``paired_degradation_ci`` treats windows as the
sampling unit: per-window NLL differences give the standard error of the mean per-token log-perplexity change
(a ratio estimator), mapped through exp to a CI on the relative degradation.
"""

from __future__ import annotations

import math

import torch

from qsweep.evaluate import EvalResult

__all__ = ["compression", "degradation", "fitness", "paired_degradation_ci"]


def compression(baseline_bytes: int, plan_bytes: int) -> float:
    return baseline_bytes / plan_bytes


def degradation(ppl: float, base_ppl: float) -> float:
    return (ppl - base_ppl) / base_ppl


def fitness(compression_ratio: float, degradation_value: float, penalty: float = 10.0) -> float:
    return compression_ratio - penalty * max(0.0, degradation_value)


def paired_degradation_ci(plan: EvalResult, base: EvalResult, z: float = 1.96) -> tuple[float, float]:
    """Approximate ``z``-sigma interval for the plan's relative perplexity degradation vs ``base``."""
    if not (plan.ok and base.ok):
        return (math.nan, math.nan)
    if not torch.equal(plan.window_tokens, base.window_tokens):
        raise ValueError("paired CI needs both results on the same windows (same tokens and protocol)")
    d = (plan.window_nll - base.window_nll).double()  # [n_windows]
    n = plan.window_tokens.double()
    n_windows = d.numel()
    delta = float(d.sum() / n.sum())  # mean per-token log-perplexity change
    if n_windows < 2:
        return (math.exp(delta) - 1, math.exp(delta) - 1)
    resid = d - delta * n
    se = math.sqrt(float((resid**2).sum()) * n_windows / (n_windows - 1)) / float(n.sum())
    return (math.exp(delta - z * se) - 1, math.exp(delta + z * se) - 1)
