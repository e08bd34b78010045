"""What `python -m qsweep` does once Hydra has composed the config: evaluate one plan, or run a search.

The flow of a search (each step a module that returns values to this one; none calls back into its caller)::

    search_config(cfg.search)                     validate every setting before anything is stored
    EvalSession(cfg)                              model, units, token ids, evaluators, baseline
    SearchSpace.from_menu(units, menu)            one categorical parameter per searchable unit
    build_study(space, score, search, ...)        objective (plan -> score -> trial values, record, constraint),
                                                  sampler, study (storage, identity, enqueued reference plans)
    StudyRun.run(session, table)                  sensitivity table, allocator plans, sampler, refine (warm start);
                                                  n_trials in total
    candidates(trials) / verify(score on report)  Pareto set or top-k, re-scored on the held-out split
    write_reports(...)                            results.json, pareto.csv, best_plan.yaml, pareto.png
    write_page(...)                               report.html (also on Ctrl-C), the results stored in the study

README "How a search is built" draws the whole package.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qsweep import interrupts
from qsweep.errors import ConfigError, first_line
from qsweep.memory import ResourceError
from qsweep.report import candidate_entry, write_reports
from qsweep.report_page import write_page
from qsweep.score import Degradation, PlanScore, size_key
from qsweep.search.config import search_config
from qsweep.search.objective import Objective
from qsweep.search.phases import build_study, expired, interactions, stored_or_new_sensitivity, trial_budget
from qsweep.search.select import (
    Verified,
    best_vs_uniform,
    candidates,
    choose,
    evaluated_trials,
    rank,
    selection_summary,
    verify,
)
from qsweep.search.sensitivity import proxy_cost_evals
from qsweep.search.space import SearchSpace
from qsweep.search.storage import is_new_storage_file
from qsweep.search.study import (
    count_done,
    default_study_name,
    display_url,
    open_storage,
    open_study,
    reference_plans,
    spent,
    storage_url,
    study_identity,
)
from qsweep.session import EvalSession

__all__ = ["evaluate_one", "resume_command", "run_search"]

log = logging.getLogger("qsweep")


def evaluate_one(cfg: DictConfig, out_dir: Path) -> dict:
    """Score cfg.plan (or cfg.plan_file) against cfg.baseline on one split; write results.json; return the row."""
    session = EvalSession(cfg)
    plan = session.resolve_plan(cfg.plan, cfg.plan_file)
    split = cfg.split or cfg.eval.report_split
    ev = session.evaluator(split)
    log.info(
        "model %s (%d units, %s), split %r: %d tokens in %d windows (eval=%s: context %d, stride %s), device %s",
        session.model_cfg.get("path") or session.model_cfg.get("name"), len(session.table),
        session.model_cfg["granularity"], split, ev.n_tokens, len(ev.windows), cfg.eval.name, session.context,
        cfg.eval.stride or session.context, session.device,
    )  # fmt: skip
    score = session.score(plan, split)
    row = {**score.record(), "plan": dict(plan.formats), "eval": cfg.eval.name, "data": cfg.data.name,
           "resources": session.resources()}  # fmt: skip
    (out_dir / "results.json").write_text(json.dumps(row, indent=2) + "\n")
    plan.save(out_dir / "plan.yaml")
    if score.result.ok:
        log.info("perplexity %.4f vs baseline %.4f (%+.3f%%); seed accounting %.3fx, fitness_seed %.4f; packed "
                 "%.3fx, fitness_packed %.4f; wrote %s", score.perplexity, score.baseline_perplexity,
                 100 * score.degradation, score.compression("seed"), score.fitness("seed"),
                 score.compression("packed"), score.fitness("packed"), out_dir / "results.json")  # fmt: skip
    else:
        log.error("evaluation failed: %s", score.result.error)
    return row


_STUDY_OVERRIDES = (
    "storage.url=",
    "search.study_name=",
    "hydra.run.dir=",
    "+storage.url=",
    "+search.study_name=",
)


def reproduce_command(overrides: list[str]) -> str:
    """The command line that runs this study again as a new study: the user's overrides without the storage, study
    name and run directory (which would resume this one)."""
    kept = [o for o in overrides if not o.startswith(_STUDY_OVERRIDES)]
    return "python -m qsweep " + " ".join(shlex.quote(a) for a in kept)


def resume_command(overrides: list[str], url: str, study_name: str) -> str:
    """The command line that resumes this study: the user's overrides, with the storage and study pinned. A URL
    with a password is never printed: the command then names no URL, and says where it must come from."""
    kept = [o for o in overrides if not o.startswith(_STUDY_OVERRIDES)]
    secret = display_url(url) != url
    if secret and url.startswith("postgresql") and not any(o.startswith("storage=") for o in kept):
        kept.append("storage=postgres")  # the group that reads QSWEEP_STORAGE_URL
    args = [*kept, *([] if secret else [f"storage.url={url}"]), f"search.study_name={study_name}"]
    command = "python -m qsweep " + " ".join(shlex.quote(a) for a in args)
    if secret:
        command += f"  (with QSWEEP_STORAGE_URL set to {display_url(url)}, password included)"
    return command


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _write_page(out_dir: Path, results, study, search, session, interrupted: str | None = None) -> None:
    """report.html (qsweep.report_page); a failure to draw it is a warning, never the study's end."""
    try:
        path = write_page(out_dir, results, study, metric=search.size_metric,
                          baseline_bytes=session.baseline_size_bytes, interrupted=interrupted)  # fmt: skip
        log.info("wrote %s", path)
    except Exception as e:  # the study and its other reports are stored: the page is a view of them
        log.warning("report.html not written: %s", first_line(e))


def candidate_entry_of(v: Verified) -> dict:
    c = v.candidate
    return candidate_entry(c.trial, c.label, c.plan, c.search, v.report.record())


def _check_the_budget_pays_for_the_table(study, session, search, split: str) -> None:
    """A new proxy table that would spend all of ``search.n_trials`` is refused before it is computed (its cost
    is counted by work: qsweep.search.sensitivity.proxy_cost_evals; at least this much, without checkpointing).
    ``study`` None: the storage does not exist yet, so no study in it holds a table (checked before it is made,
    so a refused run leaves no empty study file)."""
    if search.sensitivity != "proxy" or (study is not None and "sensitivity" in study.user_attrs):
        return
    ev = session.evaluator(split)
    tokens = min(search.sensitivity_tokens or ev.n_tokens, ev.n_tokens)
    cost = proxy_cost_evals(tokens, ev.n_tokens, "rademacher", False, search.degradation)
    if trial_budget(search.n_trials, cost) < 1:
        raise ConfigError(f"search.n_trials={search.n_trials} leaves no trial after the proxy sensitivity table "
                          f"(about {cost:.1f} evaluations for search.sensitivity_tokens={search.sensitivity_tokens}"
                          f" of the {ev.n_tokens} tokens of split {split!r}): use search.n_trials>="
                          f"{math.floor(cost) + 2}, fewer search.sensitivity_tokens, or search.warm_start=false")  # fmt: skip


def run_search(cfg: DictConfig, out_dir: Path) -> dict:
    """Run (or resume) the study of ``cfg.search``, verify its candidates, write its reports; return the summary."""
    search = search_config(cfg.search)  # every setting checked before anything is loaded or stored
    deg = Degradation(search.degradation)
    if deg.kld and not cfg.eval.get("kld", True):
        raise ConfigError("search.degradation=kld needs the baseline's distribution: use eval.kld=true")
    if deg.kld and cfg.baseline.perplexity is not None:
        raise ConfigError(f"search.degradation=kld needs the baseline evaluated (its distribution is the KL "
                          f"reference): unset baseline.perplexity={cfg.baseline.perplexity}")  # fmt: skip
    # search.timeout_s bounds every phase: the table (started only with time left), the trials, the re-scoring
    deadline = None if search.timeout_s is None else time.monotonic() + search.timeout_s
    session = EvalSession(cfg)
    # data errors (no such split, too few tokens, a binary file) before a study or a failed trial is stored
    for split in dict.fromkeys((cfg.eval.search_split, cfg.eval.report_split)):
        session.evaluator(split)
    space = SearchSpace.from_menu(session.table, OmegaConf.to_container(cfg.precision.menu, resolve=True))
    enqueue = reference_plans(list(search.enqueue), space, session.table, cfg.precision.name)
    seed = search.seed + cfg.worker  # workers of one study propose different plans (README: Distributed)
    url, name = storage_url(cfg, out_dir), default_study_name(cfg, search)
    if search.warm_start and is_new_storage_file(url):
        _check_the_budget_pays_for_the_table(None, session, search, cfg.eval.search_split)
    storage = open_storage(url, cfg.storage.heartbeat_interval, cfg.storage.grace_period)
    identity = study_identity(cfg, search, session.context, session.dtype)
    log.info("study %r (%s, %s objective, %d trials, seed %d) on split %r; %d plans enqueued; search space: %d "
             "units x up to %d formats", name, search.sampler, search.objective, search.n_trials, search.seed,
             cfg.eval.search_split, len(enqueue), len(space.searchable),
             max(len(c) for c in space.choices.values()))  # fmt: skip
    dashboard = f"optuna-dashboard {display_url(url)}"
    log.info("inspect it live: %s", dashboard)

    def open_stored(sampler, objective: Objective, params: dict[str, dict]):
        return open_study(storage=storage, url=url, name=name, sampler=sampler, directions=objective.directions,
                          metric_names=objective.metric_names, identity=identity, enqueue=params,
                          attrs={"search_split": cfg.eval.search_split, "report_split": cfg.eval.report_split,
                                 f"worker:{cfg.worker}": {"sampler_seed": seed}})  # fmt: skip

    def score(plan, stop=None, resume=None):
        return session.score(plan, cfg.eval.search_split, stop, resume)

    run = build_study(space, score, search, seed=seed, reference=enqueue, open_study=open_stored,
                      windows=session.evaluator(cfg.eval.search_split), penalty=session.penalty)  # fmt: skip
    study, objective = run.study, run.objective
    table, budget = None, search.n_trials
    spent_on_table = 0.0  # the sensitivity table's cost, in evaluations
    with interrupts.handling():  # Ctrl-C and `kill` stop the study cleanly
        try:
            if search.warm_start and expired(deadline) and "sensitivity" not in study.user_attrs:
                log.warning("search.timeout_s=%s reached before the sensitivity table: no warm start, no trials",
                            search.timeout_s)  # fmt: skip
            elif search.warm_start:
                _check_the_budget_pays_for_the_table(study, session, search, cfg.eval.search_split)
                table = stored_or_new_sensitivity(
                    study,
                    session,
                    space,
                    search.sensitivity,
                    cfg.eval.search_split,
                    search.sensitivity_tokens,
                    search.degradation,
                )
                spent_on_table = table.cost_evals
                table.save(out_dir / "sensitivity.json")
                table.write_csv(out_dir / "sensitivity.csv")
            if search.warm_start and table is None:
                budget = trial_budget(search.n_trials)
            else:
                budget = run.run(session, table, deadline=deadline)
            interrupts.check()  # a Ctrl-C that Python discarded on the way (qsweep.interrupts)
        except KeyboardInterrupt:
            line = (f"interrupted with {spent(study) + spent_on_table:.2f} of {search.n_trials} evaluations spent "
                    f"({count_done(study)} trials done); the study is stored. Resume with: "
                    f"{resume_command(_task_overrides(), url, name)}")  # fmt: skip
            log.warning("%s", line)
            _write_page(out_dir, None, study, search, session, interrupted=line[0].upper() + line[1:])
            raise
        except ResourceError as e:  # out of memory: one line, and the study resumes where it stopped
            raise ResourceError(f"{e}; the study is stored ({spent(study) + spent_on_table:.2f} of "
                                f"{search.n_trials} evaluations spent): resume with {resume_command(_task_overrides(), url, name)} and the "
                                f"lowered setting") from None  # fmt: skip

    trials = study.get_trials(deepcopy=False)
    chosen = candidates(trials, kind=search.objective, size_metric=search.size_metric, top_k=search.top_k,
                        max_degradation=search.max_degradation, degradation=deg)  # fmt: skip
    report_split = cfg.eval.report_split
    log.info("re-scoring %d candidate plans on the report split %r", len(chosen), report_split)
    scored: dict[str, PlanScore] = {}  # report-split scores by plan digest: each plan is evaluated once

    def score_report(plan):
        if plan.digest() not in scored:
            scored[plan.digest()] = score = session.score(plan, report_split)
            value = deg.fitness_of(score, search.size_metric)
            log.info("report split %r: plan %d (%s): perplexity %.4g, %s %.4f, %.1f s",
                     report_split, len(scored), plan.digest(),
                     score.result.perplexity or float("nan"), deg.fitness_key(search.size_metric),
                     float("nan") if value is None else value, score.result.seconds)  # fmt: skip
        return scored[plan.digest()]

    # the reported plan and the search split's best are chosen on the search split: re-scored first, the other
    # candidates while search.timeout_s leaves time
    first = {c.trial for rule in (search.select, "fitness")
             for c in rank(chosen, rule, search.size_metric, session.penalty, deg)[:1]}  # fmt: skip
    verified = verify([c for c in chosen if c.trial in first], score_report)
    rest = [c for c in chosen if c.trial not in first]
    for k, c in enumerate(rest):
        if expired(deadline):
            log.warning("search.timeout_s reached: %d of %d candidates not re-scored on the report split %r (not in "
                        "pareto.csv)", len(rest) - k, len(chosen), report_split)  # fmt: skip
            break
        verified += verify([c], score_report)
    verified.sort(key=lambda v: chosen.index(v.candidate))
    fit = deg.fitness_key(search.size_metric)
    best = choose(verified, search.select, search.size_metric, session.penalty, deg)
    search_best = choose(verified, "fitness", search.size_metric, session.penalty, deg)
    entries = [candidate_entry_of(v) for v in verified]
    vs_uniform = None
    if session.pinned_perplexity is None:
        vs_uniform = best_vs_uniform(best, trials, session.baseline, score_report, search.size_metric, deg,
                                     search.max_degradation)  # fmt: skip
    summary = {
        "study_name": name,
        "storage": display_url(url),
        "sampler": search.sampler,
        "objective": search.objective,
        "seed": search.seed,
        "worker": cfg.worker,
        "sampler_seed": seed,
        "identity": identity,
        "n_trials_done": count_done(study),
        "sensitivity": None
        if table is None
        else {
            "kind": table.kind,
            "cost_evals": table.cost_evals,
            "seconds": table.seconds,
            "file": str(out_dir / "sensitivity.json"),
        },
        "trial_budget": budget,
        "evaluations_spent": spent(study) + spent_on_table,
        "n_trials_pruned": sum(t.state.name == "PRUNED" for t in trials),
        "n_trials_failed": sum(t.state.name == "FAIL" for t in trials),
        "n_duplicates": sum("duplicate_of" in t.user_attrs for t in trials),
        "n_evaluated_this_run": objective.n_evaluated,
        "search_split": cfg.eval.search_split,
        "report_split": report_split,
        "size_metric": search.size_metric,
        "degradation": search.degradation,
        "fitness": fit,
        "baseline_size_bytes": session.baseline_size_bytes,
        "baseline_perplexity": {
            s: session.baseline_perplexity(s) for s in (cfg.eval.search_split, report_split)
        },
        "best": None if best is None else candidate_entry_of(best),
        "selection": selection_summary(
            best, search_best, search.select, search.size_metric, session.penalty, deg
        ),
        "best_plan": None if best is None else str(out_dir / "best_plan.yaml"),
        "best_vs_uniform": vs_uniform,
        "n_trials": search.n_trials,
        "command": reproduce_command(_task_overrides()),
        "resume_command": resume_command(_task_overrides(), url, name),
    }
    summary["resources"] = session.resources()
    points = [
        {**t.user_attrs, "enqueued_as": t.user_attrs.get("enqueued_as", "")} for t in evaluated_trials(trials)
    ]
    write_reports(out_dir, summary=summary, entries=entries, best_plan=None if best is None else best.candidate.plan,
                  points=points, size_key=size_key(search.size_metric), title=name,
                  interactions=interactions(trials, table, deg))  # fmt: skip
    results = {**summary, "candidates": entries}
    try:  # the study holds its results: python -m qsweep.report --storage URL --study NAME rebuilds the page from it
        study.set_user_attr("results", results)
    except Exception as e:  # e.g. a database column too small: the run directory still has them
        log.warning(
            "the study does not keep its results (%s): rebuild report.html from the run directory",
            first_line(e),
        )
    _write_page(out_dir, results, study, search, session)
    if best is not None:
        r = best.report
        rf = deg.fitness_of(r, search.size_metric)
        log.info("best plan on %r (%s %.4f): on %r perplexity %s, %.3fx, %s %s; wrote %s", cfg.eval.search_split,
                 fit, best.candidate.search[fit], report_split,
                 "failed" if r.perplexity is None else f"{r.perplexity:.4f}", r.compression(search.size_metric),
                 fit, "-" if rf is None else f"{rf:.4f}", out_dir)  # fmt: skip
    sel = summary["selection"]
    if sel is not None and not sel["same_plan"]:
        log.info("chosen by search.select=%s over the search split's best point estimate (trial %d, %s): report-split "
                 "fitness %s vs %s", sel["rule"], sel["search_best"]["trial"], sel["search_best"]["enqueued_as"] or "-",
                 *("-" if x is None else f"{x:.4f}" for x in (sel["chosen"]["report_fitness"],
                                                            sel["search_best"]["report_fitness"])))  # fmt: skip
    log.info("inspect it: %s", dashboard)
    return {
        k: summary[k]
        for k in (
            "study_name",
            "storage",
            "n_trials_done",
            "evaluations_spent",
            "best",
            "best_plan",
            "best_vs_uniform",
            "resources",
        )
    }
