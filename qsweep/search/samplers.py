"""Optuna samplers by name (conf/search/*.yaml ``sampler``); unknown names list the valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping

import optuna

__all__ = ["SAMPLERS", "make_sampler"]

SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "nsga2": optuna.samplers.NSGAIISampler,
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "gp": optuna.samplers.GPSampler,
}
_SUPPORTS_CONSTRAINTS = {"nsga2", "tpe", "gp"}


def make_sampler(name: str, seed: int, options: Mapping | None = None, constraints_func=None):
    """Build sampler ``name`` with ``seed`` and its options from the search config."""
    if name not in SAMPLERS:
        close = difflib.get_close_matches(str(name), SAMPLERS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown search.sampler {name!r}{hint}; valid: {', '.join(SAMPLERS)}")
    kwargs = dict(options or {})
    if constraints_func is not None and name in _SUPPORTS_CONSTRAINTS:
        kwargs["constraints_func"] = constraints_func
    try:
        return SAMPLERS[name](seed=seed, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad search.sampler_options for {name}: {e}") from None
