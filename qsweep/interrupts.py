"""Ctrl-C and ``kill`` that never leave a trial RUNNING.

:func:`handling` turns SIGINT and SIGTERM into ``KeyboardInterrupt``. Raised at an arbitrary point, that exception
can land while Optuna creates a trial (``study.ask``) or records its result (``study.tell``), outside the
``try`` that marks an interrupted trial FAIL: the trial then stays RUNNING in the storage and, on resume, counts
as another worker's until its heartbeat goes stale. So inside :func:`deferred` (around the trial loop of
``qsweep.search.study.optimize``) a signal is only remembered; it is raised inside :func:`allowed` (around the
objective, where the loop fails the trial and re-raises) or, if the study ends first, when :func:`deferred` exits.

Outside :func:`deferred` the signal raises at once, but it is remembered too: a ``KeyboardInterrupt`` raised while
Python runs a garbage-collection or weakref callback (SQLAlchemy registers some) is printed as "Exception ignored"
and discarded, and the run would go on as if nothing had been pressed. A remembered signal is raised again at the
next :func:`allowed`, :func:`deferred` exit or :func:`check` (between phases); one that propagated is forgotten
where it is handled (:func:`deferred`, :func:`handling`).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"deferring": False, "pending": False}


def _on_signal(signum, frame) -> None:
    _state["pending"] = True  # also when raised now: the exception may be discarded (module docstring)
    if not _state["deferring"]:
        raise KeyboardInterrupt


def _raise_pending() -> None:
    if _state["pending"]:
        _state["pending"] = False
        raise KeyboardInterrupt


def check() -> None:
    """Raise a signal that arrived and was not raised yet, or was raised and discarded (between phases)."""
    if not _state["deferring"]:
        _raise_pending()


@contextmanager
def handling() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` (also in a background job, where SIGINT arrives ignored)."""
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        _state["pending"] = False  # this one is being handled
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.update(deferring=False, pending=False)


@contextmanager
def deferred() -> Iterator[None]:
    """A signal arriving in here is raised at the next :func:`allowed` or when this block exits."""
    outer = _state["deferring"]
    _state["deferring"] = True
    try:
        yield
    except BaseException:
        _state["pending"] = False  # already unwinding: one interrupt is enough
        raise
    finally:
        _state["deferring"] = outer
    if not outer:
        _raise_pending()


@contextmanager
def allowed() -> Iterator[None]:
    """Inside :func:`deferred`: a signal (pending or new) raises here."""
    outer = _state["deferring"]
    _state["deferring"] = False
    try:
        _raise_pending()
        yield
    finally:
        _state["deferring"] = outer
