"""Study storages and the lock that makes a study's shared steps atomic across worker processes.

Three backends (conf/storage/), picked by the shape of ``storage.url``:

* ``sqlite:///FILE`` (default: study.db in the run directory): one process. SQLite has no row locks (two workers
  pop the same enqueued trial) and fails concurrent writers with "database is locked", so a second process on
  the same file is refused with one line naming the journal and postgres storages.
* a file path (``storage=journal``): Optuna's JournalStorage on a file, several processes on one host, no server.
  Optuna gives journals no heartbeats; :class:`HeartbeatJournalStorage` adds them (a trial system attribute).
  An existing file that is not a journal (an SQLite database named without ``sqlite:///``, any other file) is
  refused untouched: the journal would append its records to it.
* ``postgresql://...`` (``storage=postgres``): many workers on many machines.

Every storage has a :class:`StudyLock` (:func:`lock_of`): a PostgreSQL advisory lock, a ``flock`` on a file next
to the journal, or a process-local lock for SQLite. qsweep.search.study takes it to create a study and enqueue its
plans exactly once, and to start each trial (so the trials started never exceed ``search.n_trials``). On
PostgreSQL the schema is also created under it (concurrent ``CREATE TABLE`` fails with a duplicate-key error).

Passwords never leave this module: every URL shown goes through :func:`display_url`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import optuna
from omegaconf import DictConfig
from optuna.storages import BaseStorage, _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

from qsweep.errors import ConfigError, first_line

__all__ = [
    "HeartbeatJournalStorage",
    "StudyLock",
    "display_url",
    "is_journal",
    "lock_of",
    "open_storage",
    "storage_url",
]

_OPTUNA_TABLES = {"studies", "trials", "version_info"}
_PG_LOCK_KEY = 0x7173_7765_6570  # "qsweep": one advisory lock per database
_BEAT = "qsweep:heartbeat"
_LOCKS: weakref.WeakKeyDictionary[BaseStorage, StudyLock] = weakref.WeakKeyDictionary()
_SQLITE_HELD: dict[str, int] = {}  # SQLite files this process holds (path -> fd of the flocked lock file)
_ALTERNATIVES = "use storage=journal (several workers on one host) or storage=postgres (many hosts)"


def is_journal(url: str) -> bool:
    """A URL without a scheme is a journal file path (as optuna-dashboard reads it)."""
    return "://" not in url


def storage_url(cfg: DictConfig, out_dir: Path) -> str:
    """``storage.url``, or the run directory's SQLite file; a journal path is made absolute."""
    url, worker = cfg.storage.url, cfg.get("worker", 0)
    if worker < 0:
        raise ConfigError(f"worker must be >= 0, got {worker}")
    if url is None:
        if cfg.get("worker", 0):
            raise ConfigError(
                f"worker={cfg.worker} with the default storage (an SQLite file in each run directory): the "
                f"workers would each run their own study; {_ALTERNATIVES}"
            )
        return f"sqlite:///{(out_dir / 'study.db').resolve()}"
    return str(Path(url).expanduser().resolve()) if is_journal(url) else url


def _sqlite_path(url: str) -> str | None:
    """The file of an ``sqlite:///FILE`` URL; None for other URLs and in-memory databases."""
    path = url.removeprefix("sqlite:///")
    return None if path == url or path in ("", ":memory:") else path


def is_new_storage_file(url: str) -> bool:
    """Whether ``url`` names an SQLite or journal file that does not exist yet (so no study is stored in it)."""
    path = _sqlite_path(url) or (url if is_journal(url) else None)
    return path is not None and not Path(path).exists()


def display_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: what logs, errors and results may show."""
    if is_journal(url):
        return url
    try:
        from sqlalchemy.engine import make_url

        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: show only the scheme
        return url.split("://", 1)[0] + "://***"
    return re.sub(r"([?&]password=)[^&]+", r"\1***", shown, flags=re.IGNORECASE)  # a libpq query parameter


class StudyLock:
    """A lock held by one process at a time, re-entrant within the process (``with lock:`` nests)."""

    def __init__(self, acquire: Callable[[], Callable[[], None]] | None = None) -> None:
        self._acquire = acquire  # takes the cross-process lock, returns its release; None: process-local only
        self._local = threading.RLock()
        self._depth = 0
        self._release: Callable[[], None] | None = None

    def acquire(self) -> None:
        self._local.acquire()
        if self._depth == 0 and self._acquire is not None:
            try:
                self._release = self._acquire()
            except BaseException:
                self._local.release()
                raise
        self._depth += 1

    def release(self) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._release is not None:
                release, self._release = self._release, None
                release()
        finally:
            self._local.release()

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_of(storage: BaseStorage) -> StudyLock:
    """The lock of ``storage`` (or of the storage a ``_CachedStorage`` wraps); process-local for others."""
    backend = storage
    if storage not in _LOCKS and isinstance(storage, _CachedStorage):  # optuna wraps an RDBStorage in it
        backend = storage._backend
    if backend not in _LOCKS:
        _LOCKS[backend] = StudyLock()
    return _LOCKS[backend]


def _pg_lock(url: str, connect_args: dict) -> StudyLock:
    """A PostgreSQL session-level advisory lock on its own connection (freed by the server if the worker dies)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args=connect_args, pool_size=1, pool_pre_ping=True,
                                      isolation_level="AUTOCOMMIT")  # fmt: skip

    def acquire() -> Callable[[], None]:
        con = engine.connect()
        try:
            con.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
        except BaseException:
            con.close()
            raise

        def release() -> None:
            try:
                con.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
            finally:
                con.close()

        return release

    return StudyLock(acquire)


def _file_lock(path: Path) -> StudyLock:
    """An exclusive ``flock`` on ``path`` (created if missing): processes of one host."""

    def acquire() -> Callable[[], None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)

        def release() -> None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

        return release

    return StudyLock(acquire)


def _check_sqlite_file(url: str, path: str) -> None:
    """Refuse an existing SQLite file that holds another application's tables (we would add ours to it)."""
    if not Path(path).is_file() or Path(path).stat().st_size == 0:
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


def _hold_sqlite(url: str, path: str) -> None:
    """Hold ``path``'s lock file for the life of this process; refuse when another process holds it."""
    key = str(Path(path).resolve())
    if key in _SQLITE_HELD:
        return
    fd = os.open(key + ".qsweep-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"storage.url={url!r} is in use by another qsweep process; SQLite is not safe for concurrent "
            f"workers: {_ALTERNATIVES}"
        ) from None
    _SQLITE_HELD[key] = fd


class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage with heartbeats: a running trial's heartbeat is a trial system attribute (wall
    clock of the host, so one host: what journal files are for), and a trial whose last heartbeat (or start) is
    ``grace_period`` old is failed by the next worker and handed to ``callback`` (retried)."""

    def __init__(self, backend, heartbeat_interval: int | None, grace_period: int | None = None,
                 callback: Callable | None = None) -> None:  # fmt: skip
        super().__init__(backend)
        self._interval, self._grace, self._callback = heartbeat_interval, grace_period, callback

    def record_heartbeat(self, trial_id: int) -> None:
        # the trial may have been failed (stale) by another worker meanwhile: nothing to record then
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, KeyError):
            self.set_trial_system_attr(trial_id, _BEAT, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self._grace or 2 * (self._interval or 0)
        now = time.time()
        return [
            t._trial_id
            for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            if now - max(float(t.system_attrs.get(_BEAT, 0.0)), t.datetime_start.timestamp()) > grace
        ]

    def get_heartbeat_interval(self) -> int | None:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> Callable | None:
        return self._callback


def _retry_callback():
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
    return (retry or optuna.storages.RetryFailedTrialCallback)(max_retry=3)


def _driver_hint(url: str, e: ModuleNotFoundError) -> str:
    hints = {
        "psycopg2": "pip install 'qsweep[postgres]'",
        "psycopg": "pip install 'psycopg[binary]', or write postgresql+psycopg2:// and pip install 'qsweep[postgres]'",
    }
    return f"the database driver {e.name!r} is not installed ({hints.get(e.name, f'pip install {e.name}')})"


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 connect_timeout: int = 10):  # fmt: skip
    """An Optuna storage for ``url`` with heartbeats (stale trials failed and retried up to 3 times) and its
    :class:`StudyLock` (:func:`lock_of`). Bad URLs, credentials, hosts and drivers are one-line ConfigErrors."""
    shown = display_url(url)
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna: warnings per process
            warnings.simplefilter("ignore")
            beat: dict = {}
            if heartbeat_interval:
                beat = {"heartbeat_interval": int(heartbeat_interval), "grace_period": grace_period}
            if is_journal(url):
                return _open_journal(url, beat)
            if url.startswith("sqlite"):
                path = _sqlite_path(url)
                if path is not None:
                    _check_sqlite_file(url, path)
                    _hold_sqlite(url, path)
                lock, engine_kwargs = StudyLock(), {}
            elif url.startswith("postgres"):
                engine_kwargs = {"connect_args": {"connect_timeout": connect_timeout}, "pool_pre_ping": True}
                lock = _pg_lock(url, engine_kwargs["connect_args"])
            else:  # MySQL and others: no cross-process lock here (see README "Distributed sweeps")
                lock, engine_kwargs = StudyLock(), {}
            if beat:
                beat["heartbeat_stale_trial_callback"] = _retry_callback()
            with lock:  # workers starting together create the schema one at a time
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **beat)
            _LOCKS[storage] = lock
            return storage
    except ConfigError:
        raise
    except ModuleNotFoundError as e:
        raise ConfigError(f"cannot open storage.url={shown!r}: {_driver_hint(url, e)}") from None
    except Exception as e:  # sqlalchemy/driver errors come in many types; all mean the same to the user
        message = first_line(e).replace(url, shown)
        password = _password(url)
        if password:
            message = message.replace(password, "***")
        raise ConfigError(f"cannot open storage.url={shown!r} ({message})") from None


def _open_journal(path: str, beat: dict) -> HeartbeatJournalStorage:
    from optuna.storages.journal import JournalFileBackend

    file = Path(path)
    if file.is_dir():
        raise ConfigError(
            f"storage.url={path!r} is a directory; a journal storage is a file (e.g. study.journal)"
        )
    file.parent.mkdir(parents=True, exist_ok=True)
    lock = _file_lock(file.with_name(file.name + ".qsweep-lock"))
    with lock:  # a worker creating the journal writes its first record under this lock (open_study)
        _check_journal_file(file)
    storage = HeartbeatJournalStorage(JournalFileBackend(str(file)), beat.get("heartbeat_interval"),
                                      beat.get("grace_period"), _retry_callback() if beat else None)  # fmt: skip
    _LOCKS[storage] = lock
    return storage


def _check_journal_file(file: Path) -> None:
    """Refuse an existing, non-empty file whose first line is not an Optuna journal record."""
    if not file.is_file() or file.stat().st_size == 0:
        return
    with file.open("rb") as f:
        head = f.readline(1 << 20)
    if head.startswith(b"SQLite format 3\0"):
        raise ConfigError(
            f"storage.url={str(file)!r} is an SQLite database, not a journal file: for an SQLite study write "
            f"storage.url=sqlite:///{file}"
        )
    try:
        record = json.loads(head) if head.endswith(b"\n") else None
    except ValueError:  # malformed JSON, or not UTF-8
        record = None
    if not (isinstance(record, dict) and "op_code" in record):
        raise ConfigError(
            f"storage.url={str(file)!r} exists and is not an Optuna journal file (the journal would append to "
            f"it; the file is left untouched): point storage.url at a new file or an existing journal"
        )


# a password in a URL: user:PASSWORD@ (not a ${...} interpolation, which Hydra saves unresolved) or ?password=
_URL_PASSWORD = re.compile(r"://[^/@:\s,]*:(?!\$\{)[^@/\s,]+@|[?&]password=(?!\$\{)[^&\s,]+", re.IGNORECASE)


def _masked(m: re.Match) -> str:
    """A :data:`_URL_PASSWORD` match with the password as ``***`` (``://user:***@``, ``?password=***``)."""
    text = m.group(0)
    if text.startswith("://"):
        return text[: text.index(":", 3) + 1] + "***@"
    return text.split("=", 1)[0] + "=***"


def refuse_passwords_in_overrides(overrides) -> None:
    """A ``storage.url=...`` override holding a password (``user:PASSWORD@``, ``?password=``; in any value of a
    sweep or ``choice(...)``) is refused (:class:`ConfigError`, one line) before Hydra saves the overrides in the
    run directory (``.hydra/overrides.yaml``, ``config.yaml``, ``hydra.yaml``, mode 0644) and while it is still only
    in the process list: the line says to pass it in ``QSWEEP_STORAGE_URL``, which the saved config holds as
    ``${oc.env:QSWEEP_STORAGE_URL}``, unresolved (as it holds a ``${oc.env:...}`` password inside a URL)."""
    for o in overrides:
        key, sep, value = o.lstrip("+~").partition("=")
        if sep and key.strip() == "storage.url" and _URL_PASSWORD.search(value):
            shown = _URL_PASSWORD.sub(_masked, value)
            raise ConfigError(
                f"storage.url={shown.strip(chr(39) + chr(34))!r} holds a password, which Hydra would save in the "
                f"run directory (.hydra/*.yaml); export QSWEEP_STORAGE_URL='...' (this URL) and pass "
                f"storage=postgres instead"
            )


def _password(url: str) -> str | None:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password
    except Exception:
        return None
