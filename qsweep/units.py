"""Units: the groups of parameters that share one precision in a plan.

Grouping rules live in the model's config file (conf/model/*.yaml), not in code. A rule is a regex over parameter
names (``re.fullmatch``) and a unit-name template that may use the regex's groups (``h.\\1.attn``). Every parameter
must be claimed by exactly one rule: a parameter no rule claims, or one claimed twice, is an error naming it.

Parameters are taken from ``model.named_parameters()``, which lists a tied parameter once under its first name, so
GPT-2's ``lm_head.weight`` (tied to ``transformer.wte.weight``) is counted once, inside the wte unit. Buffers (the
causal masks older transformers register as ``attn.bias``) are never parameters and never counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ParamInfo", "Unit", "UnitRule", "UnitTable", "discover_units", "output_channel_dim"]


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor: its name, shape and output-channel axis (None for 1-D tensors)."""

    name: str
    shape: tuple[int, ...]
    channel_dim: int | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Unit:
    """A named group of parameters that a plan assigns one format."""

    name: str
    params: tuple[ParamInfo, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)


@dataclass(frozen=True)
class UnitRule:
    """``pattern`` (fullmatch on a parameter name) -> unit name ``unit`` (a ``re`` expansion template)."""

    pattern: str
    unit: str

    @classmethod
    def from_config(cls, raw: Mapping) -> UnitRule:
        keys = set(raw)
        if keys != {"pattern", "unit"}:
            raise ValueError(f"unit rule {dict(raw)!r} must have exactly the keys 'pattern' and 'unit'")
        try:
            re.compile(raw["pattern"])
        except re.error as e:
            raise ValueError(f"unit rule pattern {raw['pattern']!r} is not a valid regex: {e}") from None
        return cls(str(raw["pattern"]), str(raw["unit"]))


class UnitTable:
    """The ordered units of a model; the search space and size accounting are built from it."""

    def __init__(self, units: Sequence[Unit]):
        self.units: tuple[Unit, ...] = tuple(units)
        self._by_name = {u.name: u for u in self.units}
        if len(self._by_name) != len(self.units):
            raise ValueError("duplicate unit names in unit table")

    def __iter__(self):
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, name: str) -> Unit:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    @property
    def numel(self) -> int:
        return sum(u.numel for u in self.units)

    def param_to_unit(self) -> dict[str, str]:
        return {p.name: u.name for u in self.units for p in u.params}


def output_channel_dim(module: nn.Module, param_name: str, param: torch.Tensor) -> int | None:
    """The output-channel axis of a parameter, from the type of the module that owns it.

    ``transformers``' Conv1D stores ``[in, out]`` (dim 1); ``nn.Linear`` stores ``[out, in]`` (dim 0); embeddings
    are ``[vocab, dim]``, and a tied lm_head computes ``h @ wte.T``, so each vocabulary row is an output (dim 0).
    """
    if param.ndim < 2:
        return None
    if type(module).__name__ == "Conv1D" and param_name == "weight":
        return 1
    return 0


def _owned_params(model: nn.Module) -> Iterable[tuple[str, nn.Module, str, torch.Tensor]]:
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights: the first owner wins, as in named_parameters()
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            yield full, module, p_name, p


def discover_units(model: nn.Module, rules: Sequence[UnitRule | Mapping]) -> UnitTable:
    """Group ``model``'s parameters into units by ``rules`` (see module docstring). Works on meta tensors."""
    rules = [r if isinstance(r, UnitRule) else UnitRule.from_config(r) for r in rules]
    if not rules:
        raise ValueError("no unit rules given: the model config needs a non-empty 'units' list")
    compiled = [(re.compile(r.pattern), r) for r in rules]
    grouped: dict[str, list[ParamInfo]] = {}
    unclaimed: list[str] = []
    for full, module, p_name, p in _owned_params(model):
        hits = [(m, r) for rx, r in compiled if (m := rx.fullmatch(full))]
        if not hits:
            unclaimed.append(full)
            continue
        if len(hits) > 1:
            pats = ", ".join(repr(r.pattern) for _, r in hits)
            raise ValueError(f"parameter {full!r} is claimed by several unit rules: {pats}")
        m, r = hits[0]
        info = ParamInfo(full, tuple(p.shape), output_channel_dim(module, p_name, p))
        grouped.setdefault(m.expand(r.unit), []).append(info)
    if unclaimed:
        more = f" and {len(unclaimed) - 5} more" if len(unclaimed) > 5 else ""
        raise ValueError(
            f"parameter {unclaimed[0]!r} is claimed by no unit rule (unclaimed: "
            f"{', '.join(unclaimed[:5])}{more})"
        )
    return UnitTable([Unit(name, tuple(ps)) for name, ps in grouped.items()])
