"""Sensitivity tables: the loss change of every (unit, format) of a precision menu, one unit at a time.

One record type (:class:`SensitivityTable`) for two ways of filling it:

* ``measured`` (:func:`measure_sensitivity`): the exact perplexity of the base plan with one unit changed, for every
  searchable unit and every format on its menu. Units are visited block by block, and a plan that only changes
  block k and later starts its forward at block k from hidden states cached under the base plan
  (:class:`qsweep.prefix.PrefixRunner`); the cache advances one block at a time, so it costs one block's forward
  per block and holds one block's states.
* ``proxy`` (:func:`proxy_sensitivity`): one forward+backward pass over the split (or its first batches) scores
  every (unit, format) at once with the second-order Taylor expansion of the mean per-token NLL in weight space,
  ``dL ~= g . dW + 0.5 * F . dW**2``, where ``dW = Q_format(W) - W_base``, ``g`` is the gradient of the mean NLL at
  the base plan and ``F`` the diagonal empirical Fisher ``sum_t (grad nll_t)**2 / N`` (the Gauss-Newton stand-in
  for the Hessian; N scored tokens). Per-token gradients are too dear, so ``fisher="rademacher"`` (default) takes,
  per batch, the gradient ``R_b`` of ``sum_t s_t nll_t`` with random signs ``s_t = +-1``: ``E[R_b**2] =
  sum_{t in b} (grad nll_t)**2`` exactly, as the cross terms cancel in expectation. That is a second backward per
  backward pass (a batch, or a part of it: :func:`~qsweep.memory.proxy_pass_tokens`, 2,048 tokens on the CPU, 4,096
  on a GPU); ``fisher="batch"`` uses the plain pass gradient ``G_b**2`` instead (one backward, but biased upward by
  the within-pass cross terms: with one pass it is ``N * g**2``, so its values depend on the pass size, and so on
  the device).
  Its derivation, cost and measured quality: :mod:`qsweep.search.proxy`.

Tables of ``degradation="kld"`` (``search.degradation=kld``; qsweep.score.Degradation) hold the change in mean
per-token KL(baseline || plan) instead: measured, the KL of each one-unit plan from the same evaluations; proxy, the
model's own Fisher (:mod:`qsweep.search.proxy`).

The record (rows, sizes, JSON/CSV) is :mod:`qsweep.search.sensitivity_table`, re-exported here. There is one row
per (unit, format) of the space, fixed units and the base format (delta 0 by definition) included, so a table
alone gives every size an allocator needs. ``cost_evals``: the table's cost in full evaluations of the split,
counted by work (the same on any machine and load); ``info["wall_evals"]``: its wall time in evaluations.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

from qsweep.apply import PlanApplier
from qsweep.evaluate import Evaluator
from qsweep.plan import Plan
from qsweep.prefix import PrefixRunner
from qsweep.search.proxy import FISHER_ESTIMATORS, proxy_cost_evals, proxy_sensitivity
from qsweep.search.sensitivity_table import (
    KINDS,
    SensitivityError,
    SensitivityRow,
    SensitivityTable,
    check_base,
    rank_correlation,
    sensitivity_base,
    table_rows,
    unit_bytes,
)
from qsweep.search.space import SearchSpace

__all__ = [
    "FISHER_ESTIMATORS",
    "KINDS",
    "SensitivityError",
    "SensitivityRow",
    "SensitivityTable",
    "measure_sensitivity",
    "measured_table",
    "proxy_cost_evals",
    "proxy_sensitivity",
    "proxy_table",
    "rank_correlation",
    "sensitivity_base",
    "unit_bytes",
]


def measure_sensitivity(
    applier: PlanApplier,
    evaluator: Evaluator,
    space: SearchSpace,
    base_plan: Plan,
    *,
    split: str = "",
    prefix_cache: bool = True,
    progress: Callable[[str, str, float], None] | None = None,
    degradation: str = "perplexity",
) -> SensitivityTable:
    """Measure every (searchable unit, format) of ``space`` as a one-unit change from ``base_plan``.

    ``prefix_cache`` starts each forward at the unit's first block (exact; see qsweep.prefix); off, every plan is
    a full evaluation (for checking and timing). ``progress(unit, format, delta)`` is called after each row.
    ``degradation`` ``kld``: the rows hold the change in mean KL from the evaluator's reference (which it must
    have: qsweep.heads) instead of in mean NLL. Leaves ``base_plan`` applied.
    """
    check_base(space, base_plan)
    model = applier.model
    start = time.perf_counter()
    applier.apply_(base_plan)
    base = evaluator.evaluate(model)
    if not base.ok:
        raise RuntimeError(f"the base plan fails to evaluate: {base.error}")
    kld = degradation == "kld"
    if kld and base.token_kld is None:
        raise ValueError("a KL sensitivity table needs an evaluator holding the baseline's distribution")

    def loss(res) -> float:
        return float(res.token_kld.double().sum()) if kld else res.nll_sum

    runner = PrefixRunner(model, applier.table) if prefix_cache else None
    todo = [(u, f) for u in space.searchable for f in space.choices[u] if f != base_plan[u]]
    if runner is not None:
        todo.sort(key=lambda uf: runner.first_block(uf[0]))  # stable: table order within a block
    deltas: dict[tuple[str, str], float] = {}
    cache, n_blocks_run, full_seconds = None, 0, [base.seconds]
    for u, f in todo:
        if runner is not None and runner.first_block(u) > 0:
            k = runner.first_block(u)
            if cache is None or cache.block != k:
                applier.apply_(base_plan)
                n_blocks_run += k - (cache.block if cache is not None else 0)
                cache = runner.capture(evaluator, k, cache)
            n_blocks_run += runner.n_blocks - k
        elif runner is not None:
            n_blocks_run += runner.n_blocks
        applier.apply_(Plan({**base_plan.formats, u: f}))
        res = runner.evaluate(evaluator, cache) if runner is not None else evaluator.evaluate(model)
        deltas[(u, f)] = (loss(res) - loss(base)) / base.n_tokens if res.ok else math.inf
        if cache is None:
            full_seconds.append(res.seconds)
        if progress is not None:
            progress(u, f, deltas[(u, f)])
    applier.apply_(base_plan)
    seconds = time.perf_counter() - start
    # the cost unit: the median of this table's own full evaluations (the base, and block-0 units' rows)
    reference = statistics.median(full_seconds)
    info = {"n_evaluations": len(todo) + 1, "prefix_cache": prefix_cache, "full_eval_seconds": reference,
            "cost_model": "1 + the rows' decoder-block forwards / the model's blocks (each row without the prefix "
                          "cache: 1)", "wall_evals": seconds / reference}  # fmt: skip
    cost = 1.0 + len(todo)
    if runner is not None:
        info["block_forwards"] = n_blocks_run
        info["block_forwards_uncached"] = len(todo) * runner.n_blocks
        cost = 1.0 + n_blocks_run / runner.n_blocks
    return SensitivityTable(
        kind="measured",
        base_plan=base_plan,
        split=split,
        n_tokens=base.n_tokens,
        rows=table_rows(applier, space, base_plan, deltas),
        cost_evals=cost,
        seconds=seconds,
        base_perplexity=base.perplexity,
        info=info,
        degradation=degradation,
    )


# ---------------------------------------------------------------------- on an EvalSession
def _split(session, split: str | None) -> str:
    return split or session.eval_cfg.get("search_split") or "validation"


def measured_table(
    session,
    space: SearchSpace,
    split: str | None = None,
    *,
    prefix_cache: bool = True,
    max_tokens: int | None = None,
    progress: Callable[[str, str, float], None] | None = None,
    degradation: str = "perplexity",
) -> SensitivityTable:
    """:func:`measure_sensitivity` on a session's model and ``split`` (default ``eval.search_split``), departing
    from the session's baseline plan (see :func:`sensitivity_base`). A compiled evaluator runs uncached.

    ``max_tokens``: measure on the split's first ``max_tokens`` tokens only (multi-fidelity: a noisier table at a
    fraction of the cost); the cost stays in full evaluations of the whole split (scaled by the tokens' share).
    ``degradation`` ``kld``: rows of KL from the baseline's distribution (on a token subsample, the baseline is
    evaluated there first to record it: one more evaluation of the subsample, counted)."""
    split = _split(session, split)
    full = session.evaluator(split)
    ev = full if max_tokens is None or max_tokens >= full.n_tokens else full.first_tokens(int(max_tokens))
    extra = 0.0
    if degradation == "kld":
        if ev is full:
            session.baseline(split)  # records the split's reference (once per session)
        else:
            session.check_reference_fits(ev, f"{split} (first {ev.n_tokens} tokens)")
            session.applier.apply_(session.baseline_plan)
            ev.evaluate(session.applier.model, record_reference=True)
            extra = 1.0
    base = sensitivity_base(space, session.baseline_plan)
    table = measure_sensitivity(
        session.applier,
        ev,
        space,
        base,
        split=split,
        prefix_cache=prefix_cache and not ev.compile,
        progress=progress,
        degradation=degradation,
    )
    if ev is full:
        return table
    share = ev.n_tokens / full.n_tokens
    return dataclasses.replace(table, cost_evals=(table.cost_evals + extra) * share,
                               info={**table.info, "tokens": ev.n_tokens, "tokens_of_split": full.n_tokens})  # fmt: skip


def proxy_table(
    session,
    space: SearchSpace,
    split: str | None = None,
    *,
    max_batches: int | None = None,
    max_tokens: int | None = None,
    fisher: str = "rademacher",
    full_eval_seconds: float | None = None,
    progress: Callable[[int], None] | None = None,
    degradation: str = "perplexity",
) -> SensitivityTable:
    """:func:`proxy_sensitivity` on a session's model and ``split`` (default ``eval.search_split``), departing
    from the session's baseline plan; ``degradation`` ``kld``: the KL proxy (module docstring)."""
    split = _split(session, split)
    base = sensitivity_base(space, session.baseline_plan)
    return proxy_sensitivity(
        session.applier,
        session.evaluator(split),
        space,
        base,
        split=split,
        max_batches=max_batches,
        max_tokens=max_tokens,
        full_eval_seconds=full_eval_seconds,
        fisher=fisher,
        progress=progress,
        degradation=degradation,
    )
