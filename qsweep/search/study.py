"""Running a study: storage, sampler, objective, resume, and verification of the winners on the held-out split.

Flow: validate the whole config (search settings, precision menu, plans to enqueue) before any storage is touched,
so a config error leaves nothing behind; open or resume the study (SQLite in the run directory by default, any
Optuna storage URL via ``storage.url``); run trials until ``search.n_trials`` are done in total (a plan the study
has already evaluated is answered from its earlier trial, not evaluated again); then re-score the Pareto set
(or the top-k by fitness) on ``eval.report_split`` and write the run's reports (qsweep.report).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import MISSING, DictConfig, OmegaConf
from optuna.trial import TrialState

from qsweep.plan import Plan, PlanError, plan_from_config
from qsweep.search.samplers import make_sampler
from qsweep.search.space import SearchSpace
from qsweep.session import EvalSession, named_plan_spec

__all__ = ["SearchConfig", "StudyRunner", "run_search"]

log = logging.getLogger("qsweep")
_HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5
OBJECTIVES = ("multi", "fitness")
SIZE_METRICS = ("packed", "model")


@dataclass
class SearchConfig:
    name: str = MISSING
    sampler: str = MISSING  # nsga2 | tpe | random | gp
    objective: str = "multi"  # multi: minimise (perplexity, size); fitness: maximise the user's fitness
    n_trials: int = 50
    seed: int = 0
    sampler_options: dict[str, Any] = field(default_factory=dict)
    study_name: str | None = None  # null: derived from model, data, eval, search and seed
    enqueue: list[str] = field(default_factory=list)  # plan names from conf/plan, and/or "uniform"
    size_metric: str = "packed"  # packed: codes + scales (honest); model: the seed's numel x bits / 8
    max_degradation: float | None = None  # perplexity ceiling, relative to the baseline: a constraint
    top_k: int = 5  # single objective: how many of the best trials are re-scored on the report split
    timeout_s: float | None = None


def _search_config(raw) -> SearchConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(SearchConfig), raw)
    s: SearchConfig = OmegaConf.to_object(cfg)
    if s.n_trials <= 0:
        raise ValueError(f"search.n_trials must be > 0, got {s.n_trials}")
    if s.objective not in OBJECTIVES:
        raise ValueError(f"unknown search.objective {s.objective!r}; valid: {', '.join(OBJECTIVES)}")
    if s.size_metric not in SIZE_METRICS:
        raise ValueError(f"unknown search.size_metric {s.size_metric!r}; valid: {', '.join(SIZE_METRICS)}")
    if s.max_degradation is not None and s.max_degradation < 0:
        raise ValueError(f"search.max_degradation must be >= 0, got {s.max_degradation}")
    return s


def _storage_url(cfg: DictConfig, out_dir: Path) -> str:
    url = cfg.storage.url
    return url if url else f"sqlite:///{(out_dir / 'study.db').resolve()}"


def _open_storage(url: str, heartbeat: int | None):
    try:
        if url.startswith(("sqlite", "postgresql", "mysql")):
            kwargs = {}
            if heartbeat:
                kwargs = {
                    "heartbeat_interval": heartbeat,
                    "failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3),
                }
            return optuna.storages.RDBStorage(url, **kwargs)
        return optuna.storages.get_storage(url)
    except Exception as e:  # sqlalchemy/driver errors come in many types; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot open storage.url={url!r} ({type(e).__name__}: {first})") from None


def _done(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that counts towards n_trials: complete, or a plan that failed to evaluate (NaN loss)."""
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs
    )


def _feasible(trial: optuna.trial.FrozenTrial) -> bool:
    values = trial.constraints.values() if _HAS_SET_CONSTRAINT else trial.user_attrs.get("constraint", [])
    return all(v <= 0 for v in values)


class StudyRunner:
    """Holds the session, the space and the study; ``objective`` is what Optuna calls per trial."""

    def __init__(self, cfg: DictConfig, out_dir: Path):
        self.cfg = cfg
        self.out_dir = out_dir
        self.search = _search_config(cfg.search)
        self.session = EvalSession(cfg)
        self.table = self.session.table
        self.space = SearchSpace.from_menu(
            self.table, OmegaConf.to_container(cfg.precision.menu, resolve=True)
        )
        if not self.space.searchable:
            raise PlanError("the precision menu gives every unit a single format: there is nothing to search")
        self.enqueued = self._plans_to_enqueue()
        self.split = cfg.eval.search_split
        self.report_split = cfg.eval.report_split
        self.sampler = make_sampler(
            self.search.sampler,
            self.search.seed,
            self.search.sampler_options,
            None if _HAS_SET_CONSTRAINT else (lambda t: t.user_attrs.get("constraint", [0.0])),
        )
        m = cfg.model
        self.study_name = self.search.study_name or (
            f"{m.name}-{cfg.data.name}-{cfg.eval.name}-{cfg.precision.name}-{self.search.name}-seed{self.search.seed}"
        )
        self.storage_url = _storage_url(cfg, out_dir)
        self._seen: dict[str, optuna.trial.FrozenTrial] = {}

    # -- setup -----------------------------------------------------------------------------------------------------

    def _plans_to_enqueue(self) -> dict[str, Plan]:
        plans: dict[str, Plan] = {}
        for name in self.search.enqueue:
            if name == "uniform":
                plans.update({f"uniform:{f}": p for f, p in self.space.uniform_plans().items()})
                continue
            plan = plan_from_config(named_plan_spec(name), self.table, f"plan {name!r}")
            if self.space.params_of(plan) is None:
                bad = next(u for u, c in self.space.choices.items() if plan[u] not in c)
                raise PlanError(f"search.enqueue: plan {name!r} puts unit {bad!r} in {plan[bad]}, which the precision "
                                f"menu {self.cfg.precision.name!r} does not offer it")  # fmt: skip
            plans[name] = plan
        return plans

    def open_study(self) -> optuna.Study:
        storage = _open_storage(self.storage_url, self.cfg.storage.get("heartbeat_interval"))
        directions = ["minimize", "minimize"] if self.search.objective == "multi" else ["maximize"]
        study = optuna.create_study(
            storage=storage, study_name=self.study_name, sampler=self.sampler, directions=directions,
            load_if_exists=True,
        )  # fmt: skip
        if [d.name.lower() for d in study.directions] != directions:
            raise ValueError(f"study {self.study_name!r} in {self.storage_url} has other objectives; "
                             f"choose another search.study_name")  # fmt: skip
        names = (
            ["perplexity", f"{self.search.size_metric}_size_bytes"] if len(directions) == 2 else ["fitness"]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
        for key, value in {"model": self.cfg.model.name, "data": self.cfg.data.name, "eval": self.cfg.eval.name,
                           "search_split": self.split, "report_split": self.report_split,
                           "precision": self.cfg.precision.name, "size_metric": self.search.size_metric}.items():  # fmt: skip
            study.set_user_attr(key, value)
        existing = {t.user_attrs.get("enqueued_as") for t in study.get_trials(deepcopy=False)}
        for label, plan in self.enqueued.items():
            if label not in existing:
                study.enqueue_trial(
                    self.space.params_of(plan), user_attrs={"enqueued_as": label}, skip_if_exists=True
                )
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            if _done(t) and "plan_digest" in t.user_attrs:
                self._seen.setdefault(t.user_attrs["plan_digest"], t)
        return study

    # -- per trial -------------------------------------------------------------------------------------------------

    def _values(self, attrs: Mapping) -> list[float]:
        if self.search.objective == "multi":
            return [attrs["perplexity"], float(attrs[f"{self.search.size_metric}_size_bytes"])]
        return [attrs["fitness"]]

    def _failed(self):
        """What a plan that cannot be evaluated returns: NaN, which Optuna records as a failed trial."""
        return float("nan") if self.search.objective == "fitness" else (float("nan"), float("nan"))

    def objective(self, trial: optuna.Trial):
        plan = self.space.suggest(trial)
        digest = plan.digest()
        earlier = self._seen.get(digest)
        if earlier is not None:  # answered from the study: no second evaluation of the same plan
            for k, v in earlier.user_attrs.items():
                if k != "enqueued_as":
                    trial.set_user_attr(k, v)
            trial.set_user_attr("duplicate_of", earlier.number)
            self._constrain(trial, earlier.user_attrs)
            return self._failed() if "error" in earlier.user_attrs else self._values(earlier.user_attrs)
        score = self.session.score(plan, self.split)
        metric = self.search.size_metric
        attrs = {
            "plan": plan.to_json(),
            "plan_digest": digest,
            "split": self.split,
            "perplexity": score.perplexity,
            "baseline_perplexity": score.baseline_perplexity,
            "model_size_bytes": score.model_size_bytes,
            "packed_size_bytes": score.packed_size_bytes,
            "compression": score.compression_for(metric),
            "degradation": score.degradation,
            "fitness": score.fitness_for(metric),
            "eval_tokens": score.result.n_tokens,
            "eval_seconds": score.result.seconds,
        }
        if not score.result.ok:
            attrs["error"] = score.result.error
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        self._constrain(trial, attrs)
        self._seen[digest] = trial  # a live Trial also has .number and .user_attrs
        if not score.result.ok:
            log.warning("trial %d: plan %s failed to evaluate: %s", trial.number, digest, score.result.error)
            return self._failed()
        return self._values(attrs)

    def _constrain(self, trial: optuna.Trial, attrs: Mapping) -> None:
        if self.search.max_degradation is None:
            return
        d = attrs.get("degradation")
        value = math.inf if d is None else d - self.search.max_degradation  # <= 0 is feasible
        value = min(value, 1e300)  # a failed plan is infinitely infeasible; stored as a finite JSON number
        if _HAS_SET_CONSTRAINT:
            trial.set_constraint("max_degradation", value)
        else:
            trial.set_user_attr("constraint", [value])

    # -- run -------------------------------------------------------------------------------------------------------

    def optimize(self, study: optuna.Study) -> None:
        def n_done() -> int:
            return sum(_done(t) for t in study.get_trials(deepcopy=False))

        remaining = self.search.n_trials - n_done()
        if remaining <= 0:
            log.info("study %r already has %d trials done (search.n_trials=%d): nothing to run",
                     self.study_name, n_done(), self.search.n_trials)  # fmt: skip
            return

        def stop_at_total(study: optuna.Study, trial) -> None:  # other workers may be adding trials too
            if n_done() >= self.search.n_trials:
                study.stop()

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(
            self.objective, n_trials=remaining, timeout=self.search.timeout_s, callbacks=[stop_at_total],
            show_progress_bar=True, catch=(),
        )  # fmt: skip

    def candidates(self, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        """The Pareto set (multi-objective) or the top-k by fitness, without duplicate plans."""
        if self.search.objective == "multi":
            chosen = study.best_trials  # feasible trials only, when constrained
        else:
            done = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if _feasible(t)]
            chosen = sorted(done, key=lambda t: t.value, reverse=True)
        unique, seen = [], set()
        for t in chosen:
            if t.user_attrs["plan_digest"] not in seen:
                seen.add(t.user_attrs["plan_digest"])
                unique.append(t)
        return unique if self.search.objective == "multi" else unique[: self.search.top_k]


def run_search(cfg: DictConfig, out_dir: Path) -> dict:
    """Run (or resume) the study of ``cfg.search`` and write its reports; returns the summary row."""
    from qsweep.report import write_reports

    runner = StudyRunner(cfg, out_dir)  # validates everything before any storage exists
    dashboard = f"optuna-dashboard {runner.storage_url}"
    log.info("study %r (%s, %s objective, %d trials, seed %d) on split %r; %d plans enqueued; search space: %d "
             "units x up to %d formats", runner.study_name, runner.search.sampler, runner.search.objective,
             runner.search.n_trials, runner.search.seed, runner.split, len(runner.enqueued),
             len(runner.space.searchable), max(len(c) for c in runner.space.choices.values()))  # fmt: skip
    log.info("inspect it live: %s", dashboard)
    study = runner.open_study()
    try:
        runner.optimize(study)
    except KeyboardInterrupt:
        done = sum(_done(t) for t in study.get_trials(deepcopy=False))
        log.warning("interrupted with %d of %d trials done; the study is stored and consistent. Resume with: "
                    "python -m qsweep +search=%s storage.url=%s search.study_name=%s (plus your other overrides)",
                    done, runner.search.n_trials, runner.search.name, runner.storage_url, runner.study_name)  # fmt: skip
        raise
    summary = write_reports(runner, study, out_dir)
    log.info("inspect it: %s", dashboard)
    return summary
