"""The study: storage, identity, enqueued plans, and running trials until ``search.n_trials`` evaluations are spent.

* Storage (qsweep.search.storage): an SQLite file ``study.db`` in the run directory by default (one process), a
  journal file (several workers on one host) or PostgreSQL (many hosts), all with heartbeats: the trial of a
  killed worker is failed once its heartbeat is ``storage.grace_period`` seconds old and its plan retried.
* Workers: creating the study, enqueueing plans and starting each trial happen under the storage's lock, so any
  number of workers create and enqueue once and stop when their trials have spent the budget, never more
  (:func:`optimize`: each trial records the share of one evaluation it used and starts with a cap of what is left).
* Identity: what makes two trials comparable (model, data, protocol, precision menu, size metric, baseline,
  penalty) is stored in the study; resuming it with any of these changed is refused, naming the setting.
* Enqueued plans (uniform plans, named plans) are the first trials; one whose trial was interrupted is enqueued
  again on resume, so every reference plan is evaluated.
* URLs are shown with their password hidden (:func:`display_url`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from qsweep import interrupts
from qsweep.errors import ConfigError
from qsweep.plan import Plan, PlanError, named_plan_spec, plan_from_config
from qsweep.search.config import SearchConfig
from qsweep.search.objective import CAP_ATTR, is_done, trial_cost
from qsweep.search.space import SearchSpace
from qsweep.search.storage import display_url, lock_of, open_storage, storage_url
from qsweep.units import UnitTable

__all__ = [
    "WORKER_ATTR",
    "count_done",
    "default_study_name",
    "display_url",
    "enqueue_plans",
    "open_storage",
    "open_study",
    "optimize",
    "reference_plans",
    "spent",
    "storage_url",
    "study_identity",
]

log = logging.getLogger("qsweep")
_IDENTITY_DEFAULTS = {
    "degradation": "perplexity"
}  # identity keys added later, and what older studies ran with
WORKER_ATTR = "qsweep:worker"  # trial system attribute: host:pid of the process that ran (or runs) the trial


def default_study_name(cfg: DictConfig, search: SearchConfig) -> str:
    suffix = "" if search.degradation == "perplexity" else f"-{search.degradation}"
    return (
        search.study_name
        or f"{cfg.model.name}-{cfg.data.name}-{cfg.eval.name}-{cfg.precision.name}-{search.name}-seed{search.seed}"
        f"{suffix}"
    )


def study_identity(
    cfg: DictConfig, search: SearchConfig, context: int, dtype: str | None = None
) -> dict[str, str]:
    """The settings that make trials comparable, as short strings (what a resume must match); ``context`` and
    ``dtype`` as resolved (eval.context null, eval.dtype auto)."""
    m, d, e = cfg.model, cfg.data, cfg.eval
    bundled = str(m.get("path") or "").startswith(str(Path(__file__).resolve().parents[1]))
    menu = json.dumps(OmegaConf.to_container(cfg.precision.menu, resolve=True), sort_keys=True)
    corpus = d.get("path") or d.get("dataset") or d.source
    if not d.get("path") and d.get("dataset"):  # a hub dataset: which subset, and how its rows become text
        corpus = f"{d.dataset}/{d.get('subset')} text_field={d.get('text_field')} joiner={d.get('joiner')!r}"
    return {
        "model": f"{m.name if bundled or not m.get('path') else m.path} ({m.granularity})",
        "data": f"{d.name} ({corpus})",
        "protocol": f"context={context} stride={e.stride or context} max_tokens={e.max_tokens} "
        f"split={e.search_split} dtype={dtype or e.dtype}",
        "menu": f"{cfg.precision.name} ({hashlib.sha256(menu.encode()).hexdigest()[:12]})",
        "size_metric": search.size_metric,
        "degradation": search.degradation,
        "baseline": f"plan={cfg.baseline.plan} perplexity={cfg.baseline.perplexity} "
        f"size_bytes={cfg.baseline.size_bytes} penalty={cfg.penalty}",
    }


def reference_plans(
    names: list[str], space: SearchSpace, table: UnitTable, menu_name: str
) -> dict[str, Plan]:
    """The plans ``search.enqueue`` names (``uniform``: one all-X plan per format on the menu), by label."""
    plans: dict[str, Plan] = {}
    for name in names:
        if name == "uniform":
            plans.update({f"uniform:{f}": p for f, p in space.uniform_plans().items()})
            continue
        plan = plan_from_config(named_plan_spec(name), table, f"plan {name!r}")
        bad = next((u for u, c in space.choices.items() if plan[u] not in c), None)
        if bad is not None:
            raise PlanError(f"search.enqueue: plan {name!r} puts unit {bad!r} in {plan[bad]}, which the precision "
                            f"menu {menu_name!r} does not offer it")  # fmt: skip
        plans[name] = plan
    return plans


def _check_identity(study: optuna.Study, identity: Mapping[str, str], url: str) -> None:
    stored = study.user_attrs.get("identity")
    if stored is None:
        if study.trials:  # a study made by another tool or an older qsweep: nothing to compare with
            log.warning("study %r stores no identity; its trials are assumed comparable", study.study_name)
        study.set_user_attr("identity", dict(identity))
        return
    for key, value in identity.items():
        # a key a study made before it existed holds that key's default
        was = stored.get(key, _IDENTITY_DEFAULTS.get(key))
        if was != value:
            raise ConfigError(
                f"study {study.study_name!r} in {display_url(url)} was run with {key} {was!r}, this "
                f"run has {value!r}: its trials are not comparable; use another search.study_name (or storage.url)"
            )


def open_study(
    *,
    storage,
    url: str,
    name: str,
    sampler: optuna.samplers.BaseSampler,
    directions: list[str],
    metric_names: list[str],
    identity: Mapping[str, str],
    enqueue: Mapping[str, dict],
    attrs: Mapping[str, object] = (),
) -> optuna.Study:
    """Create or resume study ``name``; check its identity; enqueue the reference plans it has not yet done.

    All of it runs under the storage's lock, so workers starting at the same instant create the study and enqueue
    each plan exactly once."""
    with lock_of(storage):
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, directions=directions,
                                    load_if_exists=True)  # fmt: skip
        if [d.name.lower() for d in study.directions] != directions:
            raise ConfigError(f"study {name!r} in {display_url(url)} has other objectives "
                              f"({', '.join(d.name.lower() for d in study.directions)}); use another search.study_name")  # fmt: skip
        _check_identity(study, identity, url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if study.metric_names != metric_names:
                study.set_metric_names(metric_names)
            optuna.storages.fail_stale_trials(
                study
            )  # trials of a killed process: failed and retried once stale
        for key, value in dict(attrs).items():
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
        enqueue_plans(study, enqueue)
    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    if running:
        log.warning("study %r has running trials %s (another worker, or a killed one: retried once its heartbeat "
                    "is storage.grace_period old)", name, running)  # fmt: skip
    return study


def enqueue_plans(
    study: optuna.Study, plans: Mapping[str, dict], attrs: Mapping[str, Mapping] | None = None
) -> int:
    """Enqueue each labelled plan (trial parameters) unless the study has it waiting, running or done; a plan whose
    trial was interrupted is enqueued again. ``attrs`` adds user attributes per label. Returns how many.

    Atomic across worker processes (the storage's lock): each label is enqueued once however many workers ask."""
    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    with lock_of(study._storage):
        have = {
            t.user_attrs.get("enqueued_as")
            for t in study.get_trials(deepcopy=False)
            if t.state in live or is_done(t)
        }
        n = 0
        for label, params in plans.items():
            if label not in have:
                study.enqueue_trial(
                    params, user_attrs={"enqueued_as": label, **dict((attrs or {}).get(label, {}))}
                )
                n += 1
    return n


def count_done(study: optuna.Study) -> int:
    return sum(is_done(t) for t in study.get_trials(deepcopy=False))


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def spent(study: optuna.Study) -> float:
    """What the study's trials have spent, in full evaluations (:func:`~qsweep.search.objective.trial_cost`)."""
    return sum(trial_cost(t) for t in study.get_trials(deepcopy=False))


_EPS = 1e-9
# A sampler that proposes only plans the study has (each answered for free) this many times in a row has converged:
# its phase ends, leaving the rest of the budget to the next phase.
MAX_FREE_TRIALS = 100


def optimize(
    study: optuna.Study,
    objective: Callable,
    budget: float,
    timeout: float | None = None,
    progress: bool = True,
    poll_seconds: float = 1.0,
    params: Mapping | None = None,
    attrs: Mapping | None = None,
    whole: bool = False,
) -> int:
    """Run trials until the study's trials have spent ``budget`` full evaluations in total (all workers together;
    :func:`spent`), never more; returns how many this call ran.

    Each trial starts under the storage's lock, only while the spent budget and the running trials' caps leave at
    least ``objective.min_cost`` (a whole evaluation for an objective without partial evaluations), and with a cap
    (``cost_cap``) of what is left, at most 1: the last trial of a phase is a partial evaluation that stops there
    (unless ``whole``).
    While other workers' trials hold the rest this worker waits (a killed worker's trial becomes stale after
    ``storage.grace_period``; it is then failed, retried and run here). Before each trial an objective with
    ``remember`` learns the plans other workers finished (answered, not re-run). Each trial records the process
    that ran it (system attribute ``qsweep:worker``: host:pid).

    ``params``: run one trial of these parameters (and user ``attrs``), created for this call, not taken from the
    enqueued ones (the refine step's trials); without, each trial is asked from the study (its enqueued plans first,
    then the sampler's); a trial whose label (``attrs["enqueued_as"]``) another worker has already taken is not run
    (0 is returned). ``whole``: start a trial only with a whole evaluation left (a phase that hands the rest of the
    budget to the next, so only the last phase ends on a partial trial). The phase ends early after
    MAX_FREE_TRIALS trials in a row that cost nothing, or once the objective knows every plan (``exhausted``)."""
    min_cost = 1.0 if whole else float(getattr(objective, "min_cost", 1.0))
    if budget - spent(study) < min_cost - _EPS:
        if params is None:
            log.info("study %r has spent %.2f of %.2f evaluations: nothing to run", study.study_name,
                     spent(study), budget)  # fmt: skip
        return 0
    lock, remember = lock_of(study._storage), getattr(objective, "remember", None)
    me = f"{socket.gethostname()}:{os.getpid()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bar = progress_bar(progress, _bar_units(budget), _bar_units(spent(study)), unit="eval")
    start, ran, free, held = time.monotonic(), 0, 0, False
    try:
        with interrupts.deferred():
            while timeout is None or time.monotonic() - start < timeout:
                if params is not None and ran:
                    break
                lock.acquire()
                held = True
                _fail_stale(study)
                trials = study.get_trials(deepcopy=False)
                used = sum(trial_cost(t) for t in trials)
                running = [t for t in trials if t.state == TrialState.RUNNING]
                reserved = sum(float(t.user_attrs.get(CAP_ATTR, 1.0)) for t in running)
                bar(_bar_units(used))
                if budget - used < min_cost - _EPS:
                    break
                left = budget - used - reserved
                if left < min_cost - _EPS:  # the rest is held by trials running elsewhere: wait for them
                    lock.release()
                    held = False
                    with interrupts.allowed():
                        time.sleep(poll_seconds)
                    continue
                label = (attrs or {}).get("enqueued_as")
                if (
                    params is not None
                    and label
                    and any(t.user_attrs.get("enqueued_as") == label for t in trials)
                ):
                    break  # another worker runs (or ran) it
                if remember is not None:
                    remember(trials)
                if getattr(objective, "exhausted", False):
                    log.info("the study knows every plan of the search space: %.2f evaluations left unspent",
                             budget - used)  # fmt: skip
                    break
                trial = _new_trial(study, params, {**dict(attrs or {}), CAP_ATTR: min(1.0, left)})
                lock.release()  # the trial is RUNNING and holds its cap: others may start theirs
                held = False
                before = used
                _run(study, trial, objective, me)
                ran += 1
                free = free + 1 if spent(study) - before < _EPS else 0
                if free >= MAX_FREE_TRIALS:
                    log.info("the sampler proposed only plans the study has, %d times in a row: its phase ends "
                             "with %.2f evaluations left", free, budget - spent(study))  # fmt: skip
                    break
            bar(_bar_units(spent(study)))
    finally:
        if held:
            lock.release()
        bar(None)
    return ran


def _bar_units(evaluations: float) -> int:
    """Progress in whole evaluations (the bar's unit), rounded so that a spent budget shows as full."""
    return math.floor(evaluations + 1e-6)


def _new_trial(study: optuna.Study, params: Mapping | None, attrs: Mapping) -> optuna.Trial:
    """A RUNNING trial: the study's next (an enqueued plan, else the sampler's), or one of ``params``."""
    with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": it is, in _run
        warnings.simplefilter("ignore", UserWarning)
        if params is None:
            trial = study.ask()
        else:
            template = optuna.trial.create_trial(
                state=TrialState.RUNNING, system_attrs={"fixed_params": dict(params)}
            )
            study._thread_local.cached_all_trials = None
            trial = optuna.Trial(
                study, study._storage.create_new_trial(study._study_id, template_trial=template)
            )
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    return trial


def _run(study: optuna.Study, trial: optuna.Trial, objective: Callable, worker: str) -> None:
    """Run ``objective`` on ``trial`` with the storage's heartbeat and tell the study how it ended: complete,
    pruned, or failed (NaN values: a plan that failed to evaluate; an exception, re-raised: an interrupt, a user
    error)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    state, values = None, None
    try:
        with get_heartbeat_thread(trial._trial_id, study._storage):
            trial.storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, worker)
            with interrupts.allowed():
                values = objective(trial)
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    if state is None:
        vals = [values] if not isinstance(values, (list, tuple)) else list(values)
        if any(v is None or math.isnan(v) for v in vals):
            state, values = TrialState.FAIL, None
        else:
            state = TrialState.COMPLETE
    study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)


def progress_bar(
    enabled: bool, total: int, initial: int = 0, unit: str = "trial", desc: str | None = None
) -> Callable[[int | None], None]:
    """``update(done)`` of a progress bar on stderr (``update(None)`` closes it); a no-op when disabled. Every
    phase that can take minutes shows one (trials, sensitivity tables)."""
    if not enabled:
        return lambda done: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True)

    def update(done: int | None) -> None:
        if done is None:
            bar.close()
        elif done != bar.n:
            if done > bar.total:  # work that ends on a whole step past the total (the proxy's last pass)
                bar.total = done
            bar.update(done - bar.n)

    return update
