"""The proxy sensitivity table: every (unit, format) of a precision menu scored from one forward+backward pass.

One forward+backward pass over the split (or its first batches) scores every (unit, format) at once with the
second-order Taylor expansion of the mean per-token NLL in weight space, ``dL ~= g . dW + 0.5 * F . dW**2``, where
``dW = Q_format(W) - W_base``, ``g`` is the gradient of the mean NLL at the base plan and ``F`` the diagonal
empirical Fisher ``sum_t (grad nll_t)**2 / N`` (the Gauss-Newton stand-in for the Hessian; N scored tokens).
Per-token gradients are too dear, so ``fisher="rademacher"`` (default) takes, per batch, the gradient ``R_b`` of
``sum_t s_t nll_t`` with random signs ``s_t = +-1``: ``E[R_b**2] = sum_{t in b} (grad nll_t)**2`` exactly, as the
cross terms cancel in expectation. That is a second backward per backward pass (a batch, or a part of it:
:func:`~qsweep.memory.proxy_pass_tokens`, 2,048 tokens on the CPU, 4,096 on a GPU); ``fisher="batch"`` uses the plain
pass gradient ``G_b**2`` instead (one backward, but biased upward by the within-pass cross terms: with one pass it is
``N * g**2``, so its values depend on the pass size, and so on the device).

Why this one and not ModelOpt's output-space score ``sum_t ((dL/dY) (Y_q - Y))**2``: it needs no extra forward
per format and layer (the output-space score re-runs every layer once per format), it covers every parameter
kind the same way (embeddings, biases, norms, a tied head) with no per-module code, and it is already in the
measured table's units (change in mean per-token NLL, first-order term included since both are taken on the
same tokens), so it needs no calibration to be compared with or stand in for measured rows. Its weakness is the
diagonal: error correlations within a tensor are ignored, which matters most at 2-3 bits. On the bundled model
(validation split, lowbit menu; ``python -m qsweep.bench.sensitivity``) it ranks the 156 measured rows with
Spearman 0.986 (0.94-0.998 within each format) and overestimates them by a median factor of 1.3, for the cost of
about 5 full evaluations against about 120 for the measured table.

Tables of ``degradation="kld"`` (``search.degradation=kld``; qsweep.score.Degradation) hold the change in mean
per-token KL(baseline || plan) instead. Measured: the KL of each one-unit plan, from the same evaluations. Proxy:
KL has no first-order term at the model it departs from (``E_{y~p}[grad log p(y)] = 0``), and its curvature is the
model's own Fisher information, ``KL ~= 0.5 * F_model . dW**2`` with ``F_model = sum_t E_{y~p_t}[(grad nll_t(y))**2]
/ N``: the same Rademacher pass with each token's label drawn from the base plan's own distribution instead of the
text's (qsweep.heads.score_batch ``sample_seed``), and no first backward, so it costs one backward pass less.

On the tiny test GPT-2 (tests/test_kld_search.py) the KL proxy ranks the measured KL rows with Spearman 0.98, and is
0.63-0.95 of them at INT4 (median 0.9).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch

from qsweep.apply import PlanApplier
from qsweep.evaluate import Evaluator
from qsweep.memory import activation_bytes, large_tensors_outside_the_heap, proxy_pass_tokens
from qsweep.plan import Plan
from qsweep.search.sensitivity_table import SensitivityTable, check_base, table_rows
from qsweep.search.space import SearchSpace

__all__ = ["CHECKPOINT_ABOVE_BYTES", "FISHER_ESTIMATORS", "proxy_cost_evals", "proxy_sensitivity"]

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


def proxy_cost_evals(
    tokens: int, eval_tokens: int, fisher: str, checkpointed: bool, degradation: str = "perplexity"
) -> float:
    """The proxy table's cost in full evaluations, counted by work (the same on any machine and load): the share of
    the split's scored tokens it reads, times one forward plus, per backward pass (``rademacher``: 2, ``batch``: 1;
    the KL table's one), 2 forward-equivalents and one more when layers are recomputed (checkpointing). Measured on
    a SmolLM2-135M shape on 2 CPU cores: 7.0 by this count, 7.3 by the wall clock."""
    backward = 1 if degradation == "kld" or fisher != "rademacher" else 2
    return tokens / eval_tokens * (1 + backward * (2 + int(checkpointed)))


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
    degradation: str = "perplexity",
) -> SensitivityTable:
    """Score every (unit, format) of ``space`` from one forward+backward pass (see module docstring).

    Uses the evaluator's first ``max_batches`` batches (all by default), in backward passes of at most
    :func:`~qsweep.memory.proxy_pass_tokens` tokens, until ``max_tokens`` scored tokens are read (all by default;
    the last pass is whole, so it may read past ``max_tokens``: the table's ``n_tokens`` says what it read). The cost
    is counted by work (:func:`proxy_cost_evals`); ``full_eval_seconds`` (one full evaluation of the split, when the
    caller has it) only adds the wall-clock equivalent to ``info`` (``wall_evals``). ``fisher``: ``rademacher`` or
    ``batch`` (module docstring); ``seed`` seeds the random signs. ``progress(tokens)`` is called after each pass
    with the scored tokens read so far. ``degradation``: ``perplexity`` (the text's NLL) or ``kld`` (KL from the base
    plan's distribution: the model's Fisher, ``rademacher`` only).
    Leaves ``base_plan`` applied and every ``requires_grad`` flag as it was.
    """
    check_base(space, base_plan)
    if fisher not in FISHER_ESTIMATORS:
        raise ValueError(f"unknown fisher estimator {fisher!r}; valid: {', '.join(FISHER_ESTIMATORS)}")
    kld = degradation == "kld"
    if kld and fisher != "rademacher":
        raise ValueError("the KL proxy needs fisher='rademacher' (its labels are drawn per token)")
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
                    # the KL table's labels come from the model (a seed per pass); the text's otherwise
                    sample = int(torch.randint(2**62, (), generator=gen)) if kld else None
                    nll = evaluator.batch_nll(
                        model, i, rows, checkpoint=checkpoint, sample_seed=sample
                    )  # [M]
                    loss = nll.sum()
                    if fisher == "rademacher":  # the KL table has no first-order term, so no first backward
                        if not kld:
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
        rows=table_rows(applier, space, base_plan, deltas),
        cost_evals=proxy_cost_evals(n_tokens, evaluator.n_tokens, fisher, checkpoint, degradation),
        seconds=seconds,
        # the KL pass scores sampled labels, not the text
        base_perplexity=None if kld else math.exp(nll_sum / n_tokens),
        degradation=degradation,
        info={
            "method": "weight-space Taylor: 0.5 * diag(the model's Fisher).dW^2 (labels drawn from the model)"
            if kld
            else "weight-space Taylor: g.dW + 0.5 * diag(empirical Fisher).dW^2",
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
