"""Reports of a finished study: the winners re-scored on the held-out split, files, and the Pareto-front plot.

Files written to the run directory:
  * ``results.json``: settings, baselines on both splits, every candidate with its search- and report-split numbers;
  * ``pareto.csv``: one row per candidate (the Pareto set, or the top-k by fitness);
  * ``best_plan.yaml``: the candidate with the best search-split fitness, a plan file (``plan_file=...``; copied
    into conf/plan/ it is also a ``plan=NAME`` option);
  * ``pareto.png``: all trials (size vs perplexity on the search split), the front, and the uniform and enqueued
    reference plans.
The best plan is chosen on the search split; its report-split numbers are measured after the choice, so they are
an honest estimate.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import optuna
from optuna.trial import TrialState

from qsweep.plan import Plan

__all__ = ["plot_front", "write_reports"]

log = logging.getLogger("qsweep")

CSV_FIELDS = [
    "trial", "plan_digest", "enqueued_as", "model_size_bytes", "packed_size_bytes", "compression",
    "search_perplexity", "search_degradation", "search_fitness",
    "report_perplexity", "report_degradation", "report_degradation_ci95_low", "report_degradation_ci95_high",
    "report_fitness",
]  # fmt: skip


def _plan_of(trial: optuna.trial.FrozenTrial) -> Plan:
    return Plan(json.loads(trial.user_attrs["plan"])["units"])


def write_reports(runner, study: optuna.Study, out_dir: Path) -> dict:
    session, search = runner.session, runner.search
    rows = []
    candidates = runner.candidates(study)
    log.info("re-scoring %d candidate plans on the report split %r", len(candidates), runner.report_split)
    for t in candidates:
        plan = _plan_of(t)
        rep = session.score(plan, runner.report_split)
        ci = rep.degradation_ci95 or (None, None)
        rows.append({
            "trial": t.number,
            "plan_digest": t.user_attrs["plan_digest"],
            "enqueued_as": t.user_attrs.get("enqueued_as", ""),
            "model_size_bytes": rep.model_size_bytes,
            "packed_size_bytes": rep.packed_size_bytes,
            "compression": rep.compression_for(search.size_metric),
            "search_perplexity": t.user_attrs["perplexity"],
            "search_degradation": t.user_attrs["degradation"],
            "search_fitness": t.user_attrs["fitness"],
            "report_perplexity": rep.perplexity,
            "report_degradation": rep.degradation,
            "report_degradation_ci95_low": ci[0],
            "report_degradation_ci95_high": ci[1],
            "report_fitness": rep.fitness_for(search.size_metric),
            "plan": plan,
        })  # fmt: skip
    rows.sort(key=lambda r: r["packed_size_bytes"])
    with (out_dir / "pareto.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    best = max(rows, key=lambda r: r["search_fitness"]) if rows else None
    if best is not None:
        best["plan"].save(out_dir / "best_plan.yaml")
    trials = study.get_trials(deepcopy=False)
    summary = {
        "study_name": runner.study_name,
        "storage": runner.storage_url,
        "sampler": search.sampler,
        "objective": search.objective,
        "seed": search.seed,
        "n_trials_done": sum(t.state == TrialState.COMPLETE for t in trials),
        "n_trials_failed": sum(t.state == TrialState.FAIL for t in trials),
        "n_duplicates": sum("duplicate_of" in t.user_attrs for t in trials),
        "search_split": runner.split,
        "report_split": runner.report_split,
        "size_metric": search.size_metric,
        "baseline_size_bytes": session.baseline_size_bytes,
        "baseline_perplexity": {
            s: session.baseline(s).perplexity for s in (runner.split, runner.report_split)
        },
        "best": None if best is None else {k: v for k, v in best.items() if k != "plan"},
        "best_plan": None if best is None else str(out_dir / "best_plan.yaml"),
        "candidates": [
            {**{k: v for k, v in r.items() if k != "plan"}, "plan": r["plan"].formats} for r in rows
        ],
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plot_front(study, rows, search.size_metric, out_dir / "pareto.png")
    except ImportError:
        log.warning("matplotlib is not installed: no pareto.png (pip install matplotlib)")
    if best is not None:
        log.info("best plan on %r (fitness %.4f): %s on %r, %.3fx, fitness %.4f; wrote %s",
                 runner.split, best["search_fitness"],
                 "failed" if best["report_perplexity"] is None else f"perplexity {best['report_perplexity']:.4f}",
                 runner.report_split, best["compression"], best["report_fitness"] or float("nan"), out_dir)  # fmt: skip
    return {k: summary[k] for k in ("study_name", "storage", "n_trials_done", "best", "best_plan")}


def plot_front(study: optuna.Study, rows: list[dict], size_metric: str, path: Path) -> Path:
    """Size (MB) vs search-split perplexity for every trial; the candidates and the reference plans marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"{size_metric}_size_bytes"
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "perplexity" in t.user_attrs
    ]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter([t.user_attrs[key] / 1e6 for t in done], [t.user_attrs["perplexity"] for t in done], s=12,
               color="0.7", label=f"trials ({len(done)})")  # fmt: skip
    front = sorted(rows, key=lambda r: r[key])
    ax.plot([r[key] / 1e6 for r in front], [r["search_perplexity"] for r in front], "o-", color="tab:red",
            markersize=5, label="Pareto set / top-k (search split)")  # fmt: skip
    refs = [t for t in done if t.user_attrs.get("enqueued_as")]
    for t in refs:
        x, y = t.user_attrs[key] / 1e6, t.user_attrs["perplexity"]
        ax.scatter([x], [y], marker="s", s=36, color="tab:blue", zorder=3)
        ax.annotate(
            t.user_attrs["enqueued_as"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    if refs:
        ax.scatter([], [], marker="s", color="tab:blue", label="uniform / enqueued plans")
    ax.set_yscale("log")
    ax.set_xlabel(f"{size_metric} size (MB)")
    ax.set_ylabel("perplexity (search split)")
    ax.set_title(study.study_name, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
