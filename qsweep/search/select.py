"""Selection: which trials of a finished study are candidates, and their verification on the report split.

* Candidates (chosen on the search split only): the Pareto set of (perplexity, size) for the multi-objective
  search, or the ``top_k`` plans by ``fitness_<size_metric>`` for the single-objective one; infeasible plans
  (``search.max_degradation``), failed plans and duplicate plans are left out. With ``search.degradation=kld``
  (qsweep.score.Degradation) every rule here reads ``kld_mean``, ``fitness_kld_<size_metric>`` and the KL interval
  instead.
* Verification: each candidate is re-scored on the report split (the held-out numbers a user should quote). The
  reported plan is chosen on the *search split* only (:func:`choose`), so its report-split numbers are an honest
  estimate, not a maximum over noise. ``search.select=lcb`` (default) takes the best fitness with the degradation
  at the upper end of its paired 95% interval (a lower confidence bound of the fitness): among plans whose point
  estimates are within noise of each other, the one whose loss is known best, since the largest point estimate of
  many is the one most likely inflated by the search windows (the winner's curse; measured in issue 19: a study's
  search-split best plan scored no better on test than the best uniform plan). ``fitness`` takes the best point
  estimate. results.json shows both plans with their report-split fitness (``selection``).
* Comparison: the best plan against the best uniform plan on the same report windows, with a paired bootstrap
  interval of the fitness difference (:func:`paired_fitness_difference`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from optuna.trial import FrozenTrial, TrialState

from qsweep.evaluate import EvalResult
from qsweep.metrics import fitness
from qsweep.plan import Plan
from qsweep.score import PERPLEXITY, Degradation, PlanScore, size_key
from qsweep.search.front import pareto_indices
from qsweep.search.objective import is_feasible

__all__ = [
    "SELECT_RULES",
    "Candidate",
    "Verified",
    "best_vs_uniform",
    "candidates",
    "choose",
    "evaluated_trials",
    "paired_fitness_difference",
    "rank",
    "selection_score",
    "selection_summary",
    "source_of",
    "verify",
]


@dataclass(frozen=True)
class Candidate:
    """A plan chosen on the search split: its trial, reference label (``enqueued_as``) and search-split record."""

    trial: int
    label: str
    plan: Plan
    search: Mapping

    @classmethod
    def of(cls, trial: FrozenTrial) -> Candidate:
        a = trial.user_attrs
        return cls(trial.number, a.get("enqueued_as", ""), Plan(json.loads(a["plan"])["units"]), dict(a))


@dataclass(frozen=True)
class Verified:
    """A candidate and its score on the report split."""

    candidate: Candidate
    report: PlanScore


def source_of(label: str) -> str:
    """Where a trial came from, by its ``enqueued_as`` label: ``uniform``, ``allocator``, ``refine`` (the label's
    prefix; a named reference plan's too), or ``sampler`` (no label)."""
    return label.split(":", 1)[0] if label else "sampler"


def evaluated_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Complete trials with a successfully scored plan, one per plan (the first trial that scored it)."""
    out, seen = [], set()
    for t in trials:
        a = t.user_attrs
        if t.state != TrialState.COMPLETE or a.get("error") or a.get("perplexity") is None:
            continue
        if a["plan_digest"] not in seen:
            seen.add(a["plan_digest"])
            out.append(t)
    return out


def candidates(
    trials: Iterable[FrozenTrial],
    *,
    kind: str,
    size_metric: str,
    top_k: int = 5,
    max_degradation: float | None = None,
    degradation: Degradation = PERPLEXITY,
) -> list[Candidate]:
    """The Pareto set (``kind="multi"``, sorted by size) or the top-k by fitness (``"fitness"``, best first)."""
    done = [
        t for t in evaluated_trials(trials)
        if degradation.value(t.user_attrs) is not None and is_feasible(t.user_attrs, max_degradation, degradation)
    ]  # fmt: skip
    key, loss = size_key(size_metric), degradation.objective_key
    if kind == "multi":
        front = [done[i] for i in pareto_indices([(t.user_attrs[loss], t.user_attrs[key]) for t in done])]
        chosen = sorted(front, key=lambda t: t.user_attrs[key])
    else:
        fit = degradation.fitness_key(size_metric)
        chosen = sorted(done, key=lambda t: t.user_attrs[fit], reverse=True)[:top_k]
    return [Candidate.of(t) for t in chosen]


SELECT_RULES = ("lcb", "fitness")


def selection_score(
    record: Mapping, size_metric: str, penalty: float, rule: str, degradation: Degradation = PERPLEXITY
) -> float:
    """What :func:`choose` ranks a search-split record by: ``fitness_<size_metric>`` (``fitness``), or the same
    fitness with the degradation at its 95% upper bound ``degradation_ci95_high`` (``lcb``; the point estimate
    where the record has no interval); ``degradation`` kld: the same of the KL fitness and interval."""
    point = record[degradation.fitness_key(size_metric)]
    high = degradation.bound(record, "high")
    if rule == "fitness" or high is None:
        return point
    return fitness(record[f"compression_{size_metric}"], high, penalty)


def rank(
    cands: Sequence[Candidate],
    rule: str,
    size_metric: str,
    penalty: float,
    degradation: Degradation = PERPLEXITY,
) -> list[Candidate]:
    """The candidates best first by their *search-split* record (:func:`selection_score`; ties go to the smaller
    plan, then the earlier trial)."""
    key = size_key(size_metric)
    return sorted(cands, key=lambda c: (selection_score(c.search, size_metric, penalty, rule, degradation),
                                        -c.search[key], -c.trial), reverse=True)  # fmt: skip


def choose(
    verified: Sequence[Verified],
    rule: str,
    size_metric: str,
    penalty: float,
    degradation: Degradation = PERPLEXITY,
) -> Verified | None:
    """The reported plan among the verified candidates: the first of :func:`rank` (the search split only)."""
    first = rank([v.candidate for v in verified], rule, size_metric, penalty, degradation)[:1]
    return next((v for v in verified if first and v.candidate is first[0]), None)


def verify(cands: Sequence[Candidate], score: Callable[[Plan], PlanScore]) -> list[Verified]:
    """Re-score every candidate with ``score`` (the report split)."""
    return [Verified(c, score(c.plan)) for c in cands]


def paired_fitness_difference(
    a: PlanScore,
    b: PlanScore,
    base: EvalResult,
    metric: str,
    *,
    n_boot: int = 4000,
    seed: int = 0,
    degradation: Degradation = PERPLEXITY,
) -> tuple[float, float, float]:
    """fitness(a) - fitness(b) on the same windows, with a 95% paired bootstrap interval over windows.

    Windows are resampled together for a, b and the baseline (the same resample for all three), and each
    resample's fitnesses are recomputed exactly (compression is fixed; degradation from the resampled NLL sums,
    clipped at 0 as the fitness clips it; ``degradation`` kld: from the resampled KL sums, the baseline's being 0).
    Returns (difference, low, high).
    """
    ra, rb = a.result, b.result
    for r in (ra, rb):
        if not (r.ok and torch.equal(r.window_tokens, base.window_tokens)):
            raise ValueError("paired comparison needs both plans scored on the baseline's windows")
    losses = [degradation.window_losses(r) for r in (ra, rb, base)]  # the baseline's KL: 0 per window
    if any(x is None for x in losses):
        raise ValueError("a KL comparison needs both plans scored against the baseline's distribution")
    loss = torch.stack(losses).double()  # [3, W]
    tokens = base.window_tokens.double()  # [W]
    n = tokens.numel()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)  # [n_boot, W]
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64)
    )
    sums = counts @ loss.T  # [n_boot, 3]
    toks = counts @ tokens  # [n_boot]
    ppl = torch.exp(sums / toks[:, None])
    deg = ppl[:, :2] / ppl[:, 2:3] - 1  # [n_boot, 2]; the fitness clips it at 0
    comp = torch.tensor([a.compression(metric), b.compression(metric)], dtype=torch.float64)
    diff = fitness(comp, deg, a.penalty) @ torch.tensor([1.0, -1.0], dtype=torch.float64)  # [n_boot]
    point = (degradation.fitness_of(a, metric) or 0.0) - (degradation.fitness_of(b, metric) or 0.0)
    lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point, lo, hi


def selection_summary(
    best: Verified | None, search_best: Verified | None, rule: str, size_metric: str, penalty: float,
    degradation: Degradation = PERPLEXITY,
) -> dict | None:  # fmt: skip
    """results.json's ``selection``: the rule, the chosen plan and the search split's best point estimate, each
    with its search-split selection score and fitness and its report-split fitness (the held-out check), in the
    study's fitness (``search.degradation``)."""
    if best is None or search_best is None:
        return None
    deg = degradation

    def side(v: Verified) -> dict:
        return {"trial": v.candidate.trial, "enqueued_as": v.candidate.label, "plan_digest": v.candidate.plan.digest(),
                "search_score": selection_score(v.candidate.search, size_metric, penalty, rule, deg),
                "search_fitness": v.candidate.search[deg.fitness_key(size_metric)],
                "report_fitness": deg.fitness_of(v.report, size_metric)}  # fmt: skip

    return {"rule": rule, "chosen": side(best), "search_best": side(search_best),
            "same_plan": best.candidate.plan.digest() == search_best.candidate.plan.digest()}  # fmt: skip


def best_vs_uniform(
    best: Verified | None,
    trials: Iterable[FrozenTrial],
    baseline: Callable[[str], EvalResult],
    score: Callable[[Plan], PlanScore],
    metric: str,
    degradation: Degradation = PERPLEXITY,
    max_degradation: float | None = None,
) -> dict | None:
    """The best plan against the best feasible uniform plan (by search-split fitness; ``max_degradation``: the
    study's ceiling), paired on the report split (``score``; ``baseline(split)``: the baseline's result there), in
    the study's fitness; with ``degradation`` kld, in the user's fitness too (``perplexity``). A chosen plan that is
    itself one of the uniform plans is said to be (``best_is_uniform``)."""
    deg = degradation
    fit = deg.fitness_key(metric)
    uniform = [
        t for t in evaluated_trials(trials)
        if t.user_attrs.get("enqueued_as", "").startswith("uniform:") and t.user_attrs.get(fit) is not None
    ]  # fmt: skip
    if best is None or not best.report.result.ok:
        return None
    same = next(
        (t for t in uniform if t.user_attrs["plan_digest"] == best.candidate.search["plan_digest"]), None
    )
    if same is not None:
        return {"uniform": same.user_attrs["enqueued_as"], "best_is_uniform": True, "difference": 0.0,
                "ci95": [0.0, 0.0]}  # fmt: skip
    uniform = [t for t in uniform if is_feasible(t.user_attrs, max_degradation, deg)]
    if not uniform:
        return None
    ref = max(uniform, key=lambda t: t.user_attrs[fit])
    label = ref.user_attrs["enqueued_as"]
    ref_score = score(Candidate.of(ref).plan)
    base = baseline(ref_score.split)
    diff, lo, hi = paired_fitness_difference(best.report, ref_score, base, metric, degradation=deg)
    out = {"uniform": label, "best_is_uniform": False, f"uniform_report_{fit}": deg.fitness_of(ref_score, metric),
           f"best_report_{fit}": deg.fitness_of(best.report, metric), "difference": diff, "ci95": [lo, hi]}  # fmt: skip
    if deg.kld:  # what the user's fitness says of the same two plans
        diff, lo, hi = paired_fitness_difference(best.report, ref_score, base, metric)
        out["perplexity"] = {f"uniform_report_fitness_{metric}": ref_score.fitness(metric),
                             f"best_report_fitness_{metric}": best.report.fitness(metric), "difference": diff,
                             "ci95": [lo, hi]}  # fmt: skip
    return out
