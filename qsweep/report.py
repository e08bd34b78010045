"""Reports of a finished study: pure writers of data they are given (selection and verification happen before).

Files written to the run directory:
  * ``results.json``: the summary the caller built (settings, identity, baselines, counts), every candidate with
    its search-split and report-split records (qsweep.score's record names), and the best plan;
  * ``pareto.csv``: one row per candidate, the two records side by side (``search_*`` / ``report_*``);
  * ``best_plan.yaml``: the best candidate's plan, a plan file (``plan_file=...``);
  * ``pareto.png``: every evaluated trial (size vs search-split perplexity), the candidates and the reference plans;
  * ``interactions.csv`` / ``.png`` (warm-started studies): for every evaluated plan, the degradation the additive
    sensitivity model predicts vs the one measured, and where the plan came from (uniform, allocator, sampler,
    refine): where the points leave the diagonal, the units interact and the additive model breaks.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from qsweep.plan import Plan
from qsweep.plots import plot_front, plot_interactions
from qsweep.score import RECORD_FIELDS, Degradation

__all__ = ["CSV_FIELDS", "candidate_entry", "csv_row", "write_reports"]

log = logging.getLogger("qsweep")

_SHARED = ("plan_digest", "model_size_bytes", "packed_size_bytes", "baseline_size_bytes", "compression_seed",
           "compression_packed", "bits_per_param")  # fmt: skip
_PER_SPLIT = tuple(f for f in RECORD_FIELDS if f not in _SHARED)
CSV_FIELDS = [
    "trial",
    "enqueued_as",
    *_SHARED,
    *(f"{s}_{f}" for s in ("search", "report") for f in _PER_SPLIT),
]


def candidate_entry(trial: int, label: str, plan: Plan, search: Mapping, report: Mapping) -> dict:
    """A candidate as results.json holds it: both records and the plan."""
    return {
        "trial": trial,
        "enqueued_as": label,
        "plan": dict(plan.formats),
        "search": {k: search.get(k) for k in RECORD_FIELDS},
        "report": {k: report.get(k) for k in (*RECORD_FIELDS, "bit_histogram")},
    }


def csv_row(entry: Mapping) -> dict:
    """A candidate entry flattened for pareto.csv (sizes once; per-split numbers prefixed)."""
    row = {"trial": entry["trial"], "enqueued_as": entry["enqueued_as"]}
    row.update({k: entry["report"][k] for k in _SHARED})
    for split in ("search", "report"):
        row.update({f"{split}_{k}": entry[split][k] for k in _PER_SPLIT})
    return row


def write_reports(
    out_dir: Path,
    *,
    summary: Mapping,
    entries: Sequence[Mapping],
    best_plan: Plan | None,
    points: Sequence[Mapping],
    size_key: str,
    title: str,
    interactions: Sequence[Mapping] = (),
) -> None:
    """Write results.json, pareto.csv, best_plan.yaml, pareto.png and, with a sensitivity table, interactions.csv
    and interactions.png (see module docstring)."""
    if interactions:
        with (out_dir / "interactions.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(interactions[0]))
            w.writeheader()
            w.writerows(interactions)
    with (out_dir / "pareto.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_row(e) for e in entries)
    if best_plan is not None:
        best_plan.save(out_dir / "best_plan.yaml")
    results = {**summary, "candidates": list(entries)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    try:
        loss = Degradation(summary.get("degradation", "perplexity")).objective_key
        plot_front(points, entries, size_key, title, out_dir / "pareto.png", loss_key=loss)
        if interactions:
            plot_interactions(interactions, title, out_dir / "interactions.png")
    except ImportError:
        log.warning("matplotlib is not installed: no pareto.png (pip install matplotlib)")


if __name__ == "__main__":  # python -m qsweep.report RUN_DIR: rebuild report.html (qsweep.report_page)
    from qsweep.report_page import main

    raise SystemExit(main())
