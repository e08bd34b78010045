"""Applying a plan to a model: fake-quantize its weights in place.

``apply_plan_`` is the one-shot verb (it quantizes whatever the weights are now). For search, where one model is
re-used for many plans, :class:`PlanApplier` keeps a copy of the original weights and caches every quantized tensor
per (parameter, format), so switching plans only copies cached tensors into place and never re-quantizes.
"""

from __future__ import annotations

import torch
from torch import nn

from qsweep.formats import get_format
from qsweep.plan import Plan
from qsweep.units import UnitTable

__all__ = ["PlanApplier", "apply_plan_"]


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
    """Switch a model between plans without re-quantizing: originals are kept, quantized tensors cached.

    The cache holds one tensor per (parameter, format) ever applied, on the model's device; memory grows with the
    number of distinct formats used (at most len(formats) x model size). ``apply_(plan)`` copies only the units
    whose format differs from the plan currently applied.
    """

    def __init__(self, model: nn.Module, table: UnitTable):
        self.model = model
        self.table = table
        self._params = _params_by_name(model)
        self._original = {name: p.detach().clone() for name, p in self._params.items()}
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._current: dict[str, str | None] = dict.fromkeys(table.names)

    @torch.no_grad()
    def quantized(self, param: str, channel_dim: int | None, fmt_name: str) -> torch.Tensor:
        key = (param, fmt_name)
        if key not in self._cache:
            orig = self._original[param]
            q = get_format(fmt_name).fake_quant(orig.float(), channel_dim)
            self._cache[key] = q.to(orig.dtype)
        return self._cache[key]

    @torch.no_grad()
    def apply_(self, plan: Plan) -> None:
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
            p.copy_(self._original[name])
        self._current = dict.fromkeys(self.table.names)
