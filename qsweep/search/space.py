"""The search space: which formats each unit may take (the precision menu), built in code from the units.

A precision menu (conf/precision/*.yaml) is an ordered list of ``{pattern, formats}`` entries, read by
:class:`qsweep.rules.OrderedRules`: each unit takes the formats of the first pattern that ``re.fullmatch``-es its
name. Entries that match no unit are allowed (one menu serves several model families); a unit that no entry
matches is an error. Units with one option are fixed; every other unit is one categorical parameter (named after
the unit) in the Optuna search space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qsweep.errors import ConfigError
from qsweep.formats import get_format
from qsweep.plan import Plan, PlanError
from qsweep.rules import OrderedRules
from qsweep.units import UnitTable

__all__ = ["SearchSpace"]


def _menu_formats(raw, where: str) -> tuple[str, ...]:
    """A menu entry's ``formats``: a non-empty list of registered format names (duplicates dropped, order kept)."""
    if isinstance(raw, str) or not isinstance(raw, Sequence) or not raw:
        raise PlanError(f"{where}: 'formats' must be a non-empty list of format names, got {raw!r}")
    try:
        return tuple(dict.fromkeys(get_format(f).name for f in raw))
    except ConfigError as e:
        raise PlanError(f"{where}: {e}") from None


@dataclass(frozen=True)
class SearchSpace:
    """unit -> allowed format names (in menu order), for every unit of a model."""

    choices: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_menu(cls, table: UnitTable, menu: Sequence[Mapping]) -> SearchSpace:
        rules = OrderedRules.from_config(
            menu, "formats", what="precision menu entry", error=PlanError, convert=_menu_formats
        )
        choices = {}
        for name in table.names:
            hit = rules.first(name)
            if hit is None:
                raise PlanError(
                    f"the precision menu leaves unit {name!r} no format (add a pattern that matches it)"
                )
            choices[name] = hit.value
        return cls(choices)

    @property
    def searchable(self) -> list[str]:
        return [u for u, c in self.choices.items() if len(c) > 1]

    @property
    def size(self) -> int:
        n = 1
        for c in self.choices.values():
            n *= len(c)
        return n

    def suggest(self, trial) -> Plan:
        """One categorical suggestion per searchable unit; fixed units take their only format."""
        return Plan(
            {
                u: trial.suggest_categorical(u, list(c)) if len(c) > 1 else c[0]
                for u, c in self.choices.items()
            }
        )

    def params_of(self, plan: Plan) -> dict[str, str] | None:
        """The trial parameters that express ``plan``, or None when the menu does not allow it."""
        if any(plan[u] not in c for u, c in self.choices.items()):
            return None
        return {u: plan[u] for u in self.searchable}

    def uniform_plans(self) -> dict[str, Plan]:
        """For each format a searchable unit may take, the plan putting every unit allowing it in that format
        (the others in their first option); formats that give the same plan as an earlier one are left out."""
        fmts = dict.fromkeys(f for u in self.searchable for f in self.choices[u])
        plans: dict[str, Plan] = {}
        for f in fmts:
            plan = Plan({u: f if f in c else c[0] for u, c in self.choices.items()})
            if plan not in plans.values():
                plans[f] = plan
        return plans
