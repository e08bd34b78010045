"""The study: storage, identity, enqueued plans, and running trials until ``search.n_trials`` are done in total.

* Storage: an SQLite file ``study.db`` in the run directory by default, or any Optuna storage URL
  (``storage.url``). RDB storages (SQLite included) run with heartbeats (``storage.heartbeat_interval``), so the
  trial of a killed process is failed once its heartbeat is ``storage.grace_period`` seconds old and its plan is
  retried. An existing SQLite file that is not an Optuna study store is refused, never written into.
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
import sqlite3
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from qsweep import interrupts
from qsweep.errors import ConfigError, first_line
from qsweep.plan import Plan, PlanError, named_plan_spec, plan_from_config
from qsweep.search.config import SearchConfig
from qsweep.search.objective import is_done
from qsweep.search.space import SearchSpace
from qsweep.units import UnitTable

__all__ = [
    "count_done",
    "default_study_name",
    "display_url",
    "enqueue_plans",
    "open_storage",
    "open_study",
    "optimize",
    "reference_plans",
    "storage_url",
    "study_identity",
]

log = logging.getLogger("qsweep")
_OPTUNA_TABLES = {"studies", "trials", "version_info"}


def default_study_name(cfg: DictConfig, search: SearchConfig) -> str:
    return (
        search.study_name
        or f"{cfg.model.name}-{cfg.data.name}-{cfg.eval.name}-{cfg.precision.name}-{search.name}-seed{search.seed}"
    )


def study_identity(cfg: DictConfig, search: SearchConfig, context: int) -> dict[str, str]:
    """The settings that make trials comparable, as short strings (what a resume must match)."""
    m, d, e = cfg.model, cfg.data, cfg.eval
    bundled = str(m.get("path") or "").startswith(str(Path(__file__).resolve().parents[1]))
    menu = json.dumps(OmegaConf.to_container(cfg.precision.menu, resolve=True), sort_keys=True)
    return {
        "model": f"{m.name if bundled or not m.get('path') else m.path} ({m.granularity})",
        "data": f"{d.name} ({d.get('path') or d.get('dataset') or d.source})",
        "protocol": f"context={context} stride={e.stride or context} max_tokens={e.max_tokens} "
        f"split={e.search_split} dtype={e.dtype}",
        "menu": f"{cfg.precision.name} ({hashlib.sha256(menu.encode()).hexdigest()[:12]})",
        "size_metric": search.size_metric,
        "baseline": f"plan={cfg.baseline.plan} perplexity={cfg.baseline.perplexity} "
        f"size_bytes={cfg.baseline.size_bytes} penalty={cfg.penalty}",
    }


def storage_url(cfg: DictConfig, out_dir: Path) -> str:
    return cfg.storage.url or f"sqlite:///{(out_dir / 'study.db').resolve()}"


def display_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: what logs, errors and results may show."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL (a journal file path, say): nothing to hide
        return url


def _check_sqlite_file(url: str) -> None:
    """Refuse an existing SQLite file that holds another application's tables (we would add ours to it)."""
    path = url.removeprefix("sqlite:///")
    if path == url or path in ("", ":memory:") or not Path(path).is_file() or Path(path).stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"storage.url={url!r}: the file is not an SQLite database ({e})") from None
    if tables and not tables >= _OPTUNA_TABLES:
        raise ConfigError(
            f"storage.url={url!r} is an SQLite database of another application (tables: "
            f"{', '.join(sorted(tables)[:5])}); point storage.url at a new file or an Optuna study database"
        )


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """An Optuna storage for ``url``; RDB storages get heartbeats, and stale trials are retried (up to 3 times)."""
    try:
        if url.startswith("sqlite"):
            _check_sqlite_file(url)
        if not url.startswith(("sqlite", "postgresql", "mysql")):
            return optuna.storages.get_storage(url)
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna: warnings per process
            warnings.simplefilter("ignore")
            kwargs: dict = {}
            if heartbeat_interval:
                retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
                kwargs = {"heartbeat_interval": int(heartbeat_interval), "grace_period": grace_period}
                if retry is not None:
                    kwargs["heartbeat_stale_trial_callback"] = retry(max_retry=3)
                else:  # Optuna < 4.9
                    kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=3)
            return optuna.storages.RDBStorage(url, **kwargs)
    except ConfigError:
        raise
    except Exception as e:  # sqlalchemy/driver errors come in many types; all mean the same to the user
        shown = display_url(url)
        raise ConfigError(
            f"cannot open storage.url={shown!r} ({first_line(e).replace(url, shown)})"
        ) from None


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
        if stored.get(key) != value:
            raise ConfigError(
                f"study {study.study_name!r} in {display_url(url)} was run with {key} {stored.get(key)!r}, this "
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
    """Create or resume study ``name``; check its identity; enqueue the reference plans it has not yet done."""
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, directions=directions,
                                load_if_exists=True)  # fmt: skip
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study {name!r} in {display_url(url)} has other objectives "
                          f"({', '.join(d.name.lower() for d in study.directions)}); use another search.study_name")  # fmt: skip
    _check_identity(study, identity, url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metric_names)
        optuna.storages.fail_stale_trials(study)  # trials of a killed process: failed and retried once stale
    for key, value in dict(attrs).items():
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
    trial was interrupted is enqueued again. ``attrs`` adds user attributes per label. Returns how many."""
    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
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


class _QuietInterrupt(logging.Filter):
    """Optuna logs an interrupted trial with its traceback, then "failed with value None"; the app says one line
    instead. Attached to the logger that emits them, so no handler (Optuna's, Hydra's) sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is KeyboardInterrupt:
            self.interrupted = True
            return False
        return not (self.interrupted and "failed with value None" in record.getMessage())


def optimize(
    study: optuna.Study,
    objective: Callable,
    n_trials: int,
    timeout: float | None = None,
    progress: bool = True,
) -> int:
    """Run trials until ``n_trials`` are done in total (all workers together); returns how many this call ran."""
    remaining = n_trials - count_done(study)
    if remaining <= 0:
        log.info("study %r already has %d trials done (search.n_trials=%d): nothing to run",
                 study.study_name, count_done(study), n_trials)  # fmt: skip
        return 0

    def stop_at_total(study: optuna.Study, trial) -> None:  # other workers may be adding trials too
        if count_done(study) >= n_trials:
            study.stop()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet, emitter = _QuietInterrupt(), logging.getLogger("optuna.study._optimize")
    emitter.addFilter(quiet)
    before = len(study.get_trials(deepcopy=False))

    def run(trial):  # an interrupt lands in here (the trial is failed, retried on resume), never in ask/tell
        with interrupts.allowed():
            return objective(trial)

    try:
        with interrupts.deferred():
            study.optimize(run, n_trials=remaining, timeout=timeout, callbacks=[stop_at_total],
                           show_progress_bar=progress, catch=())  # fmt: skip
    finally:
        emitter.removeFilter(quiet)
    return len(study.get_trials(deepcopy=False)) - before
