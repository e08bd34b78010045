"""Optuna samplers by name (conf/search/*.yaml ``sampler``); unknown names list the valid ones."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import optuna

from qsweep.errors import ConfigError, did_you_mean

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
        raise ConfigError(
            f"unknown search.sampler {name!r}{did_you_mean(name, SAMPLERS)}; valid: {', '.join(SAMPLERS)}"
        )
    kwargs = dict(options or {})
    if constraints_func is not None and name in _SUPPORTS_CONSTRAINTS:
        kwargs["constraints_func"] = constraints_func
    try:
        return SAMPLERS[name](seed=seed, **kwargs)
    except (TypeError, ValueError) as e:  # an unknown option; a value Optuna refuses (population_size=1)
        raise ConfigError(f"bad search.sampler_options for {name}: {e}") from None
