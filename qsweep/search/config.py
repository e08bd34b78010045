"""The search settings (``conf/search/*.yaml``, selected with ``+search=NAME``): schema and validation.

The search group is opt-in (``+search=NAME``), so it is not part of the Hydra schema (a ``search: null`` slot would
make ``+search=`` an error); it is validated here instead, before anything is loaded or stored, so a bad setting
leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qsweep.errors import ConfigError, did_you_mean, first_line
from qsweep.score import DEGRADATIONS, SIZE_METRICS

__all__ = ["OBJECTIVES", "SIZE_METRIC_ALIASES", "SearchConfig", "search_config"]

log = logging.getLogger("qsweep")

OBJECTIVES = ("multi", "fitness")
# Deprecated names of a size accounting (qsweep.score.SIZE_METRICS), accepted for one release with a warning: the
# conf comments once called the seed's accounting ``model`` (after its record field ``model_size_bytes``).
SIZE_METRIC_ALIASES = {"model": "seed"}
CRITERIA = ("fitness", "hypervolume")  # what the refine step ranks by (qsweep.search.refine)
SENSITIVITIES = ("proxy", "measured")


@dataclass
class SearchConfig:
    name: str = MISSING
    sampler: str = MISSING  # nsga2 | tpe | random | gp
    objective: str = "multi"  # multi: minimise (perplexity, size); fitness: maximise fitness_<size_metric>
    n_trials: int = 50
    seed: int = 0
    sampler_options: dict[str, Any] = field(default_factory=dict)
    study_name: str | None = None  # null: derived from model, data, eval, precision, search and seed
    enqueue: list[str] = field(default_factory=list)  # plan names from conf/plan, and/or "uniform"
    size_metric: str = "packed"  # packed: codes + scales (honest); seed: numel x bits / 8, no scales
    # what the search calls a plan's loss (qsweep.score.Degradation): perplexity (the user's degradation) or kld
    # (expm1 of the mean KL(baseline || plan) per token: the perplexity increase on the baseline's own text)
    degradation: str = "perplexity"
    # a ceiling on that degradation, relative to the baseline: a constraint
    max_degradation: float | None = None
    top_k: int = 5  # single objective: how many of the best trials are re-scored on the report split
    # the reported plan among the candidates (qsweep.search.select): lcb, the best fitness with the degradation at
    # its 95% upper bound on the search split; fitness, the best point estimate
    select: str = "lcb"
    timeout_s: float | None = None
    # racing (qsweep.search.racing): shares of the search split a candidate is scored on before the whole split, e.g.
    # [0.25, 0.5]; it is dropped once its paired interval (one-sided, racing_confidence) shows it cannot beat the
    # measured plans; [] (default: measured to gain nothing on the bundled model and to lose 1-2% of fitness on a
    # synthetic problem, README "Racing") scores every plan on the whole split
    racing: list[float] = field(default_factory=list)
    racing_confidence: float = 0.99
    # warm start (qsweep.search.warmstart): allocator plans from a sensitivity table go first; its cost, in full
    # evaluations, is taken from n_trials
    warm_start: bool = True
    sensitivity: str = (
        "proxy"  # proxy: one forward+backward pass | measured: one evaluation per (unit, format)
    )
    sensitivity_tokens: int | None = 8192  # how many tokens of the search split the table reads (null: all)
    warm_start_plans: int = 16
    # measured local search at the end (qsweep.search.refine), part of n_trials; null: refine_share of what the
    # enqueued plans leave of the budget (the sampler gets the rest, and whatever refine cannot spend)
    refine_trials: int | None = None
    refine_share: float = 1.0
    # multi objective: the box [size ratio, perplexity ratio] (to the baseline) whose front the refine step fills
    front_box: list[float] = field(default_factory=lambda: [0.5, 1.2])
    # the refine policy (qsweep.search.refine.RefinePolicy): a multi-objective study's criterion per turn, in a
    # cycle (fitness | hypervolume); how many best plans a fitness turn moves from; how many plans of the
    # allocator's front inside front_box a hypervolume turn may jump to
    refine_schedule: list[str] = field(default_factory=lambda: ["fitness", "hypervolume", "hypervolume"])
    refine_incumbents: int = 3
    refine_jumps: int = 64
    # refine's table corrected by every measured plan (qsweep.search.posterior); a move ranked this many posterior
    # standard deviations better than its mean (0: the mean)
    refine_learn: bool = True
    refine_optimism: float = 1.0


def search_config(raw) -> SearchConfig:
    """Merge ``raw`` (cfg.search) into the schema and check every value; errors name the key."""
    if "name" not in raw:  # ``+search.KEY=VALUE`` without ``+search=NAME``: a setting of no search
        from qsweep.config import group_options

        raise ConfigError(f"no search is selected (search.{next(iter(raw), 'KEY')} was set alone): choose one with "
                          f"+search=OPTION ({', '.join(group_options('search'))}) first")  # fmt: skip
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SearchConfig), raw)
        s: SearchConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "key", None)
        if key is not None and "not in" in str(e):  # an unknown key (a typo)
            valid = list(SearchConfig.__dataclass_fields__)
            raise ConfigError(
                f"unknown key search.{key}{did_you_mean(str(key), valid)}; valid keys: {', '.join(valid)}"
            ) from None
        raise ConfigError(f"bad search setting{f' search.{key}' if key else ''}: {first_line(e)}") from None
    if s.n_trials <= 0:
        raise ConfigError(f"search.n_trials must be > 0, got {s.n_trials}")
    if s.objective not in OBJECTIVES:
        raise ConfigError(
            f"unknown search.objective {s.objective!r}{did_you_mean(s.objective, OBJECTIVES)}; "
            f"valid: {', '.join(OBJECTIVES)}"
        )
    if s.size_metric in SIZE_METRIC_ALIASES:
        new = SIZE_METRIC_ALIASES[s.size_metric]
        log.warning("search.size_metric=%s is deprecated; use search.size_metric=%s (the same accounting)",
                    s.size_metric, new)  # fmt: skip
        s.size_metric = new
    if s.size_metric not in SIZE_METRICS:
        raise ConfigError(
            f"unknown search.size_metric {s.size_metric!r}{did_you_mean(s.size_metric, SIZE_METRICS)}; "
            f"valid: {', '.join(SIZE_METRICS)}"
        )
    if s.degradation not in DEGRADATIONS:
        raise ConfigError(
            f"unknown search.degradation {s.degradation!r}{did_you_mean(s.degradation, DEGRADATIONS)}; "
            f"valid: {', '.join(DEGRADATIONS)}"
        )
    if s.max_degradation is not None and s.max_degradation < 0:
        raise ConfigError(f"search.max_degradation must be >= 0, got {s.max_degradation}")
    if s.sensitivity not in SENSITIVITIES:
        raise ConfigError(
            f"unknown search.sensitivity {s.sensitivity!r}{did_you_mean(s.sensitivity, SENSITIVITIES)}; "
            f"valid: {', '.join(SENSITIVITIES)}"
        )
    if s.warm_start_plans < 0 or (s.refine_trials or 0) < 0:
        raise ConfigError(
            f"search.warm_start_plans and search.refine_trials must be >= 0, got {s.warm_start_plans}, "
            f"{s.refine_trials}"
        )
    if len(s.front_box) != 2 or not (0 < s.front_box[0] <= 1 < s.front_box[1]):
        raise ConfigError(
            f"search.front_box must be [max size ratio in (0, 1], max perplexity ratio > 1], got {s.front_box}"
        )
    bad = [c for c in s.refine_schedule if c not in CRITERIA]
    if not s.refine_schedule or bad:
        raise ConfigError(
            f"search.refine_schedule must list criteria of {', '.join(CRITERIA)}, got {s.refine_schedule}"
            f"{did_you_mean(bad[0], CRITERIA) if bad else ''}"
        )
    if s.refine_incumbents < 1 or s.refine_jumps < 0:
        raise ConfigError(
            f"search.refine_incumbents must be >= 1 and search.refine_jumps >= 0, got {s.refine_incumbents}, "
            f"{s.refine_jumps}"
        )
    if not 0 <= s.refine_share <= 1:
        raise ConfigError(f"search.refine_share must be in [0, 1] (the refine step's share of what the enqueued "
                          f"plans leave), got {s.refine_share}")  # fmt: skip
    if not 0 <= s.refine_optimism < math.inf:
        raise ConfigError(f"search.refine_optimism must be a finite number >= 0 (posterior standard deviations; "
                          f"0: rank by the mean), got {s.refine_optimism}")  # fmt: skip
    if s.refine_trials and not s.warm_start:
        raise ConfigError(f"search.refine_trials={s.refine_trials} needs the warm start (its sensitivity table "
                          "steers the refine step): use search.warm_start=true or search.refine_trials=null")  # fmt: skip
    if any(not 0 < r < 1 for r in s.racing) or list(s.racing) != sorted(set(s.racing)):
        raise ConfigError(f"search.racing must list increasing shares of the split in (0, 1), got {list(s.racing)} "
                          "([] turns racing off)")  # fmt: skip
    if not 0.5 < s.racing_confidence < 1:
        raise ConfigError(f"search.racing_confidence must be in (0.5, 1), got {s.racing_confidence}")
    if s.top_k < 1:
        raise ConfigError(f"search.top_k must be >= 1, got {s.top_k}")
    from qsweep.search.select import SELECT_RULES

    if s.select not in SELECT_RULES:
        raise ConfigError(
            f"unknown search.select {s.select!r}{did_you_mean(s.select, SELECT_RULES)}; valid: {', '.join(SELECT_RULES)}"
        )
    from qsweep.search.samplers import make_sampler

    make_sampler(s.sampler, s.seed, s.sampler_options)  # its name and options, before a study is stored
    return s
