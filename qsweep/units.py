"""Units: the groups of parameters that share one precision in a plan.

Grouping rules live in the model's config file (conf/model/*.yaml), not in code. A rule is a regex over parameter
names (``re.fullmatch``) and a unit-name template that may use the regex's groups (``h.\\1.attn``). Every parameter
must be claimed by exactly one rule: a parameter no rule claims, or one claimed twice, is a :class:`UnitError`
naming it (the rules are read by :class:`qsweep.rules.OrderedRules`). Rules that claim nothing are allowed: one rule
list serves a family of models (``lm_head`` is a parameter only when it is not tied).

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

from qsweep.errors import QsweepError
from qsweep.rules import OrderedRules

__all__ = [
    "ParamInfo",
    "Unit",
    "UnitError",
    "UnitRule",
    "UnitTable",
    "compile_unit_rules",
    "discover_units",
    "output_channel_dim",
]


class UnitError(QsweepError, ValueError):
    """Unit rules that cannot be read or do not partition a model's parameters; one line naming the culprit."""


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


def compile_unit_rules(rules: Sequence[UnitRule | Mapping] | OrderedRules[str]) -> OrderedRules[str]:
    """Validate unit rules (``{pattern, unit}`` mappings from a model config, or :class:`UnitRule`)."""
    if isinstance(rules, OrderedRules):
        return rules
    if not rules:
        raise UnitError("no unit rules given: the model config needs a non-empty 'units' list")
    entries = [{"pattern": r.pattern, "unit": r.unit} if isinstance(r, UnitRule) else r for r in rules]
    return OrderedRules.from_config(
        entries, "unit", what="unit rule", error=UnitError, convert=lambda unit, where: str(unit)
    )


def discover_units(model: nn.Module, rules: Sequence[UnitRule | Mapping] | OrderedRules[str]) -> UnitTable:
    """Group ``model``'s parameters into units by ``rules`` (see module docstring). Works on meta tensors."""
    compiled = compile_unit_rules(rules)
    grouped: dict[str, list[ParamInfo]] = {}
    unclaimed: list[str] = []
    for full, module, p_name, p in _owned_params(model):
        hit = compiled.only(full, subject="parameter")
        if hit is None:
            unclaimed.append(full)
            continue
        try:
            unit = hit.match.expand(hit.value)
        except (re.error, IndexError) as e:
            raise UnitError(
                f"unit rule {hit.index} ({hit.pattern!r}): unit name template {hit.value!r} does not fit the "
                f"pattern's groups ({e})"
            ) from None
        info = ParamInfo(full, tuple(p.shape), output_channel_dim(module, p_name, p))
        grouped.setdefault(unit, []).append(info)
    if unclaimed:
        more = f" and {len(unclaimed) - 5} more" if len(unclaimed) > 5 else ""
        raise UnitError(
            f"parameter {unclaimed[0]!r} is claimed by no unit rule (unclaimed: "
            f"{', '.join(unclaimed[:5])}{more})"
        )
    return UnitTable([Unit(name, tuple(ps)) for name, ps in grouped.items()])
