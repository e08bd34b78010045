"""The study's plots (matplotlib, Agg): PNG files beside results.json (:mod:`qsweep.report`) and inline SVG in
report.html (:mod:`qsweep.report_page`), one drawing code for both.

* :func:`plot_front`: every trial's size vs search-split perplexity, the candidates, the reference plans labelled;
* :func:`plot_interactions`: the additive model's predicted degradation vs the measured one, by source;
* :func:`plot_study_front`: the page's front: size (MB, and compression on the top axis) vs degradation, every
  trial coloured by where it came from (uniform, allocator, sampler, refine), the uniform plans labelled, the chosen
  plan marked on the search split and, beside it, on the report split.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["SOURCE_COLOURS", "plot_front", "plot_interactions", "plot_study_front", "svg_of"]

SOURCE_COLOURS = {"uniform": "tab:blue", "allocator": "tab:orange", "sampler": "0.55", "refine": "tab:green"}


def svg_of(plot: Callable, *args, **kwargs) -> str:
    """The ``<svg>`` element ``plot(*args, path=stream, **kwargs)`` draws (no XML prolog: for inline HTML)."""
    buf = io.BytesIO()
    plot(*args, path=buf, **kwargs)
    text = buf.getvalue().decode()
    return re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg") :], flags=re.DOTALL)


def plot_study_front(points: Sequence[Mapping], chosen: Mapping | None, baseline_bytes: int, title: str,
                     path: Path | BinaryIO) -> Path | BinaryIO:  # fmt: skip
    """``points``: every evaluated trial as ``{"source", "label", "size_bytes", "degradation"}`` (search split);
    ``chosen``: ``{"size_bytes", "search_degradation", "report_degradation", "report_split"}`` or None."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    sources = list(SOURCE_COLOURS) + sorted({p["source"] for p in points} - set(SOURCE_COLOURS))
    for source in sources:
        sel = [p for p in points if p["source"] == source]
        if sel:
            ax.scatter([p["size_bytes"] / 1e6 for p in sel], [100 * p["degradation"] for p in sel], s=16,
                       color=SOURCE_COLOURS.get(source, "tab:purple"), label=f"{source} ({len(sel)})", zorder=2)  # fmt: skip
    for p in points:
        if p["source"] == "uniform":
            ax.annotate(p["label"].split(":", 1)[-1], (p["size_bytes"] / 1e6, 100 * p["degradation"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)  # fmt: skip
    if chosen is not None:
        x = chosen["size_bytes"] / 1e6
        ax.scatter([x], [100 * chosen["search_degradation"]], marker="*", s=260, color="tab:red", edgecolor="k",
                   zorder=4, label="chosen plan (search split)")  # fmt: skip
        if chosen.get("report_degradation") is not None:
            ax.scatter([x], [100 * chosen["report_degradation"]], marker="*", s=260, facecolor="none",
                       edgecolor="tab:red", linewidth=1.5, zorder=4,
                       label=f"chosen plan ({chosen['report_split']} split)")  # fmt: skip
            ax.plot([x, x], [100 * chosen["search_degradation"], 100 * chosen["report_degradation"]], ":",
                    color="tab:red", zorder=3)  # fmt: skip
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("degradation vs the baseline (%)")
    mb = baseline_bytes / 1e6
    inv = lambda v: mb / np.maximum(v, 1e-9)  # noqa: E731  (size MB <-> compression, its own inverse)
    top = ax.secondary_xaxis("top", functions=(inv, inv))
    top.set_xlabel("compression (x)")
    return _finish(fig, ax, title, path)


def plot_front(
    points: Sequence[Mapping],
    entries: Sequence[Mapping],
    size_key: str,
    title: str,
    path: Path | BinaryIO,
    loss_key: str = "perplexity",
) -> Path | BinaryIO:
    """Size (MB) vs the search-split loss a study minimises (``loss_key``: ``perplexity``, or ``kld_mean``):
    ``points`` (every trial's search record, with ``enqueued_as``), the candidates (``entries``) as a line, and the
    reference plans labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter([p[size_key] / 1e6 for p in points], [p[loss_key] for p in points], s=12, color="0.7",
               label=f"trials ({len(points)})")  # fmt: skip
    front = sorted(entries, key=lambda e: e["search"][size_key])
    ax.plot([e["search"][size_key] / 1e6 for e in front], [e["search"][loss_key] for e in front], "o-",
            color="tab:red", markersize=5, label="candidates: Pareto set / top-k (search split)")  # fmt: skip
    refs = [p for p in points if p.get("enqueued_as")]
    for p in refs:
        x, y = p[size_key] / 1e6, p[loss_key]
        ax.scatter([x], [y], marker="s", s=36, color="tab:blue", zorder=3)
        ax.annotate(p["enqueued_as"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if refs:
        ax.scatter([], [], marker="s", color="tab:blue", label="uniform / enqueued plans")
    if loss_key == "perplexity":
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (search split)")
    else:  # the baseline's KL is 0: linear near it
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylabel("mean KL(baseline || plan), nats per token (search split)")
    ax.set_xlabel(f"{size_key.removesuffix('_bytes').replace('_', ' ')} (MB)")
    return _finish(fig, ax, title, path)


def plot_interactions(rows: Sequence[Mapping], title: str, path: Path | BinaryIO) -> Path | BinaryIO:
    """Predicted (additive) vs measured degradation per evaluated plan, coloured by source, with the diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for source in sorted({r["source"] for r in rows}):
        sel = [r for r in rows if r["source"] == source]
        ax.scatter([100 * r["predicted_degradation"] for r in sel], [100 * r["measured_degradation"] for r in sel],
                   s=14, color=SOURCE_COLOURS.get(source, "tab:purple"), label=f"{source} ({len(sel)})")  # fmt: skip
    lo = min(0.0, *(100 * min(r["predicted_degradation"], r["measured_degradation"]) for r in rows))
    hi = max(100 * max(r["predicted_degradation"], r["measured_degradation"]) for r in rows)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("predicted degradation, additive model (%)")
    ax.set_ylabel("measured degradation (%)")
    return _finish(fig, ax, title, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, title: str, path: Path | BinaryIO) -> Path | BinaryIO:
    """Title, grid and legend; save ``path`` (a PNG file at 120 dpi, or SVG to a binary stream); close the figure."""
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # an empty plot (a study stopped before any trial) has no legend
        ax.legend(fontsize=8)
    fig.tight_layout()
    if isinstance(path, (str, Path)):
        fig.savefig(path, dpi=120)
    else:  # a binary stream: SVG with its text as text (svg_of)
        with _pyplot().rc_context({"svg.fonttype": "none", "svg.hashsalt": "qsweep"}):
            fig.savefig(path, format="svg")
    fig.clf()
    _pyplot().close(fig)
    return path
