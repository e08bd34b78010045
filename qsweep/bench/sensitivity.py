"""Benchmark: the cost of sensitivity tables and how well the one-pass proxy ranks like the measured table.

    python -m qsweep.bench.sensitivity                       # bundled model, validation split, conf defaults
    python -m qsweep.bench.sensitivity --out DIR eval.device=cpu eval.max_tokens=8192

Extra arguments are Hydra overrides of the main config. Prints a Markdown table: the measured table computed without
and with the cached prefix (wall time, full-evaluation equivalents, block forwards, the largest difference between
the two), and the proxy per Fisher estimator and number of batches (cost in full evaluations, Spearman rank
correlation with the measured deltas, median ratio proxy / measured). Every (unit, format) is quantized once before
the timings, so no row pays for filling the quantized-weight cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from qsweep.config import compose_config
from qsweep.errors import one_line_errors
from qsweep.search.sensitivity import measured_table, proxy_table, rank_correlation
from qsweep.search.space import SearchSpace
from qsweep.session import EvalSession


def _ratio(proxy, measured) -> float:
    """Median proxy / measured over rows the measurement resolves (delta > 1e-3)."""
    r = [
        proxy.delta(m.unit, m.format) / m.delta_nll_per_token
        for m in measured.rows
        if m.delta_nll_per_token > 1e-3
    ]
    return statistics.median(r) if r else float("nan")


def _within_formats(proxy, measured) -> tuple[float, float]:
    """The lowest and highest Spearman correlation over units within one format (each non-base format)."""
    from scipy.stats import spearmanr

    by_fmt: dict[str, list[tuple[float, float]]] = {}
    for m in measured.rows:
        if m.format != measured.base_plan[m.unit]:
            by_fmt.setdefault(m.format, []).append((m.delta_nll_per_token, proxy.delta(m.unit, m.format)))
    rho = [float(spearmanr(*zip(*v, strict=True)).statistic) for v in by_fmt.values() if len(v) > 2]
    return min(rho), max(rho)


@one_line_errors("qsweep.bench.sensitivity")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the tables (JSON + CSV) here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4], help="proxy subsets (first N batches)")
    args, overrides = ap.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = EvalSession(cfg := compose_config(overrides))
    space = SearchSpace.from_menu(s.table, cfg.precision.menu)
    for u, c in space.choices.items():  # warm the quantized-weight cache
        for f in c:
            for p in s.table[u].params:
                s.applier.quantized(p.name, p.channel_dim, f)
    split = cfg.eval.search_split
    s.baseline(split)  # warm-up
    ref = statistics.median(s.evaluate(s.baseline_plan, split).seconds for _ in range(5))
    uncached = measured_table(s, space, prefix_cache=False)
    cached = measured_table(s, space)
    diff = max(
        abs(a.delta_nll_per_token - b.delta_nll_per_token)
        for a, b in zip(uncached.rows, cached.rows, strict=True)
    )
    ev = s.evaluator(split)
    print(f"device {s.device}, split {split}: {cached.n_tokens} tokens, {ev.n_batches} batches, "
          f"{len(space.searchable)} searchable units, full evaluation {ref:.3f} s (median of 5)")  # fmt: skip
    print("\n| table | seconds | full evals | block forwards | note |\n| --- | --- | --- | --- | --- |")
    for name, t in (("measured, uncached", uncached), ("measured, cached prefix", cached)):
        bf = t.info.get("block_forwards", cached.info["block_forwards_uncached"])
        print(
            f"| {name} | {t.seconds:.2f} | {t.cost_evals:.1f} | {bf} | {t.info['n_evaluations']} evaluations |"
        )
    print(f"\nlargest |delta| difference cached vs uncached: {diff:.3g} nats/token; "
          f"saving {1 - cached.seconds / uncached.seconds:.1%} of wall time, "
          f"{1 - cached.info['block_forwards'] / cached.info['block_forwards_uncached']:.1%} of block forwards")  # fmt: skip
    print("\n| proxy | batches | seconds | full evals | Spearman vs measured | within one format | "
          "median proxy/measured |\n| --- | --- | --- | --- | --- | --- | --- |")  # fmt: skip
    proxies = {}
    for fisher in ("rademacher", "batch"):
        for nb in [*args.batches, None]:
            if nb is not None and nb >= ev.n_batches:
                continue
            p = proxy_table(s, space, max_batches=nb, fisher=fisher, full_eval_seconds=ref)
            proxies[(fisher, nb)] = p
            lo, hi = _within_formats(p, cached)
            print(f"| {fisher} | {p.info['batches']}/{ev.n_batches} | {p.seconds:.2f} | {p.cost_evals:.2f} | "
                  f"{rank_correlation(cached, p):.3f} | {lo:.3f}-{hi:.3f} | {_ratio(p, cached):.2f} |")  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        cached.save(args.out / "measured.json")
        cached.write_csv(args.out / "measured.csv")
        p = proxies[("rademacher", None)]
        p.save(args.out / "proxy.json")
        p.write_csv(args.out / "proxy.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
