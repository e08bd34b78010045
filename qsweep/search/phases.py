"""A study built and run: :func:`build_study` (objective + sampler + study + enqueued reference plans) and its
phases (warm start, sampler, refine), the one way the app, the benchmarks and the tests run a search.

The budget, ``search.n_trials``, is in full evaluations of the search split; every phase spends from it:

sensitivity table (stored in the study; a resume reuses it)   its cost, counted by work
allocator plans enqueued (qsweep.search.warmstart)            generation 0 / startup trials of the sampler
sampler trials (Optuna)                                       until what refine keeps (search.refine_trials; null:
                                                              search.refine_share of what the enqueued plans
                                                              leave: by default all of it)
refine trials (qsweep.search.refine)                          measured local search until the budget is spent

Trials racing drops (qsweep.search.racing) cost the share of the split they used, so the rest goes to more trials.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import optuna

from qsweep.errors import ConfigError
from qsweep.plan import Plan
from qsweep.score import PERPLEXITY, Degradation, PlanScore, size_key
from qsweep.search.allocate import EXACT, Allocator, predicted_delta_nll
from qsweep.search.config import SearchConfig
from qsweep.search.objective import HAS_SET_CONSTRAINT, Objective
from qsweep.search.protocol import SearchSession, SensitivitySession
from qsweep.search.racing import Race
from qsweep.search.refine import Measured, RefinePolicy
from qsweep.search.samplers import make_sampler
from qsweep.search.select import Candidate, evaluated_trials, source_of
from qsweep.search.sensitivity import SensitivityTable, measured_table, proxy_table
from qsweep.search.space import SearchSpace
from qsweep.search.study import enqueue_plans, optimize, progress_bar, spent
from qsweep.search.warmstart import allocator_plans

__all__ = [
    "StudyRun",
    "build_study",
    "expired",
    "in_memory_study",
    "interactions",
    "new_sensitivity",
    "run_phases",
    "stored_or_new_sensitivity",
]

log = logging.getLogger("qsweep")


def new_sensitivity(
    session: SensitivitySession,
    space: SearchSpace,
    kind: str,
    split: str,
    tokens: int | None = None,
    full_eval_seconds: float | None = None,
    progress: bool = True,
    degradation: str = "perplexity",
) -> SensitivityTable:
    """A sensitivity table of ``kind`` on ``split``; the proxy reads the first ``tokens`` of it (None: all).
    ``progress``: a bar on stderr (rows of the measured table, tokens of the proxy's passes); ``degradation``:
    what its rows measure (qsweep.score.Degradation)."""
    full = full_eval_seconds or session.baseline(split).seconds
    log.info("warm start: %s sensitivity of %d units on %r (search.sensitivity%s)", kind, len(space.searchable),
             split, ", KL" if degradation == "kld" else "")  # fmt: skip
    ev = session.evaluator(split)
    with session.out_of_memory_is_an_error(f"the {kind} sensitivity table (search.sensitivity)"):
        if kind == "proxy":
            share = 1.0 if not tokens else min(1.0, tokens / ev.n_tokens)
            bar = progress_bar(
                progress, min(tokens or ev.n_tokens, ev.n_tokens), unit="token", desc="sensitivity"
            )
            try:
                table = proxy_table(session, space, split, full_eval_seconds=full, max_tokens=tokens,
                                    max_batches=max(1, math.ceil(share * ev.n_batches)), progress=bar,
                                    degradation=degradation)  # fmt: skip
            finally:
                bar(None)
        else:
            rows = sum(len(space.choices[u]) - 1 for u in space.searchable)
            bar, done = progress_bar(progress, rows, unit="row", desc="sensitivity"), [0]

            def row(unit: str, fmt: str, delta: float) -> None:
                done[0] += 1
                bar(done[0])

            try:
                table = measured_table(session, space, split, max_tokens=tokens, progress=row,
                                       degradation=degradation)  # fmt: skip
            finally:
                bar(None)
    log.info("warm start: %s sensitivity took %.1f s (%.1f full evaluations)", kind, table.seconds,
             table.cost_evals)  # fmt: skip
    return table


def stored_or_new_sensitivity(
    study: optuna.Study,
    session: SensitivitySession,
    space: SearchSpace,
    kind: str,
    split: str,
    tokens: int | None = None,
    degradation: str = "perplexity",
) -> SensitivityTable:
    """The study's stored sensitivity table (a resume reuses it), or a new one, stored in the study."""
    stored = study.user_attrs.get("sensitivity")
    if stored is not None:
        table = SensitivityTable.from_dict(stored, f"study {study.study_name!r}: sensitivity table")
        log.info("warm start: the study's %s sensitivity table (cost %.1f evaluations, paid before)", table.kind,
                 table.cost_evals)  # fmt: skip
        return table
    table = new_sensitivity(session, space, kind, split, tokens, degradation=degradation)
    study.set_user_attr("sensitivity", table.to_dict())
    return table


def _measured(trials, metric: str, degradation: Degradation) -> list[Measured]:
    out = []
    for t in evaluated_trials(trials):
        delta = degradation.delta(t.user_attrs)
        if delta is not None and math.isfinite(delta):
            out.append(Measured(Candidate.of(t).plan, delta, t.user_attrs[size_key(metric)]))
    return out


def _refine(study: optuna.Study, objective: Objective, space: SearchSpace, table: SensitivityTable,
            policy: RefinePolicy, metric: str, budget: float, allocator: Allocator,
            deadline: float | None = None) -> None:  # fmt: skip
    """Measured local search until ``budget`` evaluations are spent: each turn evaluates the proposal of ``policy``
    (qsweep.search.refine.RefinePolicy: its schedule of criteria, candidates and ranking) in a trial of its own
    (not through the study's queue of enqueued plans) and records it; a plan the study has, pruned ones included,
    is never proposed again."""
    sizes = table.unit_sizes(metric)
    start = spent(study)
    jumps = policy.jump_plans(table, space, sizes, allocator)
    while budget - spent(study) >= objective.min_cost - 1e-9:
        if expired(deadline):
            log.info("refine: search.timeout_s reached")
            return
        trials = study.get_trials(deepcopy=False)
        k = sum(t.user_attrs.get("enqueued_as", "").startswith("refine:") for t in trials)
        known = {t.user_attrs["plan_digest"] for t in trials if "plan_digest" in t.user_attrs}
        found = policy.next(k, _measured(trials, metric, objective.degradation), table, space, sizes, jumps,
                            exclude=known)  # fmt: skip
        if found is None:
            log.info("refine: no unmeasured neighbour left")
            return
        p, criterion = found
        label = f"refine:{k}"
        ran = optimize(study, objective, budget, _left(deadline), progress=False, params=space.params_of(p.plan),
                       attrs={"enqueued_as": label, "predicted_fitness": p.predicted_fitness,
                              "refine_criterion": criterion})  # fmt: skip
        if not ran:  # the budget is spent, or another worker took this turn: the loop asks again
            continue
        t = next(
            (t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("enqueued_as") == label), None
        )
        a = t.user_attrs if t is not None else {}
        fit = objective.degradation.fitness_key(metric)
        measured = a.get(fit)
        outcome = "-" if measured is None else f"{measured:.4f}"
        if a.get("pruned"):
            outcome += f" on {a.get('eval_share', 0):.0%} of the split, dropped ({a['pruned']})"
        log.info("refine %d (%.2f/%.2f evaluations, %s): predicted %s %.4f, measured %s", k,
                 spent(study) - start, budget - start, criterion, fit, p.predicted_fitness, outcome)  # fmt: skip


def interactions(trials, table: SensitivityTable | None, degradation: Degradation = PERPLEXITY) -> list[dict]:
    """Predicted (additive) vs measured degradation (the table's kind: ``degradation``) of every evaluated plan,
    with where it came from."""
    if table is None:
        return []
    rows = []
    for t in evaluated_trials(trials):
        if degradation.value(t.user_attrs) is None:
            continue
        label = t.user_attrs.get("enqueued_as", "") or "sampler"
        pred = predicted_delta_nll(table, Candidate.of(t).plan)
        rows.append({"trial": t.number, "source": source_of(label), "label": label,
                     "plan_digest": t.user_attrs["plan_digest"], "packed_size_bytes": t.user_attrs["packed_size_bytes"],
                     "predicted_degradation": math.expm1(pred), "measured_degradation": degradation.value(t.user_attrs)})  # fmt: skip
    return rows


def trial_budget(n_trials: float, table_cost: float = 0.0) -> float:
    """What a study of ``search.n_trials`` evaluation-equivalents has for its trials: what the sensitivity table's
    cost (counted by work, :attr:`SensitivityTable.cost_evals`; 0 without a table) leaves, so that trials + table
    spend ``n_trials`` (an objective that cannot evaluate part of the split stops at the last whole evaluation)."""
    return max(0.0, n_trials - table_cost)


def run_phases(
    study: optuna.Study,
    objective: Objective,
    space: SearchSpace,
    session: SearchSession,
    search: SearchConfig,
    table: SensitivityTable | None,
    reference: Collection[Plan] = (),
    allocator: Allocator = EXACT,
    deadline: float | None = None,
) -> float:
    """Enqueue the allocator plans (with a table), run the sampler, then refine; returns the trials' budget
    (:func:`trial_budget`: ``search.n_trials`` less the table's cost, in full evaluations). ``reference`` holds the
    plans enqueued as references (uniform, named): the allocator skips them; ``allocator`` answers the knapsack
    questions (a benchmark's caches them). Its plans depend only on the table and these, so a resume asks for the
    same plans under the same labels.

    The budget is a contract: the trials spend it, never more (qsweep.search.study.optimize; racing's partial
    evaluations count by their share), whatever is enqueued. The enqueued plans run in their order and are cut
    where the budget ends, counting each as a whole evaluation: the reference plans (enqueued when the study was
    opened), then the allocator's (qsweep.search.warmstart: the best predicted plan, its two neighbours on the
    predicted front, then plans spread along it); the refine step gets ``search.refine_trials`` evaluations
    (default: ``search.refine_share`` of what the enqueued plans leave) of what is left after them, never an enqueued plan's place,
    and whatever the sampler left. ``search.timeout_s`` bounds every phase together, from now or up to
    ``deadline`` (``time.monotonic()``; the app's, which started before the sensitivity table)."""
    if deadline is None and search.timeout_s is not None:
        deadline = time.monotonic() + search.timeout_s
    budget = trial_budget(search.n_trials, table.cost_evals if table is not None else 0.0)
    if table is not None and table.degradation != search.degradation:
        raise ConfigError(f"a sensitivity table of {table.degradation} cannot steer a search of "
                          f"search.degradation={search.degradation}")  # fmt: skip
    if table is None:
        optimize(study, objective, budget, _left(deadline))
        return budget
    if budget < 1:
        raise ConfigError(f"search.n_trials={search.n_trials} is spent by the {table.kind} sensitivity table "
                          f"({table.cost_evals:.1f} evaluations), which the study keeps: resume with "
                          f"search.n_trials>={math.floor(table.cost_evals) + 2}")  # fmt: skip
    waiting = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    room = max(0, math.floor(budget - spent(study) + 1e-9) - waiting)  # allocator plans, sampler, refine
    wanted = search.refine_trials
    n_allocs = min(search.warm_start_plans, room if wanted is None else max(0, room - wanted))
    allocs = allocator_plans(table, space, size_metric=search.size_metric, n_plans=search.warm_start_plans,
                             baseline_bytes=session.baseline_size_bytes, penalty=session.penalty,
                             exclude=set(reference), allocator=allocator)  # fmt: skip
    # the allocator's labels depend only on the table (a resume asks for the same ones): keep the first n_allocs
    kept = dict(list(allocs.items())[:n_allocs])
    enqueue_plans(study, {k: space.params_of(a.plan) for k, a in kept.items()},
                  {k: {"predicted_fitness": a.fitness(session.baseline_size_bytes, session.penalty)}
                   for k, a in kept.items()})  # fmt: skip
    waiting = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    left = max(0.0, budget - spent(study) - waiting)  # after every enqueued plan that fits
    refine = (
        min(wanted, left) if wanted is not None else math.floor(math.floor(left) * search.refine_share + 1e-9)
    )
    optimize(study, objective, budget - refine, _left(deadline), whole=refine > 0)
    if budget - spent(study) >= objective.min_cost - 1e-9 and not expired(deadline):
        policy = RefinePolicy.of(search, session.baseline_size_bytes, session.penalty)
        _refine(study, objective, space, table, policy, search.size_metric, budget, allocator, deadline)
    if budget - spent(study) >= objective.min_cost - 1e-9 and not expired(deadline):
        # what refine could not spend (no unmeasured neighbour left) goes back to the sampler
        optimize(study, objective, budget, _left(deadline), progress=False)
    return budget


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def expired(deadline: float | None) -> bool:
    """Whether ``deadline`` (``time.monotonic()``; None: none) has passed: ``search.timeout_s``'s test, every phase."""
    return deadline is not None and time.monotonic() >= deadline


OpenStudy = Callable[[optuna.samplers.BaseSampler, Objective, dict[str, dict]], optuna.Study]


def in_memory_study(
    sampler: optuna.samplers.BaseSampler, objective: Objective, enqueue: dict[str, dict]
) -> optuna.Study:
    """A new study in memory with ``enqueue`` (label -> params) enqueued: what benchmarks and tests run."""
    study = optuna.create_study(directions=objective.directions, sampler=sampler)
    enqueue_plans(study, enqueue)
    return study


@dataclass
class StudyRun:
    """A study ready to run (:func:`build_study`): :meth:`run` runs its phases (:func:`run_phases`)."""

    study: optuna.Study
    objective: Objective
    space: SearchSpace
    search: SearchConfig
    reference: dict[str, Plan] = field(default_factory=dict)

    def run(
        self,
        session: SearchSession,
        table: SensitivityTable | None,
        allocator: Allocator = EXACT,
        deadline: float | None = None,
    ) -> float:
        return run_phases(self.study, self.objective, self.space, session, self.search, table,
                          reference=self.reference.values(), allocator=allocator, deadline=deadline)  # fmt: skip


def build_study(
    space: SearchSpace,
    score: Callable[[Plan], PlanScore],
    search: SearchConfig,
    *,
    seed: int | None = None,
    reference: Mapping[str, Plan] = (),
    open_study: OpenStudy = in_memory_study,
    windows=None,
    penalty: float = 10.0,
) -> StudyRun:
    """The objective (``score`` under ``search.objective``, ``size_metric``, ``max_degradation``), the sampler
    (``search.sampler`` seeded with ``seed``, default ``search.seed``), and the study ``open_study(sampler,
    objective, params by label of the reference plans)`` returns (default: a new one in memory; the app opens its
    storage), whose finished trials the objective then knows (a duplicate plan is answered from the study).
    ``windows``: the search split's evaluator (or anything with ``n_windows``, ``n_tokens``, ``window_tokens`` and
    ``windows_within``), so that ``score(plan, stop=, resume=)`` can score part of it: partial evaluations, racing
    (``search.racing``) against fitness with ``penalty``; None: whole evaluations only, each costing 1."""
    reference = dict(reference)
    race = Race(tuple(search.racing), search.racing_confidence) if search.racing else None
    objective = Objective(space, score, kind=search.objective, size_metric=search.size_metric,
                          max_degradation=search.max_degradation, windows=windows, race=race, penalty=penalty,
                          full_labels=reference, degradation=Degradation(search.degradation))  # fmt: skip
    sampler = make_sampler(search.sampler, search.seed if seed is None else seed, search.sampler_options,
                           None if HAS_SET_CONSTRAINT else objective.sampler_constraints)  # fmt: skip
    study = open_study(sampler, objective, {k: space.params_of(p) for k, p in reference.items()})
    objective.remember(study.get_trials(deepcopy=False))
    return StudyRun(study, objective, space, search, reference)
