"""The objective Optuna calls per trial: plan -> score -> trial values, attributes and constraint.

A trial's plan comes from the search space (one categorical parameter per searchable unit); it is scored by a
callable the caller supplies (``EvalSession.score`` on the search split, in the app), and the trial stores the
score's record (qsweep.score) plus the plan as user attributes, so every trial can be re-read without re-deriving
anything from its parameters.

Objectives (``search.objective``), with the degradation of ``search.degradation`` (qsweep.score.Degradation):
  * ``multi``: minimise (perplexity, size in ``search.size_metric``): NSGA-II's Pareto front; with
    ``degradation=kld``, (``kld_mean``, size);
  * ``fitness``: maximise ``fitness_<size_metric>``, the user's fitness in that accounting (``fitness_kld_<metric>``
    with ``degradation=kld``).
A plan that cannot be evaluated (non-finite loss) returns NaN, which Optuna records as a failed trial; its record
(with ``error``) is stored, and it counts towards ``search.n_trials`` (see :func:`is_done`).

Duplicates: a plan the study has already evaluated is answered from that trial's stored record
(``duplicate_of``), never evaluated twice. The cache holds plain :class:`Answer` values, filled from the study's
finished trials when the objective is attached (a resumed study) and from each trial this process finishes.

Cost and racing: a trial records ``cost_evals``, the share of one full evaluation of the search split it used (0
for a duplicate), which is what a study's budget counts (qsweep.search.study). With ``windows`` (the search split's
evaluator, or anything with ``n_windows`` and ``windows_within(share)``) a plan can be scored on part of the split:
``race`` scores it in stages and drops it once it cannot beat the study's measured plans (qsweep.search.racing),
and a trial started with less than one evaluation of budget left (its ``cost_cap``) stops there (``PRUNED``, with
``pruned`` saying why). Without ``windows`` every evaluation is whole and costs 1.

``search.max_degradation`` is a constraint on that degradation (``degradation - max_degradation <= 0`` is
feasible), stored with
``trial.set_constraint`` (Optuna >= 5) or as the ``constraint`` user attribute read by the sampler's
``constraints_func`` (Optuna 4).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from qsweep.metrics import fitness
from qsweep.plan import Plan
from qsweep.score import PERPLEXITY, Degradation, PlanScore, size_key
from qsweep.search.front import pareto_indices
from qsweep.search.racing import Incumbent, Race, verdict
from qsweep.search.space import SearchSpace

__all__ = [
    "CAP_ATTR",
    "COST_ATTR",
    "HAS_SET_CONSTRAINT",
    "WINDOWS_ATTR",
    "Answer",
    "Objective",
    "constraint_of",
    "is_done",
    "is_feasible",
    "trial_cost",
]

log = logging.getLogger("qsweep")
HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5
_NOT_COPIED = ("enqueued_as", "duplicate_of", "cost_cap")  # attributes of the trial itself, not of its plan
# user attributes: the share of one full evaluation a trial used; the most it may use (what the budget had left
# when it started); system attribute: a fully evaluated plan's loss per window (racing's pairs: NLL, or KL with
# search.degradation=kld)
COST_ATTR, CAP_ATTR, WINDOWS_ATTR = "cost_evals", "cost_cap", "qsweep:window_nll"
BUDGET_CUT = "budget:"  # how the ``pruned`` attribute of a trial the budget cut short begins


def _cut_by_budget(attrs: Mapping) -> bool:
    return str(attrs.get("pruned") or "").startswith(BUDGET_CUT)


def is_done(trial: FrozenTrial) -> bool:
    """A trial that counts towards the budget: complete, dropped by racing or the budget (``PRUNED``), or a plan
    that failed to evaluate (NaN, ``error`` stored).

    Trials that failed for other reasons (interrupted, a worker killed and its heartbeat gone stale) do not count;
    their plans are retried.
    """
    return "plan_digest" in trial.user_attrs and (
        trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (trial.state == TrialState.FAIL and bool(trial.user_attrs.get("error")))
    )


def trial_cost(trial: FrozenTrial) -> float:
    """What a trial spent of the budget, in full evaluations: its ``cost_evals`` (1 for a trial of a study that
    predates it, or of another objective), 0 for a trial that failed without a stored plan error (retried)."""
    finished = trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
    if finished or (trial.state == TrialState.FAIL and trial.user_attrs.get("error")):
        return float(trial.user_attrs.get(COST_ATTR, 1.0))
    return 0.0


def constraint_of(degradation: float | None, max_degradation: float | None) -> float | None:
    """The constraint value of a plan (<= 0 is feasible); None when unconstrained; a failed plan is infeasible."""
    if max_degradation is None:
        return None
    value = math.inf if degradation is None else degradation - max_degradation
    return min(value, 1e300)  # stored as a finite JSON number


def is_feasible(attrs: Mapping, max_degradation: float | None, degradation: Degradation = PERPLEXITY) -> bool:
    c = constraint_of(degradation.value(attrs), max_degradation)
    return c is None or c <= 0


@dataclass(frozen=True)
class Answer:
    """What the study already knows about a plan: the trial that evaluated it, its attributes, whether racing or
    the budget dropped it (``pruned``) and, for a full evaluation, its loss per window (racing's pairs)."""

    number: int
    attrs: Mapping
    pruned: bool = False
    window_nll: torch.Tensor | None = None


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
        windows=None,
        race: Race | None = None,
        penalty: float = 10.0,
        full_labels: Collection[str] = (),
        degradation: Degradation = PERPLEXITY,
    ):
        self.space = space
        self.degradation = degradation
        self.score = score
        self.kind = kind
        self.size_metric = size_metric
        self.max_degradation = max_degradation
        self.windows = windows  # None: whole evaluations only (``score(plan)``), each costing 1
        self.race = race if windows is not None else None
        self.penalty = penalty
        self.full_labels = frozenset(full_labels)  # trials never raced (the reference plans)
        self._answers: dict[str, Answer] = {}
        self.n_evaluated = 0  # plans this process scored (not answered from the study)

    @property
    def exhausted(self) -> bool:
        """Whether the study knows every plan of the space (every further trial would be a free duplicate)."""
        return len(self._answers) >= self.space.size

    @property
    def min_cost(self) -> float:
        """The least a trial can spend (one window's share, or a whole evaluation): a budget with less left is
        spent."""
        if self.windows is None:
            return 1.0
        w = self.windows
        return float(w.window_tokens[0]) / w.n_tokens

    # -- what Optuna needs to know -------------------------------------------------------------------------------

    @property
    def directions(self) -> list[str]:
        return ["minimize", "minimize"] if self.kind == "multi" else ["maximize"]

    @property
    def metric_names(self) -> list[str]:
        if self.kind == "multi":
            return [self.degradation.objective_key, size_key(self.size_metric)]
        return [self.degradation.fitness_key(self.size_metric)]

    def values(self, attrs: Mapping) -> list[float]:
        """The objective values of a stored record (NaN for a plan that failed to evaluate)."""
        keys = self.metric_names
        if attrs.get("error") or attrs.get("perplexity") is None or attrs.get(keys[0]) is None:
            return [math.nan] * len(self.directions)
        return [float(attrs[k]) for k in keys]

    def sampler_constraints(self, trial: FrozenTrial) -> list[float]:
        """``constraints_func`` for Optuna 4 samplers (Optuna 5 reads ``trial.set_constraint``)."""
        return trial.user_attrs.get("constraint", [0.0])

    # -- the duplicate cache -------------------------------------------------------------------------------------

    def remember(self, trials: Iterable[FrozenTrial]) -> None:
        """Learn the plans of a study's finished trials (the first trial of each plan wins)."""
        for t in trials:
            if is_done(t) and "duplicate_of" not in t.user_attrs and not _cut_by_budget(t.user_attrs):
                digest = t.user_attrs["plan_digest"]
                if digest not in self._answers:
                    windows = t.system_attrs.get(WINDOWS_ATTR)
                    self._answers[digest] = Answer(
                        t.number, dict(t.user_attrs), t.state == TrialState.PRUNED,
                        None if windows is None else torch.tensor(windows, dtype=torch.float64),
                    )  # fmt: skip

    def answer(self, plan: Plan) -> Answer | None:
        return self._answers.get(plan.digest())

    # -- per trial -----------------------------------------------------------------------------------------------

    def __call__(self, trial: optuna.Trial):
        plan = self.space.suggest(trial)
        earlier = self.answer(plan)
        why = None
        if earlier is not None:
            attrs = {k: v for k, v in earlier.attrs.items() if k not in _NOT_COPIED}
            attrs.update(duplicate_of=earlier.number, **{COST_ATTR: 0.0})
            why = attrs.get("pruned") if earlier.pruned else None
            windows = None
        else:
            cap = float(trial.user_attrs.get(CAP_ATTR, 1.0))
            raced = trial.user_attrs.get("enqueued_as", "") not in self.full_labels
            score, why = self._scored(plan, cap, raced)
            self.n_evaluated += 1
            attrs = {**score.record(), "plan": plan.to_json(), COST_ATTR: score.result.share}
            if why is not None:
                attrs["pruned"] = why
            if not score.result.ok:
                log.warning("trial %d: plan %s failed to evaluate: %s", trial.number, attrs["plan_digest"],
                            score.result.error)  # fmt: skip
            windows = (
                self.degradation.window_losses(score.result) if why is None and score.result.ok else None
            )
            if windows is not None and self.windows is not None:
                trial.storage.set_trial_system_attr(trial._trial_id, WINDOWS_ATTR, windows.tolist())
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        self._constrain(trial, attrs)
        if earlier is None and not _cut_by_budget(attrs):  # a plan the budget cut short may be proposed again
            self._answers[attrs["plan_digest"]] = Answer(trial.number, attrs, why is not None, windows)
        if why is not None:
            raise optuna.TrialPruned(why)
        values = self.values(attrs)
        return values[0] if len(values) == 1 else values

    def _scored(self, plan: Plan, cap: float, raced: bool) -> tuple[PlanScore, str | None]:
        """``plan``'s score, in the race's stages while it may still win, and on at most ``cap`` of the split;
        with why it stopped short of the whole split (None: it did not)."""
        if self.windows is None:
            return self.score(plan), None
        n = self.windows.n_windows
        stops = self.race.stops(n, self.windows.windows_within) if self.race is not None and raced else [n]
        limit = n if cap >= 1.0 - 1e-9 else max(1, self.windows.windows_within(cap))
        score = None
        for stop in stops:
            stop = min(stop, limit)
            if score is not None and stop <= len(score.result.window_nll):
                break
            score = self.score(plan, stop=stop, resume=score)
            if not score.result.ok or stop == n:
                return score, None
            if self.race is not None and raced:
                why = verdict(score.record(), self.degradation.window_losses(score.result),
                              score.result.window_tokens, self._incumbents(), kind=self.kind,
                              size_metric=self.size_metric, penalty=self.penalty,
                              z=self.race.z_at(len(score.result.window_nll)), max_degradation=self.max_degradation,
                              degradation=self.degradation)  # fmt: skip
                if why is not None:
                    return score, f"racing: {why} after {score.result.share:.0%} of the split"
        return score, f"{BUDGET_CUT} {cap:.3f} evaluations were left"

    def _incumbents(self) -> list[Incumbent]:
        """The fully measured plans with windows a candidate is raced against: the feasible front (multi) or all
        feasible plans (fitness; racing takes the best)."""
        key, deg = size_key(self.size_metric), self.degradation
        out = []
        for a in self._answers.values():
            r = a.attrs
            if a.pruned or a.window_nll is None or deg.value(r) is None:
                continue
            if not is_feasible(r, self.max_degradation, deg):
                continue
            fit = fitness(r[f"compression_{self.size_metric}"], deg.value(r), self.penalty)
            out.append(Incumbent(a.number, a.window_nll, deg.delta(r), r[key], fit))
        if self.kind == "multi" and out:
            keep = pareto_indices([(math.exp(j.delta_nll), j.size_bytes) for j in out])
            out = [out[i] for i in keep]
        return out

    def _constrain(self, trial: optuna.Trial, attrs: Mapping) -> None:
        value = constraint_of(self.degradation.value(attrs), self.max_degradation)
        if value is None:
            return
        if HAS_SET_CONSTRAINT:
            trial.set_constraint("max_degradation", value)
        else:
            trial.set_user_attr("constraint", [value])
