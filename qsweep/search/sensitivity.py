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
  Why this one and not ModelOpt's output-space score ``sum_t ((dL/dY) (Y_q - Y))**2``: it needs no extra forward
  per format and layer (the output-space score re-runs every layer once per format), it covers every parameter
  kind the same way (embeddings, biases, norms, a tied head) with no per-module code, and it is already in the
  measured table's units (change in mean per-token NLL, first-order term included since both are taken on the
  same tokens), so it needs no calibration to be compared with or stand in for measured rows. Its weakness is the
  diagonal: error correlations within a tensor are ignored, which matters most at 2-3 bits. On the bundled model
  (validation split, lowbit menu; ``python -m qsweep.bench.sensitivity``) it ranks the 156 measured rows with
  Spearman 0.986 (0.94-0.998 within each format) and overestimates them by a median factor of 1.3, for the cost of
  about 5 full evaluations against about 120 for the measured table.

The record (rows, sizes, JSON/CSV) is :mod:`qsweep.search.sensitivity_table`, re-exported here. There is one row
per (unit, format) of the space, fixed units and the base format (delta 0 by definition) included, so a table
alone gives every size an allocator needs. ``cost_evals``: the table's cost in full evaluations of the split,
counted by work (the same on any machine and load); ``info["wall_evals"]``: its wall time in evaluations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from qsweep.apply import PlanApplier
from qsweep.evaluate import Evaluator
from qsweep.memory import activation_bytes, large_tensors_outside_the_heap, proxy_pass_tokens
from qsweep.plan import Plan
from qsweep.prefix import PrefixRunner
from qsweep.search.sensitivity_table import (
    KINDS,
    SensitivityError,
    SensitivityRow,
    SensitivityTable,
    rank_correlation,
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

FISHER_ESTIMATORS = ("rademacher", "batch")
# Activations a backward pass may keep before its decoder layers and logits are recomputed instead (checkpointing).
CHECKPOINT_ABOVE_BYTES = 2**30


def _needs_checkpointing(evaluator: Evaluator, model) -> bool:
    """Whether one proxy pass would keep more than CHECKPOINT_ABOVE_BYTES of activations without checkpointing."""

    tokens = min(
        proxy_pass_tokens(evaluator.device),
        max(evaluator.batch_inputs(i).numel() for i in range(evaluator.n_batches)),
    )
    dtype = next(model.parameters()).dtype
    layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", 1)
    # without checkpointing every layer keeps its activations, and every chunk of logits its softmax
    kept = (
        layers * activation_bytes(model.config, tokens, dtype, logits_rows=0)
        + 3 * tokens * model.config.vocab_size * 4
    )
    return kept > CHECKPOINT_ABOVE_BYTES


def proxy_cost_evals(tokens: int, eval_tokens: int, fisher: str, checkpointed: bool) -> float:
    """The proxy table's cost in full evaluations, counted by work (the same on any machine and load): the share of
    the split's scored tokens it reads, times one forward plus, per backward pass (``rademacher``: 2, ``batch``: 1),
    2 forward-equivalents and one more when layers are recomputed (checkpointing). Measured on a SmolLM2-135M shape
    on 2 CPU cores: 7.0 by this count, 7.3 by the wall clock."""
    backward = 2 if fisher == "rademacher" else 1
    return tokens / eval_tokens * (1 + backward * (2 + int(checkpointed)))


def sensitivity_base(space: SearchSpace, baseline: Plan) -> Plan:
    """The plan rows depart from: each unit in the baseline's format where its menu allows it, else (fixed units,
    or a menu without the baseline's format) in its first menu format."""
    return Plan({u: baseline[u] if baseline[u] in c else c[0] for u, c in space.choices.items()})


def _check_base(space: SearchSpace, base_plan: Plan) -> None:
    bad = [u for u, c in space.choices.items() if base_plan[u] not in c]
    if bad:
        raise SensitivityError(
            f"base plan puts unit {bad[0]!r} in {base_plan[bad[0]]!r}, which its menu does not allow "
            f"({', '.join(space.choices[bad[0]])}); use sensitivity_base(space, baseline)"
        )


def _rows(applier: PlanApplier, space: SearchSpace, base_plan: Plan, deltas: Mapping) -> tuple:
    table = applier.table
    return tuple(
        SensitivityRow(u, f, 0.0 if f == base_plan[u] else deltas[(u, f)], *unit_bytes(table[u], f))
        for u, c in space.choices.items()
        for f in c
    )


def measure_sensitivity(
    applier: PlanApplier,
    evaluator: Evaluator,
    space: SearchSpace,
    base_plan: Plan,
    *,
    split: str = "",
    prefix_cache: bool = True,
    progress: Callable[[str, str, float], None] | None = None,
) -> SensitivityTable:
    """Measure every (searchable unit, format) of ``space`` as a one-unit change from ``base_plan``.

    ``prefix_cache`` starts each forward at the unit's first block (exact; see qsweep.prefix); off, every plan is
    a full evaluation (for checking and timing). ``progress(unit, format, delta)`` is called after each row.
    Leaves ``base_plan`` applied.
    """
    _check_base(space, base_plan)
    model = applier.model
    start = time.perf_counter()
    applier.apply_(base_plan)
    base = evaluator.evaluate(model)
    if not base.ok:
        raise RuntimeError(f"the base plan fails to evaluate: {base.error}")
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
        deltas[(u, f)] = (res.nll_sum - base.nll_sum) / base.n_tokens if res.ok else math.inf
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
        rows=_rows(applier, space, base_plan, deltas),
        cost_evals=cost,
        seconds=seconds,
        base_perplexity=base.perplexity,
        info=info,
    )


def proxy_sensitivity(
    applier: PlanApplier,
    evaluator: Evaluator,
    space: SearchSpace,
    base_plan: Plan,
    *,
    split: str = "",
    max_batches: int | None = None,
    max_tokens: int | None = None,
    full_eval_seconds: float | None = None,
    fisher: str = "rademacher",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SensitivityTable:
    """Score every (unit, format) of ``space`` from one forward+backward pass (see module docstring).

    Uses the evaluator's first ``max_batches`` batches (all by default), and of them the first windows that hold
    ``max_tokens`` scored tokens (all by default), in backward passes of at most :func:`~qsweep.memory.proxy_pass_tokens` tokens. The cost
    is counted by work (:func:`proxy_cost_evals`); ``full_eval_seconds`` (one full evaluation of the split, when the
    caller has it) only adds the wall-clock equivalent to ``info`` (``wall_evals``). ``fisher``: ``rademacher`` or
    ``batch`` (module docstring); ``seed`` seeds the random signs. ``progress(tokens)`` is called after each pass
    with the scored tokens read so far.
    Leaves ``base_plan`` applied and every ``requires_grad`` flag as it was.
    """
    _check_base(space, base_plan)
    if fisher not in FISHER_ESTIMATORS:
        raise ValueError(f"unknown fisher estimator {fisher!r}; valid: {', '.join(FISHER_ESTIMATORS)}")
    model, table = applier.model, applier.table
    start = time.perf_counter()
    applier.apply_(base_plan)
    params = dict(model.named_parameters())
    owner = {p.name: (u, p.channel_dim) for u in space.searchable for p in table[u].params}
    moves = {u: [f for f in space.choices[u] if f != base_plan[u]] for u in space.searchable}
    flags = {n: p.requires_grad for n, p in params.items()}
    n_batches = evaluator.n_batches if max_batches is None else max(1, min(max_batches, evaluator.n_batches))
    device = next(iter(params.values())).device
    # per (unit, format): sum over passes of g.dW and of r^2.dW^2 (float64 scalars on the device, no sync)
    first = {(u, f): torch.zeros((), dtype=torch.float64, device=device) for u in moves for f in moves[u]}
    second = {k: torch.zeros_like(v) for k, v in first.items()}
    gen = torch.Generator().manual_seed(seed)
    nll_sum, n_tokens, n_passes = 0.0, 0, 0
    state = {"terms": ()}

    @torch.no_grad()
    def contract(p: torch.Tensor) -> None:
        """Fold one parameter's gradient into the (unit, format) sums as soon as backward makes it, then drop it:
        the gradients of the whole model never exist at once, nor does more than one quantized tensor. Each sum is
        a dot product of flat fp32 vectors (``sum(g^2 dW^2)`` is ``|g * dW|^2``), so a format costs its quantized
        weights and dW, temporaries of the parameter's size that never enter the plan cache."""
        name = names_of[id(p)]
        u, channel_dim = owner[name]
        grad = p.grad.detach().float().reshape(-1)
        w = p.detach().float().reshape(-1)
        p.grad = None
        for f in moves[u]:
            dw = applier.quantized(name, channel_dim, f, keep=False).float().reshape(-1).sub(w)
            if "first" in state["terms"]:
                first[(u, f)] += torch.dot(grad, dw)
            if "second" in state["terms"]:
                gdw = dw.mul_(grad)
                second[(u, f)] += torch.dot(gdw, gdw)
            del dw

    names_of = {id(params[n]): n for n in owner}
    hooks = []
    checkpoint = _needs_checkpointing(evaluator, model)
    pass_tokens = proxy_pass_tokens(evaluator.device)
    # on the CPU, large tensors are their own mappings meanwhile (see large_tensors_outside_the_heap)
    with large_tensors_outside_the_heap() if device.type == "cpu" else contextlib.nullcontext():
        try:
            for p in params.values():
                p.requires_grad_(False)
            for n in owner:
                params[n].requires_grad_(True)
                hooks.append(params[n].register_post_accumulate_grad_hook(contract))
            for i in range(n_batches):
                for rows in evaluator.batch_rows(i, pass_tokens):
                    if max_tokens is not None and n_tokens >= max_tokens:
                        break
                    nll = evaluator.batch_nll(model, i, rows, checkpoint=checkpoint)  # [M]
                    loss = nll.sum()
                    if fisher == "rademacher":
                        state["terms"] = ("first",)
                        loss.backward(retain_graph=True)
                        signs = (
                            torch.randint(0, 2, nll.shape, generator=gen, device="cpu").to(nll) * 2 - 1
                        )  # [M]
                        state["terms"] = ("second",)
                        (signs * nll).sum().backward()
                    else:
                        state["terms"] = ("first", "second")
                        loss.backward()
                    nll_sum += float(loss.detach())
                    n_tokens += nll.numel()
                    n_passes += 1
                    del nll, loss
                    if progress is not None:
                        progress(n_tokens)
        finally:
            for h in hooks:
                h.remove()
            for n, p in params.items():
                p.grad = None
                p.requires_grad_(flags[n])
    deltas = {k: float(first[k]) / n_tokens + 0.5 * float(second[k]) / n_tokens for k in first}
    seconds = time.perf_counter() - start
    return SensitivityTable(
        kind="proxy",
        base_plan=base_plan,
        split=split,
        n_tokens=n_tokens,
        rows=_rows(applier, space, base_plan, deltas),
        cost_evals=proxy_cost_evals(n_tokens, evaluator.n_tokens, fisher, checkpoint),
        seconds=seconds,
        base_perplexity=math.exp(nll_sum / n_tokens),
        info={
            "method": "weight-space Taylor: g.dW + 0.5 * diag(empirical Fisher).dW^2",
            "fisher": fisher,
            "batches": n_batches,
            "batches_total": evaluator.n_batches,
            "backward_passes": n_passes,
            "checkpointed": checkpoint,
            "full_eval_seconds": full_eval_seconds,
            "cost_model": "tokens read / the split's x (1 forward + per backward pass: 2, +1 recomputed forward "
            "when checkpointed)",
            "wall_evals": None if full_eval_seconds is None else seconds / full_eval_seconds,
        },
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
) -> SensitivityTable:
    """:func:`measure_sensitivity` on a session's model and ``split`` (default ``eval.search_split``), departing
    from the session's baseline plan (see :func:`sensitivity_base`). A compiled evaluator runs uncached.

    ``max_tokens``: measure on the split's first ``max_tokens`` tokens only (multi-fidelity: a noisier table at a
    fraction of the cost); the cost stays in full evaluations of the whole split (scaled by the tokens' share)."""
    split = _split(session, split)
    full = session.evaluator(split)
    ev = full if max_tokens is None or max_tokens >= full.n_tokens else full.first_tokens(int(max_tokens))
    base = sensitivity_base(space, session.baseline_plan)
    table = measure_sensitivity(
        session.applier,
        ev,
        space,
        base,
        split=split,
        prefix_cache=prefix_cache and not ev.compile,
        progress=progress,
    )
    if ev is full:
        return table
    share = ev.n_tokens / full.n_tokens
    return dataclasses.replace(table, cost_evals=table.cost_evals * share,
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
) -> SensitivityTable:
    """:func:`proxy_sensitivity` on a session's model and ``split`` (default ``eval.search_split``), departing
    from the session's baseline plan."""
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
    )
