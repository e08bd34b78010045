"""A signal that lands while Optuna creates or records a trial never leaves that trial RUNNING."""

from __future__ import annotations

import contextlib
import os
import signal

import optuna
import pytest
from optuna.trial import TrialState

from qsweep import interrupts
from qsweep.search.study import optimize


class _SignalAt(optuna.samplers.RandomSampler):
    """Sends SIGINT to this process from inside ``study.ask`` (``before_trial``, the trial already stored as
    RUNNING) or ``study.tell`` (``after_trial``, its result not yet stored) of trial ``number``."""

    def __init__(self, hook: str, number: int):
        super().__init__(seed=0)
        self.hook, self.number = hook, number

    def _maybe(self, hook, trial):
        if hook == self.hook and trial.number == self.number:
            os.kill(os.getpid(), signal.SIGINT)

    def before_trial(self, study, trial):
        self._maybe("before", trial)
        super().before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._maybe("after", trial)
        super().after_trial(study, trial, state, values)


def _objective(trial):
    return trial.suggest_float("x", 0, 1)


def _states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


@pytest.mark.parametrize(
    "hook, number, complete",
    [("before", 2, 2), ("after", 2, 3), ("after", 4, 5)],  # after the last trial: raised once the study ends
)
def test_a_signal_during_ask_or_tell_fails_no_trial_and_leaves_none_running(tmp_path, hook, number, complete):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", sampler=_SignalAt(hook, number))
    with interrupts.handling(), pytest.raises(KeyboardInterrupt):
        optimize(study, _objective, budget=5, progress=False)
    states = _states(study)
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.COMPLETE) == complete
    assert states.count(TrialState.FAIL) == len(states) - complete <= 1  # at most the trial it landed in


def test_a_signal_inside_the_objective_fails_that_trial():
    def objective(trial):
        if trial.number == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return _objective(trial)

    study = optuna.create_study()
    with interrupts.handling(), pytest.raises(KeyboardInterrupt):
        optimize(study, objective, budget=5, progress=False)
    assert _states(study) == [TrialState.COMPLETE, TrialState.FAIL]


def test_handlers_are_restored_and_outside_a_study_a_signal_raises_at_once():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with interrupts.handling(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes of the main thread
            pass
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_resume_command_pins_the_study_and_never_prints_a_password():
    import shlex

    from qsweep.app import resume_command

    plain = resume_command(
        ["+search=nsga2", "search.n_trials=8", "hydra.run.dir=/x"], "sqlite:////r/study.db", "s1"
    )
    assert shlex.split(plain) == ["python", "-m", "qsweep", "+search=nsga2", "search.n_trials=8",
                                  "storage.url=sqlite:////r/study.db", "search.study_name=s1"]  # fmt: skip
    url = "postgresql+psycopg2://u:hunter2@db:5432/q"
    secret = resume_command(["+search=nsga2", f"storage.url={url}"], url, "s2")
    assert "hunter2" not in secret
    command, hint = secret.split("  (", 1)
    assert shlex.split(command) == ["python", "-m", "qsweep", "+search=nsga2", "storage=postgres",
                                    "search.study_name=s2"]  # fmt: skip
    assert hint == "with QSWEEP_STORAGE_URL set to postgresql+psycopg2://u:***@db:5432/q, password included)"


def test_a_signal_whose_exception_python_discarded_is_raised_at_the_next_checkpoint():
    """A KeyboardInterrupt raised inside a garbage-collection or weakref callback is printed and dropped by Python;
    the signal is remembered, so the next checkpoint (allowed, deferred's exit, check) raises it, and only once."""

    def swallowed_signal():
        # the handler raises in os.kill, as it would inside a GC callback, where Python discards the exception
        with contextlib.suppress(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)

    with interrupts.handling():
        swallowed_signal()
        with pytest.raises(KeyboardInterrupt), interrupts.deferred(), interrupts.allowed():
            pytest.fail("allowed() should raise the discarded signal first")
        interrupts.check()  # raised once: nothing pending now
        swallowed_signal()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        with interrupts.deferred(), interrupts.allowed():
            pass  # nothing pending
    # a signal that propagated out of the handled block is not raised again by the next one
    with pytest.raises(KeyboardInterrupt), interrupts.handling():
        os.kill(os.getpid(), signal.SIGINT)
    with interrupts.handling():
        interrupts.check()
