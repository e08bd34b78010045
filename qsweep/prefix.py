"""Cached-prefix forward: evaluate a plan that changes only block k and later without re-running blocks 0..k-1.

When a plan differs from a base plan only in units whose parameters live in decoder block k or later, the hidden
states entering block k are the base model's. :class:`PrefixRunner` captures them once per evaluation batch
(:meth:`PrefixRunner.capture`) and then evaluates such plans (:meth:`PrefixRunner.evaluate`) with blocks 0..k-1
skipped: each skipped block's ``forward`` is replaced, for the duration of the call, by a pass-through that returns
its input in the structure the real block returns (a tensor in transformers 5, a tuple in older versions), and a
forward pre-hook on block k hands it the cached states. The model's own forward still runs around the blocks, so it
builds its masks, position ids and rotary embeddings as usual; that is what makes this work for any family whose
decoder blocks form one ``nn.ModuleList`` (GPT-2, OPT, Llama, ...) without per-family code. The scoring is the
:class:`~qsweep.evaluate.Evaluator`'s own (:meth:`~qsweep.evaluate.Evaluator.evaluate` runs unchanged; a hook on
``model.base_model`` counts its batches), so a cached evaluation is the uncached one minus the skipped blocks.

Where a unit starts (:meth:`PrefixRunner.first_block`) is found by tracing one tiny forward: a parameter owned by a
module inside block k starts at k; one used before the first block (embeddings, a tied lm_head) at 0 (no saving);
one used only after the last block (final norm, an untied lm_head) at ``n_blocks``, where the cache holds the last
block's output. The cache is kept for one block at a time (:meth:`capture` advances it from an earlier one by
running only the blocks in between), so memory is one ``[tokens, hidden]`` tensor, not one per block.
Not for ``torch.compile``-d evaluators (hooks and swapped forwards would recompile the graph every call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qsweep.evaluate import COMPUTE_DTYPES, EvalResult, Evaluator
from qsweep.units import UnitTable

__all__ = ["HiddenStates", "PrefixRunner", "decoder_blocks"]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks: the ``nn.ModuleList`` of ``config.num_hidden_layers`` modules (the largest
    such list by parameter count, if several)."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = [m for m in model.modules() if isinstance(m, nn.ModuleList) and n and len(m) == n]
    if not found:
        raise ValueError(
            f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
            f"config.num_hidden_layers={n} modules"
        )
    return max(found, key=lambda m: sum(p.numel() for p in m.parameters()))


@dataclass
class HiddenStates:
    """The hidden states entering block ``block`` (``block == n_blocks``: leaving the last block), one
    ``[B, T, hidden]`` tensor per evaluation batch, in the evaluator's batch order."""

    block: int
    states: list[torch.Tensor]


def _hidden_arg(args: tuple, kwargs: dict, block: nn.Module) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise TypeError(f"{type(block).__name__} was called without hidden states as its first argument")


class PrefixRunner:
    """Skips the unchanged leading blocks of a model during evaluation (see module docstring)."""

    def __init__(self, model: nn.Module, table: UnitTable):
        self.model = model
        self.blocks = decoder_blocks(model)
        self.n_blocks = len(self.blocks)
        self._tuple_len: int | None = None  # None: blocks return a tensor; else the length of their tuple
        self._unit_block = self._trace(table)
        self._batch = -1

    # ------------------------------------------------------------------ where each unit starts
    @torch.no_grad()
    def _trace(self, table: UnitTable) -> dict[str, int]:
        order: dict[int, int] = {}  # id(module) -> index of its first call

        def seen(mod, args):
            order.setdefault(id(mod), len(order))

        handles = [m.register_forward_pre_hook(seen) for m in self.model.modules()]

        def record(mod, args, out):
            self._tuple_len = len(out) if isinstance(out, tuple) else None

        handles.append(self.blocks[0].register_forward_hook(record))
        device = next(self.model.parameters()).device
        try:
            self.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        inside = {id(m): k for k, blk in enumerate(self.blocks) for m in blk.modules()}
        starts = [order[id(b)] for b in self.blocks]
        first: dict[int, int] = {}  # id(parameter) -> first block that needs re-running when it changes
        for m in self.model.modules():
            if id(m) in inside:
                k = inside[id(m)]
            elif id(m) in order:
                k = sum(s < order[id(m)] for s in starts)
            else:
                k = 0  # never called in the trace: assume the worst
            for p in m.parameters(recurse=False):
                first[id(p)] = min(first.get(id(p), k), k)
        params = dict(self.model.named_parameters())
        return {u.name: min(first[id(params[p.name])] for p in u.params) for u in table}

    def first_block(self, units: str | Iterable[str]) -> int:
        """The first block whose input changes when ``units`` change (0 .. n_blocks)."""
        units = [units] if isinstance(units, str) else list(units)
        return min(self._unit_block[u] for u in units)

    # ------------------------------------------------------------------ hooks
    def _passthrough(self, fixed: HiddenStates | None = None):
        """A block forward that returns its input (or, with ``fixed``, the cached states of the current batch)."""

        def forward(*args, **kwargs):
            h = fixed.states[self._batch] if fixed is not None else _hidden_arg(args, kwargs, self.blocks[0])
            return h if self._tuple_len is None else (h,) + (None,) * (self._tuple_len - 1)

        return forward

    def _feed_hook(self, feed: HiddenStates):
        def hook(block, args, kwargs):
            cached = feed.states[self._batch]
            h = _hidden_arg(args, kwargs, block)
            if h.shape[:2] != cached.shape[:2]:
                raise RuntimeError("prefix cache out of step with the evaluator's batches")
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        return hook

    @contextlib.contextmanager
    def _patched(
        self,
        skip: Iterable[int],
        feed: HiddenStates | None,
        grab: list[torch.Tensor] | None = None,
        stop: int = 0,
    ) -> Iterator[None]:
        """Skip the blocks in ``skip``, feed ``feed`` into its block, and append to ``grab`` the states entering
        block ``stop`` (leaving the last block when ``stop == n_blocks``)."""
        self._batch = -1
        saved: dict[int, object] = {}
        handles = [
            self.model.base_model.register_forward_pre_hook(
                lambda *a: setattr(self, "_batch", self._batch + 1)
            )
        ]
        try:
            for k in skip:
                fixed = (
                    feed
                    if feed is not None and feed.block == self.n_blocks and k == self.n_blocks - 1
                    else None
                )
                saved[k] = self.blocks[k].__dict__.get("forward")
                self.blocks[k].forward = self._passthrough(fixed)
            if feed is not None and feed.block < self.n_blocks:
                handles.append(
                    self.blocks[feed.block].register_forward_pre_hook(self._feed_hook(feed), with_kwargs=True)
                )
            if grab is not None and stop < self.n_blocks:
                handles.append(
                    self.blocks[stop].register_forward_pre_hook(
                        lambda b, args, kwargs: grab.append(_hidden_arg(args, kwargs, b).clone()),
                        with_kwargs=True,
                    )
                )
            elif grab is not None:
                handles.append(
                    self.blocks[-1].register_forward_hook(
                        lambda b, args, out: grab.append((out if self._tuple_len is None else out[0]).clone())
                    )
                )
            yield
        finally:
            for h in handles:
                h.remove()
            for k, old in saved.items():
                if old is None:
                    del self.blocks[k].forward
                else:
                    self.blocks[k].forward = old

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def capture(self, evaluator: Evaluator, stop: int, start: HiddenStates | None = None) -> HiddenStates:
        """The states entering block ``stop`` for every batch of ``evaluator``, under the weights now in the model.

        Only blocks ``start.block .. stop-1`` run (all before ``stop`` without ``start``); the blocks before
        ``start.block`` must be unchanged since ``start`` was captured.
        """
        first = start.block if start is not None else 0
        if not 0 <= first <= stop <= self.n_blocks:
            raise ValueError(f"cannot advance hidden states from block {first} to block {stop}")
        if start is not None and first == stop:
            return start
        grab: list[torch.Tensor] = []
        skip = [*range(first), *range(stop, self.n_blocks)]
        autocast = torch.autocast(
            evaluator.device.type, dtype=COMPUTE_DTYPES[evaluator.dtype], enabled=evaluator.dtype != "fp32"
        )
        with self._patched(skip, start if first > 0 else None, grab, stop), autocast:
            for i in range(evaluator.n_batches):
                self.model.base_model(input_ids=evaluator.batch_inputs(i))
        return HiddenStates(stop, grab)

    def evaluate(self, evaluator: Evaluator, cache: HiddenStates | None) -> EvalResult:
        """``evaluator.evaluate(model)`` with the blocks before ``cache.block`` skipped (None: a full evaluation).

        Exact when the weights of blocks before ``cache.block`` (and everything used before them) are those the
        cache was captured under.
        """
        if cache is None or cache.block == 0:
            return evaluator.evaluate(self.model)
        if evaluator.compile:
            raise ValueError(
                "the cached-prefix forward runs eagerly; use an evaluator built with compile=False"
            )
        if len(cache.states) != evaluator.n_batches:
            raise ValueError(f"cache has {len(cache.states)} batches, the evaluator {evaluator.n_batches}")
        with self._patched(range(cache.block), cache):
            return evaluator.evaluate(self.model)
