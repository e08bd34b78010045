"""``report.html``: one self-contained page per study (no network: plots inline as SVG, styles inline).

Written at the end of every study and on Ctrl-C (then from the trials so far, with the resume command), and rebuilt
by ``python -m qsweep.report RUN_DIR`` (from the run directory's ``results.json`` and the study it names) or
``python -m qsweep.report --storage URL --study NAME [--out DIR]`` (from the study alone: the app stores its results
in the study's user attribute ``results``). Sections, each an element with an ``id``:

* ``verdict``: the chosen plan vs the best uniform plan on the report split, with the paired 95% interval;
* ``front``: size (MB and compression) vs degradation, every trial by where it came from, the uniform plans
  labelled, the chosen plan marked with its report-split point beside it; the candidates' table below;
* ``plans``: the chosen plan and the best uniform plan as grids of blocks x components coloured by format;
* ``sensitivity``: the table's cost per unit and format (measured where a trial measured that one-unit change),
  and predicted vs measured degradation of every evaluated plan;
* ``study``: identity (model, data, protocol, menu, size metric, baseline), the budget spent by phase, and the
  commands that reproduce the study and export its plan. Local paths are not written: the run directory is shown
  as ``<run dir>``, any other absolute path as ``<key>``.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

import optuna

from qsweep.errors import ConfigError, one_line_errors
from qsweep.formats import get_format
from qsweep.plots import plot_interactions, plot_study_front, svg_of
from qsweep.score import Degradation, size_key
from qsweep.search.objective import trial_cost
from qsweep.search.phases import interactions
from qsweep.search.select import evaluated_trials, source_of
from qsweep.search.sensitivity_table import SensitivityTable
from qsweep.search.storage import display_url, is_new_storage_file, open_storage

__all__ = ["PAGE", "budget_by_phase", "main", "plan_grid", "render_page", "write_page"]

PAGE = "report.html"
_BLOCK = re.compile(r"^(.*?)(\d+)\.(.+)$")  # h.3.attn, model.layers.3.self_attn: (prefix, block, component)
_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}table{border-collapse:collapse;
margin:8px 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;text-align:right}th{background:#f4f4f4}
td.f{text-align:center;font-family:monospace}.verdict{font-size:16px;padding:10px;background:#f6f8fa;border-left:
4px solid #2a7}.bad{border-left-color:#c33}code{background:#f4f4f4;padding:1px 4px}.note{color:#666}"""
_PALETTE = ["#1a9850", "#66bd63", "#a6d96a", "#d9ef8b", "#fee08b", "#fdae61", "#f46d43", "#d73027", "#a50026"]


def _e(x) -> str:
    return html.escape(str(x))


def _num(x, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _bits(fmt: str) -> float:
    """Bits per parameter of ``fmt`` on a 256 x 256 weight (scales included): the colour scale's order."""
    return 8 * get_format(fmt).packed_bytes((256, 256), 0) / 256**2


def _colours(formats) -> dict[str, str]:
    order = sorted(set(formats), key=_bits, reverse=True)
    return {f: _PALETTE[min(len(_PALETTE) - 1, round(i * (len(_PALETTE) - 1) / max(1, len(order) - 1)))]
            for i, f in enumerate(order)}  # fmt: skip


def plan_grid(plan: Mapping[str, str]) -> tuple[list[str], list[tuple[str, dict[str, str]]], dict[str, str]]:
    """A plan laid out as (components, [(block, {component: format})], units outside the blocks)."""
    comps: dict[str, None] = {}
    blocks: dict[int, dict[str, str]] = {}
    other: dict[str, str] = {}
    for unit, fmt in plan.items():
        m = _BLOCK.match(unit)
        if m is None:
            other[unit] = fmt
            continue
        comps.setdefault(m.group(3))
        blocks.setdefault(int(m.group(2)), {})[m.group(3)] = fmt
    return list(comps), [(str(b), blocks[b]) for b in sorted(blocks)], other


def _grid_html(plan: Mapping[str, str], colours: Mapping[str, str], caption: str, role: str) -> str:
    comps, rows, other = plan_grid(plan)
    cell = lambda unit, f: (f'<td class="f" data-unit="{_e(unit)}" data-format="{_e(f)}" title="{_e(unit)}" '  # noqa: E731
                            f'style="background:{colours.get(f, "#eee")}">{_e(f)}</td>')  # fmt: skip
    out = [f'<table class="plan" data-plan="{role}"><caption>{_e(caption)}</caption><tr><th>block</th>']
    out += [f"<th>{_e(c)}</th>" for c in comps] + ["</tr>"]
    for block, fmts in rows:
        prefix = next(u for u in plan if (m := _BLOCK.match(u)) and m.group(2) == block)
        prefix = _BLOCK.match(prefix).group(1)
        out.append(f"<tr><th>{_e(block)}</th>")
        out += [cell(f"{prefix}{block}.{c}", fmts[c]) if c in fmts else "<td></td>" for c in comps]
        out.append("</tr>")
    if other:
        out.append(
            f'<tr><th>outside the blocks</th><td colspan="{max(1, len(comps))}" style="text-align:left">'
        )
        out += [f'<table style="display:inline-table;margin:0"><tr><th>{_e(u)}</th>{cell(u, f)}</tr></table> '
                for u, f in other.items()]  # fmt: skip
        out.append("</td></tr>")
    return "".join(out) + "</table>"


def _points(trials, metric: str, deg: Degradation) -> list[dict]:
    """Every evaluated trial, its degradation and fitness those of the study (``search.degradation``)."""
    return [{"trial": t.number, "label": t.user_attrs.get("enqueued_as", ""),
             "source": source_of(t.user_attrs.get("enqueued_as", "")),
             "size_bytes": t.user_attrs[size_key(metric)], "degradation": deg.value(t.user_attrs),
             "fitness": t.user_attrs[deg.fitness_key(metric)], "plan": json.loads(t.user_attrs["plan"])["units"],
             "bits_per_param": t.user_attrs.get("bits_per_param")}
            for t in evaluated_trials(trials) if deg.value(t.user_attrs) is not None]  # fmt: skip


def budget_by_phase(trials, table_cost: float) -> list[tuple[str, int, float]]:
    """(phase, trials, evaluations spent) for the sensitivity table and each source of trials, in order."""
    rows: dict[str, list] = {}
    for t in trials:
        # enqueued and not run yet, or running elsewhere: nothing spent
        if t.state.name in ("WAITING", "RUNNING"):
            continue
        r = rows.setdefault(source_of(t.user_attrs.get("enqueued_as", "")), [0, 0.0])
        r[0] += 1
        r[1] += trial_cost(t)
    order = ["uniform", "allocator", "sampler", "refine"]
    phases = [("sensitivity table", 0, table_cost)] if table_cost else []
    return phases + [
        (s, *rows[s]) for s in sorted(rows, key=lambda s: (order.index(s) if s in order else 9, s))
    ]


def _verdict(results: Mapping | None, interrupted: str | None, run_dir: Path | None) -> str:
    if interrupted:
        line, sep, command = interrupted.partition("Resume with: ")
        text = _scrub(line, run_dir, command=False) + sep + _scrub(command, run_dir)
        return f'<p class="verdict bad" id="verdict">{_e(text)}</p>'
    vs, best = results.get("best_vs_uniform"), results.get("best")
    split = results.get("report_split")
    if best is None:
        text, ok = "No plan was evaluated successfully.", False
    elif vs is None:
        text, ok = (
            "No comparison with a uniform plan (none evaluated or within search.max_degradation, or the baseline "
            "perplexity is pinned).",
            False,
        )
    elif vs["best_is_uniform"]:
        text, ok = f"The chosen plan is the uniform plan {vs['uniform']}: no mixed plan did better.", False
    else:
        fit = results["fitness"]
        lo, hi = vs["ci95"]
        ok = lo > 0
        word = "beats" if ok else ("loses to" if hi < 0 else "is not distinguishable from")
        text = (f"The chosen plan ({best['enqueued_as'] or 'sampler'}, trial {best['trial']}) {word} the best uniform "
                f"plan {vs['uniform']} on the {split} split: {fit} {vs[f'best_report_{fit}']:.4f} vs "
                f"{vs[f'uniform_report_{fit}']:.4f}, difference {vs['difference']:+.4f} (paired 95% CI "
                f"[{lo:+.4f}, {hi:+.4f}]).")  # fmt: skip
        user = vs.get("perplexity")
        if user is not None:  # a KL study: the user's fitness of the same two plans
            ulo, uhi = user["ci95"]
            text += (f" In the user's fitness (perplexity) the difference is {user['difference']:+.4f} (paired 95% "
                     f"CI [{ulo:+.4f}, {uhi:+.4f}]).")  # fmt: skip
    return f'<p class="verdict{"" if ok else " bad"}" id="verdict">{_e(text)}</p>'


def _sensitivity_html(
    table: SensitivityTable | None, points: Sequence[Mapping], trials, deg: Degradation
) -> str:
    if table is None:
        return '<section id="sensitivity"><h2>Sensitivity</h2><p class="note">No sensitivity table (the study ran ' \
               "without a warm start).</p></section>"  # fmt: skip
    searchable = [u for u, c in table.choices().items() if len(c) > 1]
    formats = list(dict.fromkeys(f for u in searchable for f in table.choices()[u]))
    base = dict(table.base_plan.formats)
    measured = {}
    for p in points:  # a trial that measured a one-unit change from the table's base plan
        diff = [u for u in base if p["plan"].get(u) != base[u]]
        if len(diff) == 1:
            measured[(diff[0], p["plan"][diff[0]])] = p["degradation"]
    kind = "measured" if table.kind == "measured" else f"predicted ({table.kind})"
    what = "KL degradation, exp(mean KL) - 1," if deg.kld else "Degradation"
    out = ['<section id="sensitivity"><h2>Sensitivity</h2>',
           f"<p>{what} (%) of the base plan with one unit changed, {_e(kind)}, on {table.n_tokens} tokens of "
           f"{_e(table.split)}; cost {table.cost_evals:.2f} evaluations. A second number is a trial's measurement of "
           "that one-unit plan.</p>", '<table id="sensitivity-table"><tr><th>unit</th>']  # fmt: skip
    out += [f"<th>{_e(f)}</th>" for f in formats] + ["</tr>"]
    for u in searchable:
        out.append(f"<tr><th>{_e(u)}</th>")
        for f in formats:
            if f not in table.choices()[u]:
                out.append("<td></td>")
                continue
            pred = 100 * math.expm1(table.delta(u, f))
            meas = measured.get((u, f))
            shade = min(1.0, math.log10(1 + max(0.0, pred)) / 2)  # 0% white .. 100% red
            text = f"{pred:.2f}" + ("" if meas is None else f" / {100 * meas:.2f}")
            out.append(f'<td data-unit="{_e(u)}" data-format="{_e(f)}" data-predicted="{pred:.6g}" '
                       f'style="background:rgba(215,48,39,{shade:.2f})">{text}</td>')  # fmt: skip
        out.append("</tr>")
    out.append("</table>")
    rows = interactions(trials, table, deg)
    if rows:
        out.append(svg_of(plot_interactions, rows, "predicted vs measured degradation, every evaluated plan"))
    return "".join(out) + "</section>"


_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s]+:)[^@\s]+@")  # scheme://user:PASSWORD@
# a word a shell takes as it is (< > only as qsweep writes them); a path from the root or home, not inside a word
_PLAIN = re.compile(r"[\w@%+=:,./<>~*\[\]-]+")
_ABSOLUTE = re.compile(r"(?<![\w.:/<>])(?:~|/)[^\s'\"(),]+")


def _scrub(text: str, run_dir: Path | None, command: bool = True) -> str:
    """``text`` with no local path and no password: the run directory shown as ``<run dir>``, in a ``command``
    ``key=<absolute path or file URL>`` as ``key=<key>``, any other absolute path as ``<local path>``, and a URL's
    password as ``***``."""
    text = _PASSWORD.sub(r"\1***@", text)
    here = (
        str(run_dir)
        if run_dir is not None and Path(run_dir).is_absolute() and len(str(run_dir)) > 1
        else None
    )
    try:
        words = shlex.split(text) if command else None
    except ValueError:  # unbalanced quotes: not a command
        words = None
    if words is None:
        return _ABSOLUTE.sub("<local path>", text.replace(here, "<run dir>") if here else text)
    out = []
    for word in words:
        if here and here in word:
            out.append(word.replace(here, "<run dir>"))
            continue
        key, eq, value = word.partition("=")
        local = value.startswith(("/", "~")) or re.match(r"[a-z]+:///?[/~]", value)
        out.append(f"{key}=<{key.lstrip('+')}>" if eq and local else _ABSOLUTE.sub("<local path>", word))
    return " ".join(w if _PLAIN.fullmatch(w) else shlex.quote(w) for w in out)


def _study_html(results: Mapping | None, trials, table_cost: float, run_dir: Path | None) -> str:
    r = results or {}
    ident = dict(r.get("identity") or {})
    rows = [*ident.items(), ("sampler / objective / seed", f"{r.get('sampler')} / {r.get('objective')} / {r.get('seed')}"),
            ("splits (search / report)", f"{r.get('search_split')} / {r.get('report_split')}"),
            ("baseline perplexity", ", ".join(f"{k} {v:.4f}" for k, v in (r.get("baseline_perplexity") or {}).items())),
            ("baseline size", f"{r['baseline_size_bytes']:,} bytes" if r.get("baseline_size_bytes") else "-")]  # fmt: skip
    out = ['<section id="study"><h2>The study</h2><table id="identity">']
    out += [f'<tr><th style="text-align:left">{_e(k)}</th><td style="text-align:left">{_e(_scrub(str(v), run_dir, command=False))}'
            "</td></tr>" for k, v in rows]  # fmt: skip
    out.append('</table><h3>Budget spent by phase (full evaluations of the search split)</h3><table id="budget">'
               "<tr><th>phase</th><th>trials</th><th>evaluations</th></tr>")  # fmt: skip
    phases = budget_by_phase(trials, table_cost)
    out += [f"<tr><th>{_e(p)}</th><td>{n}</td><td>{c:.3f}</td></tr>" for p, n, c in phases]
    total = sum(c for _, _, c in phases)
    budget = r.get("n_trials")
    out.append(f"<tr><th>total</th><td>{sum(n for _, n, _ in phases)}</td><td>{total:.3f}</td></tr></table>"
               f"<p>Budget <code>search.n_trials</code>: {_e(budget if budget is not None else '-')} evaluations; "
               f"{r.get('n_trials_pruned', 0)} trials dropped by racing, {r.get('n_duplicates', 0)} duplicates "
               "(answered from the study, free).</p>")  # fmt: skip
    commands = [(k, _scrub(r[c], run_dir)) for k, c in (("reproduce (a new study)", "command"),
                                                          ("resume or extend this study", "resume_command")) if r.get(c)]  # fmt: skip
    if r.get("best") is not None:
        commands += [("export the chosen plan for llama.cpp (GGUF formats only)",
                      "python -m qsweep +export=gguf plan_file=<run dir>/best_plan.yaml export.path=exports"),
                     ("export it for vLLM (compressed-tensors; Llama/OPT models)",
                      "python -m qsweep +export=compressed plan_file=<run dir>/best_plan.yaml export.path=exports")]  # fmt: skip
    out.append("<h3>Commands</h3><ul>")
    out += [f"<li>{_e(k)}: <code>{_e(v)}</code></li>" for k, v in commands]
    return "".join(out) + "</ul></section>"


def _front_html(
    results: Mapping | None, points: Sequence[Mapping], metric: str, baseline_bytes: int, deg: Degradation
) -> str:
    best = (results or {}).get("best")
    chosen = None
    if best is not None:
        chosen = {"size_bytes": best["report"][size_key(metric)], "report_split": results["report_split"],
                  "search_degradation": deg.value(best["search"]),
                  "report_degradation": deg.value(best["report"])}  # fmt: skip
    out = [
        '<section id="front"><h2>The front</h2>',
        svg_of(
            plot_study_front, points, chosen, baseline_bytes, f"{len(points)} evaluated plans, {metric} sizes"
        ),
    ]
    cands = (results or {}).get("candidates") or []
    if cands:
        fit = results["fitness"]
        out.append(f'<table id="candidates"><tr><th>trial</th><th>from</th><th>{metric} size (bytes)</th>'
                   f"<th>compression</th><th>search {fit}</th><th>report {fit}</th><th>report {deg.name} degradation (%)</th>"
                   "</tr>")  # fmt: skip
        for c in sorted(cands, key=lambda c: c["search"][size_key(metric)]):
            mark = " (chosen)" if best is not None and c["trial"] == best["trial"] else ""
            loss = deg.value(c["report"])
            out.append(f'<tr data-trial="{c["trial"]}"><td>{c["trial"]}{mark}</td><td>{_e(c["enqueued_as"] or "sampler")}'
                       f'</td><td>{c["search"][size_key(metric)]}</td><td>{_num(c["report"][f"compression_{metric}"], ".3f")}'
                       f'</td><td>{_num(c["search"][fit])}</td><td>{_num(c["report"][fit])}</td>'
                       f"<td>{_num(None if loss is None else 100 * loss, '.2f')}</td></tr>")  # fmt: skip
        out.append("</table>")
    return "".join(out) + "</section>"


def _plans_html(results: Mapping | None, points: Sequence[Mapping], metric: str) -> str:
    out = ['<section id="plans"><h2>The plans</h2>']
    best = (results or {}).get("best")
    uniform = [p for p in points if p["source"] == "uniform"]
    top_uniform = max(uniform, key=lambda p: p["fitness"]) if uniform else None
    plans = [p["plan"] for p in points] + ([best["plan"]] if best else [])
    colours = _colours(f for plan in plans for f in plan.values())
    if best is not None:
        rec = best["report"]
        out.append(_grid_html(best["plan"], colours, f"chosen plan (trial {best['trial']}, {best['enqueued_as'] or 'sampler'}): "
                              f"{rec['bits_per_param']:.3f} bits per parameter, {rec[size_key(metric)]:,} bytes "
                              f"({rec[f'compression_{metric}']:.3f}x)", "chosen"))  # fmt: skip
    if top_uniform is not None:
        bits = top_uniform["bits_per_param"]
        out.append(_grid_html(top_uniform["plan"], colours, f"best uniform plan ({top_uniform['label']}, trial "
                              f"{top_uniform['trial']}): {_num(bits, '.3f')} bits per parameter, "
                              f"{top_uniform['size_bytes']:,} bytes", "uniform"))  # fmt: skip
    if best is None and top_uniform is None:
        out.append('<p class="note">No plan evaluated.</p>')
    return "".join(out) + "</section>"


def render_page(results: Mapping | None, trials, table: SensitivityTable | None, *, title: str,
                metric: str, baseline_bytes: int, run_dir: Path | None = None,
                interrupted: str | None = None, degradation: str = "perplexity") -> str:  # fmt: skip
    """The page (module docstring) of a study's ``results`` (results.json's content; None: not finished) and its
    trials; ``interrupted``: the line saying where an interrupted study stopped and how to resume it;
    ``degradation``: the study's (``search.degradation``)."""
    deg = Degradation(degradation)
    points = _points(trials, metric, deg)
    table_cost = table.cost_evals if table is not None else 0.0
    body = [f"<h1>{_e(title)}</h1>", _verdict(results, interrupted, run_dir),
            _front_html(results, points, metric, baseline_bytes, deg),
            _plans_html(results, points, metric), _sensitivity_html(table, points, trials, deg),
            _study_html(results, trials, table_cost, run_dir)]  # fmt: skip
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")  # fmt: skip


def write_page(out_dir: Path, results: Mapping | None, study: optuna.Study, *, metric: str, baseline_bytes: int,
               interrupted: str | None = None) -> Path:  # fmt: skip
    """Write ``out_dir/report.html`` for ``study`` (its trials and stored sensitivity table) and ``results``."""
    raw = study.user_attrs.get("sensitivity")
    table = None if raw is None else SensitivityTable.from_dict(raw, f"study {study.study_name!r}")
    degradation = (study.user_attrs.get("identity") or {}).get("degradation", "perplexity")
    page = render_page(results, study.get_trials(deepcopy=False), table, title=study.study_name, metric=metric,
                       baseline_bytes=baseline_bytes, run_dir=out_dir, interrupted=interrupted,
                       degradation=degradation)  # fmt: skip
    path = Path(out_dir) / PAGE
    tmp = path.with_name(PAGE + ".partial")
    tmp.write_text(page)
    tmp.replace(path)
    return path


@one_line_errors("qsweep.report")
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qsweep.report", description="Rebuild a study's report.html.")
    ap.add_argument("run_dir", nargs="?", help="a run directory with results.json (and the study it names)")
    ap.add_argument("--storage", help="the study's storage URL (default: results.json's)")
    ap.add_argument("--study", help="the study's name (default: results.json's)")
    ap.add_argument("--out", help="where report.html goes (default: the run directory, or .)")
    args = ap.parse_args(argv)
    results = None
    if args.run_dir:
        path = Path(args.run_dir) / "results.json"
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: pass a run directory of a finished study, or --storage and "
                              "--study")  # fmt: skip
        results = json.loads(path.read_text())
    elif not (args.storage and args.study):
        raise ConfigError("pass a run directory, or --storage URL and --study NAME")
    storage = args.storage or results["storage"]
    if "***" in storage:  # results.json shows a password masked: the real URL comes from the environment
        storage = os.environ.get("QSWEEP_STORAGE_URL") or storage
    name = args.study or results["study_name"]
    if is_new_storage_file(storage):
        raise ConfigError(f"no study storage at {display_url(storage)}")
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        raise ConfigError(f"no study {name!r} in {display_url(storage)}") from None
    results = results or study.user_attrs.get("results")
    if results is None:
        raise ConfigError(f"study {name!r} holds no results (it never finished): run it to the end first")
    out = Path(args.out or args.run_dir or ".")
    out.mkdir(parents=True, exist_ok=True)
    page = write_page(out, results, study, metric=results["size_metric"],
                      baseline_bytes=results["baseline_size_bytes"])  # fmt: skip
    print(page)
    return 0
