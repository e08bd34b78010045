"""The objective Optuna calls per trial: plan -> score -> trial values, attributes and constraint.

A trial's plan comes from the search space (one categorical parameter per searchable unit); it is scored by a
callable the caller supplies (``EvalSession.score`` on the search split, in the app), and the trial stores the
score's record (qsweep.score) plus the plan as user attributes, so every trial can be re-read without re-deriving
anything from its parameters.

Objectives (``search.objective``):
  * ``multi``: minimise (perplexity, size in ``search.size_metric``): NSGA-II's Pareto front;
  * ``fitness``: maximise ``fitness_<size_metric>``, the user's fitness in that accounting.
A plan that cannot be evaluated (non-finite loss) returns NaN, which Optuna records as a failed trial; its record
(with ``error``) is stored, and it counts towards ``search.n_trials`` (see :func:`is_done`).

Duplicates: a plan the study has already evaluated is answered from that trial's stored record
(``duplicate_of``), never evaluated twice. The cache holds plain :class:`Answer` values, filled from the study's
finished trials when the objective is attached (a resumed study) and from each trial this process finishes.

``search.max_degradation`` is a constraint (``degradation - max_degradation <= 0`` is feasible), stored with
``trial.set_constraint`` (Optuna >= 5) or as the ``constraint`` user attribute read by the sampler's
``constraints_func`` (Optuna 4).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from qsweep.plan import Plan
from qsweep.score import PlanScore, size_key
from qsweep.search.space import SearchSpace

__all__ = ["HAS_SET_CONSTRAINT", "Answer", "Objective", "constraint_of", "is_done", "is_feasible"]

log = logging.getLogger("qsweep")
HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5
_NOT_COPIED = ("enqueued_as", "duplicate_of")  # attributes of the trial itself, not of its plan


def is_done(trial: FrozenTrial) -> bool:
    """A trial that counts towards n_trials: complete, or a plan that failed to evaluate (NaN, ``error`` stored).

    Trials that failed for other reasons (interrupted, a worker killed and its heartbeat gone stale) do not count;
    their plans are retried.
    """
    return "plan_digest" in trial.user_attrs and (
        trial.state == TrialState.COMPLETE
        or (trial.state == TrialState.FAIL and bool(trial.user_attrs.get("error")))
    )


def constraint_of(degradation: float | None, max_degradation: float | None) -> float | None:
    """The constraint value of a plan (<= 0 is feasible); None when unconstrained; a failed plan is infeasible."""
    if max_degradation is None:
        return None
    value = math.inf if degradation is None else degradation - max_degradation
    return min(value, 1e300)  # stored as a finite JSON number


def is_feasible(attrs: Mapping, max_degradation: float | None) -> bool:
    c = constraint_of(attrs.get("degradation"), max_degradation)
    return c is None or c <= 0


@dataclass(frozen=True)
class Answer:
    """What the study already knows about a plan: the trial that evaluated it and its attributes."""

    number: int
    attrs: Mapping


class Objective:
    """``objective(trial)``: suggest a plan, score it (or answer it from the study), store its record."""

    def __init__(
        self,
        space: SearchSpace,
        score: Callable[[Plan], PlanScore],
        *,
        kind: str,
        size_metric: str,
        max_degradation: float | None = None,
    ):
        self.space = space
        self.score = score
        self.kind = kind
        self.size_metric = size_metric
        self.max_degradation = max_degradation
        self._answers: dict[str, Answer] = {}
        self.n_evaluated = 0  # plans this process scored (not answered from the study)

    # -- what Optuna needs to know -------------------------------------------------------------------------------

    @property
    def directions(self) -> list[str]:
        return ["minimize", "minimize"] if self.kind == "multi" else ["maximize"]

    @property
    def metric_names(self) -> list[str]:
        if self.kind == "multi":
            return ["perplexity", size_key(self.size_metric)]
        return [f"fitness_{self.size_metric}"]

    def values(self, attrs: Mapping) -> list[float]:
        """The objective values of a stored record (NaN for a plan that failed to evaluate)."""
        if attrs.get("error") or attrs.get("perplexity") is None:
            return [math.nan] * len(self.directions)
        if self.kind == "multi":
            return [float(attrs["perplexity"]), float(attrs[size_key(self.size_metric)])]
        return [float(attrs[f"fitness_{self.size_metric}"])]

    def sampler_constraints(self, trial: FrozenTrial) -> list[float]:
        """``constraints_func`` for Optuna 4 samplers (Optuna 5 reads ``trial.set_constraint``)."""
        return trial.user_attrs.get("constraint", [0.0])

    # -- the duplicate cache -------------------------------------------------------------------------------------

    def remember(self, trials: Iterable[FrozenTrial]) -> None:
        """Learn the plans of a study's finished trials (the first trial of each plan wins)."""
        for t in trials:
            if is_done(t) and "duplicate_of" not in t.user_attrs:
                self._answers.setdefault(t.user_attrs["plan_digest"], Answer(t.number, dict(t.user_attrs)))

    def answer(self, plan: Plan) -> Answer | None:
        return self._answers.get(plan.digest())

    # -- per trial -----------------------------------------------------------------------------------------------

    def __call__(self, trial: optuna.Trial):
        plan = self.space.suggest(trial)
        earlier = self.answer(plan)
        if earlier is not None:
            attrs = {k: v for k, v in earlier.attrs.items() if k not in _NOT_COPIED}
            attrs["duplicate_of"] = earlier.number
        else:
            score = self.score(plan)
            self.n_evaluated += 1
            attrs = {**score.record(), "plan": plan.to_json()}
            if not score.result.ok:
                log.warning("trial %d: plan %s failed to evaluate: %s", trial.number, attrs["plan_digest"],
                            score.result.error)  # fmt: skip
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        self._constrain(trial, attrs)
        if earlier is None:
            self._answers[attrs["plan_digest"]] = Answer(trial.number, attrs)
        values = self.values(attrs)
        return values[0] if len(values) == 1 else values

    def _constrain(self, trial: optuna.Trial, attrs: Mapping) -> None:
        value = constraint_of(attrs.get("degradation"), self.max_degradation)
        if value is None:
            return
        if HAS_SET_CONSTRAINT:
            trial.set_constraint("max_degradation", value)
        else:
            trial.set_user_attr("constraint", [value])
