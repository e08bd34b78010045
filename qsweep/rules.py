"""Ordered regex rules over names: the one implementation behind unit grouping, plan rules and precision menus.

A rule set is an ordered list of ``(pattern, value)`` pairs; a pattern matches a name by ``re.fullmatch``. Three
callers read three kinds of config with it, each choosing the semantics it needs:

  * plan rules (``PlanSpec.resolve``): the first matching rule wins; a rule that matches none of the model's unit
    names is an error (it is almost always a typo, and would silently do nothing); the seed's ``{substring:
    width}`` plans (``seed_plan_to_spec``) are the same with ``.*<literal>.*`` patterns over parameter names;
  * precision menus (``SearchSpace.from_menu``): the first matching entry wins; entries that match nothing are
    allowed, because one menu serves several model families (``.*(ln|norm).*``);
  * unit grouping (``discover_units``): exactly one rule may claim a parameter, since two rules claiming one is a
    config bug that first-match would hide; rules that match nothing are allowed (``lm_head`` exists only when it
    is not tied).

Errors are raised as the caller's error type (``error=PlanError``...) with one line that names the rule by its
position and pattern, prefixed by ``source`` (the file or config key the rules came from) when one is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from qsweep.errors import QsweepError, did_you_mean

__all__ = ["OrderedRules", "RuleError", "RuleMatch"]

V = TypeVar("V")


class RuleError(QsweepError, ValueError):
    """A rule list that cannot be read or does not fit the names it is applied to (default error type)."""


@dataclass(frozen=True)
class RuleMatch(Generic[V]):
    """Rule number ``index`` (``pattern`` -> ``value``) fully matched a name; ``match`` holds its groups."""

    index: int
    pattern: str
    value: V
    match: re.Match[str]


@dataclass(frozen=True)
class OrderedRules(Generic[V]):
    """Compiled ``(pattern, value)`` rules in order; see the module docstring for who uses which semantics.

    ``what`` names one rule in messages ("rule", "unit rule", "precision menu entry"); ``source`` prefixes them.
    """

    rules: tuple[tuple[re.Pattern[str], V], ...]
    what: str = "rule"
    source: str = ""
    error: type[Exception] = field(default=RuleError, compare=False)

    @classmethod
    def compile(
        cls,
        pairs: Iterable[tuple[str, V]],
        *,
        what: str = "rule",
        source: str = "",
        error: type[Exception] = RuleError,
    ) -> OrderedRules[V]:
        """Compile ``(pattern, value)`` pairs; an invalid regex raises ``error`` naming the rule."""
        prefix = f"{source}: " if source else ""
        compiled = []
        for i, (pattern, value) in enumerate(pairs):
            try:
                compiled.append((re.compile(str(pattern)), value))
            except re.error as e:
                raise error(
                    f"{prefix}{what} {i} pattern {str(pattern)!r} is not a valid regex: {e}"
                ) from None
        return cls(tuple(compiled), what, source, error)

    @classmethod
    def from_config(
        cls,
        entries: Sequence[Any] | None,
        value_key: str,
        *,
        what: str = "rule",
        source: str = "",
        error: type[Exception] = RuleError,
        convert: Callable[[Any, str], V] | None = None,
    ) -> OrderedRules[V]:
        """Read ``[{pattern: regex, <value_key>: value}, ...]`` from a config, validating every entry in order.

        ``convert(raw_value, where)`` checks and normalises a value (``where`` names the entry for its message,
        e.g. ``"plan: rule 2"``); it raises its own one-line error.
        """
        prefix = f"{source}: " if source else ""
        if entries is None:
            entries = []
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
            raise error(f"{prefix}expected a list of {{pattern, {value_key}}} mappings, got {entries!r}")
        pairs = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or set(entry) != {"pattern", value_key}:
                raise error(
                    f"{prefix}{what} {i} must be a mapping with keys 'pattern' and '{value_key}', got {entry!r}"
                )
            value = entry[value_key]
            pairs.append((str(entry["pattern"]), convert(value, f"{prefix}{what} {i}") if convert else value))
        return cls.compile(pairs, what=what, source=source, error=error)

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[tuple[str, V]]:
        return ((rx.pattern, value) for rx, value in self.rules)

    @property
    def patterns(self) -> list[str]:
        return [rx.pattern for rx, _ in self.rules]

    def all_matches(self, name: str) -> list[RuleMatch[V]]:
        """Every rule that fully matches ``name``, in rule order."""
        return [
            RuleMatch(i, rx.pattern, v, m)
            for i, (rx, v) in enumerate(self.rules)
            if (m := rx.fullmatch(name))
        ]

    def first(self, name: str) -> RuleMatch[V] | None:
        """The first rule that fully matches ``name`` (None when none does)."""
        for i, (rx, value) in enumerate(self.rules):
            if m := rx.fullmatch(name):
                return RuleMatch(i, rx.pattern, value, m)
        return None

    def only(self, name: str, subject: str = "name") -> RuleMatch[V] | None:
        """The one rule that fully matches ``name`` (None when none does); several matching is an error."""
        hits = self.all_matches(name)
        if len(hits) > 1:
            prefix = f"{self.source}: " if self.source else ""
            pats = ", ".join(repr(h.pattern) for h in hits)
            raise self.error(f"{prefix}{subject} {name!r} is matched by more than one {self.what}: {pats}")
        return hits[0] if hits else None

    def unused(self, names: Iterable[str]) -> list[str]:
        """Patterns (in rule order) that fully match none of ``names``."""
        names = list(names)
        return [rx.pattern for rx, _ in self.rules if not any(rx.fullmatch(n) for n in names)]

    def check_used(self, names: Iterable[str], subject: str = "name") -> None:
        """Raise (naming the first offender and the closest name) when a rule matches none of ``names``."""
        names = list(names)
        unused = self.unused(names)
        if unused:
            prefix = f"{self.source}: " if self.source else ""
            raise self.error(
                f"{prefix}{self.what} pattern {unused[0]!r} matches no {subject}{did_you_mean(unused[0], names)}"
            )
