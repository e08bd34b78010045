"""Applying a plan to a model: fake-quantize its weights in place.

``apply_plan_`` is the one-shot verb (it quantizes whatever the weights are now). For search, where one model is
re-used for many plans, :class:`PlanApplier` switches the model between plans from one pristine copy of the
weights. Its memory grows with the model, not with the precision menu: the pristine copy (in the checkpoint's
dtype, on the model's device or in host memory), plus a least-recently-used cache of quantized tensors under a
byte budget. A unit whose format changes is quantized again from the pristine copy on the model's device when its
tensors are not cached (milliseconds per unit on a GPU); switching plans only touches the units that change.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from qsweep.formats import get_format
from qsweep.plan import Plan
from qsweep.units import UnitTable

__all__ = ["DEFAULT_CACHE_BYTES", "PlanApplier", "apply_plan_"]

DEFAULT_CACHE_BYTES = 512 * 2**20  # eval.cache_mb's default: 512 MiB of quantized tensors


def _params_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


@torch.no_grad()
def apply_plan_(model: nn.Module, plan: Plan, table: UnitTable) -> nn.Module:
    """Fake-quantize ``model``'s parameters in place per ``plan``; returns ``model``.

    Weights are quantized from their current values; the all-fp32 plan leaves every weight bit-identical.
    """
    plan.check_units(table)
    params = _params_by_name(model)
    for unit in table:
        fmt = get_format(plan[unit.name])
        for info in unit.params:
            p = params[info.name]
            p.copy_(fmt.fake_quant(p.detach().float(), info.channel_dim).to(p.dtype))
    return model


class PlanApplier:
    """Switch a model between plans from one pristine copy of its weights.

    ``pristine``: the original weights by parameter name (e.g. as loaded, in the checkpoint's dtype); None clones
    the model's current parameters. ``pristine_device``: where a clone is kept (None: with the parameter; ``"cpu"``
    keeps it in host memory, pinned when the model is on a GPU). ``cache_bytes``: the budget of the LRU cache of
    quantized tensors (in the model's dtype, on its device); 0 disables it. Every quantized tensor is computed in
    fp32 from the pristine values and cast to the parameter's dtype, so a plan gives the same weights whether they
    came from the cache or not.
    """

    def __init__(
        self,
        model: nn.Module,
        table: UnitTable,
        *,
        pristine: Mapping[str, torch.Tensor] | None = None,
        pristine_device: str | torch.device | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.model = model
        self.table = table
        self.cache_bytes = int(cache_bytes)
        self._params = _params_by_name(model)
        if pristine is None:
            pristine = {name: _keep(p.detach(), pristine_device) for name, p in self._params.items()}
        missing = sorted(set(self._params) - set(pristine))
        if missing:
            raise ValueError(f"the pristine weights lack {len(missing)} parameters, e.g. {missing[0]!r}")
        self._pristine = dict(pristine)
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self._current: dict[str, str | None] = dict.fromkeys(table.names)
        self.n_quantized = 0  # quantizations computed (cache misses), for benchmarks and tests

    @classmethod
    @torch.no_grad()
    def converting(
        cls,
        model: nn.Module,
        table: UnitTable,
        dtype: torch.dtype,
        *,
        pristine_device: str | torch.device | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> PlanApplier:
        """Hold ``model``'s parameters in ``dtype`` and keep the loaded ones as the pristine copy: where the dtype
        changes the loaded tensor itself is kept (no extra copy), else a clone; on ``pristine_device`` if given."""
        pristine = {}
        for name, p in model.named_parameters():
            loaded = p.data
            if loaded.dtype != dtype:
                p.data = loaded.to(dtype)
                same = pristine_device is None or torch.device(pristine_device) == loaded.device
                pristine[name] = loaded if same else _keep(loaded, pristine_device)
            else:
                pristine[name] = _keep(loaded, pristine_device)
            del loaded
        return cls(model, table, pristine=pristine, cache_bytes=cache_bytes)

    @property
    def pristine_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._pristine.values())

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    @torch.no_grad()
    def original(self, param: str) -> torch.Tensor:
        """The pristine weights of ``param`` on the parameter's device, in its dtype."""
        live = self._params[param]
        return self._pristine[param].to(device=live.device, dtype=live.dtype, non_blocking=True)

    @torch.no_grad()
    def quantized(
        self, param: str, channel_dim: int | None, fmt_name: str, *, keep: bool = True
    ) -> torch.Tensor:
        """``param``'s pristine weights fake-quantized to ``fmt_name``, in the parameter's dtype and device.

        ``keep=False`` reads the cache but does not add to it: for a caller that visits every (parameter, format)
        once (the proxy sensitivity), which would only evict the plans a search keeps switching between."""
        key = (param, fmt_name)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        live = self._params[param]
        # the pristine tensor as stored (16-bit, say): formats widen it to fp32 a block of rows at a time
        src = self._pristine[param].to(device=live.device, non_blocking=True)
        q = get_format(fmt_name).fake_quant(src, channel_dim).to(live.dtype)
        del src
        self.n_quantized += 1
        size = q.numel() * q.element_size()
        if keep and size <= self.cache_bytes:
            while self._cached_bytes + size > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.numel() * old.element_size()
            self._cache[key] = q
            self._cached_bytes += size
        return q

    @torch.no_grad()
    def apply_(self, plan: Plan) -> None:
        """Put ``plan``'s weights in place; only the units whose format changed are touched."""
        plan.check_units(self.table)
        for unit in self.table:
            fmt = plan[unit.name]
            if self._current[unit.name] == fmt:
                continue
            for info in unit.params:
                self._params[info.name].copy_(self.quantized(info.name, info.channel_dim, fmt))
            self._current[unit.name] = fmt

    @torch.no_grad()
    def restore_(self) -> None:
        """Put the original weights back."""
        for name, p in self._params.items():
            p.copy_(self._pristine[name])
        self._current = dict.fromkeys(self.table.names)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0


def _keep(t: torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    """A copy of ``t`` kept on ``device`` (None: its own), pinned when it leaves a GPU for the host."""
    if device is None or torch.device(device) == t.device:
        return t.clone()
    out = t.to(device, copy=True)
    if out.device.type == "cpu" and t.device.type == "cuda":
        out = out.pin_memory()
    return out
