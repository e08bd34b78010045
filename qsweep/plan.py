"""Plans: which format each unit is stored in.

A :class:`Plan` is the resolved, explicit mapping ``unit -> format name`` for one model's unit table. It is the one
value that flows from sampler to evaluator to size accounting to reports, and it serialises to YAML/JSON with a
version field.

A :class:`PlanSpec` is how people write plans: a default format plus ordered regex rules over unit names (first
match wins, ``re.fullmatch``), plus optional explicit ``units`` entries that override the rules::

    version: 1
    default: int8
    rules:
      - {pattern: '.*ln.*', format: fp32}
      - {pattern: 'h\\.(1|2|3)\\.mlp', format: fp16}
    units:
      h.11.attn: fp16

The seed project's plan files (a JSON object ``{substring: width}``: the first substring contained in a parameter
name wins, unmatched parameters stay FP32) are read by :func:`seed_plan_to_spec` / :func:`load_plan_file`.

Named plans (``plan=NAME``, ``baseline.plan``, ``search.enqueue``) are the files conf/plan/NAME.yaml; this module is
their one reader (:func:`named_plan_spec`, :func:`plan_names`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qsweep.errors import ConfigError, QsweepError, did_you_mean, first_line
from qsweep.formats import get_format
from qsweep.paths import config_dir
from qsweep.rules import OrderedRules
from qsweep.units import UnitTable

__all__ = [
    "PLAN_VERSION",
    "Plan",
    "PlanError",
    "PlanSpec",
    "Rule",
    "load_plan_file",
    "named_plan_spec",
    "plan_from_config",
    "plan_names",
    "seed_plan_to_spec",
]

PLAN_VERSION = 1
_SPEC_KEYS = {"version", "default", "rules", "units"}
# The seed's widths: 32/16 floats, 8 = per-tensor INT8, 4 = flattened-group INT4 (our int8 / int4).
_SEED_WIDTHS = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}


class PlanError(QsweepError, ValueError):
    """A plan that cannot be read or does not fit the model; the message is one line naming the problem."""


def _check_format(name, where: str) -> str:
    try:
        return get_format(name).name
    except ConfigError as e:
        raise PlanError(f"{where}: {e}") from None


def plan_names() -> list[str]:
    """The named plans shipped in conf/plan/ (``plan=NAME``), sorted."""
    return sorted(p.stem for p in (config_dir() / "plan").glob("*.yaml"))


def named_plan_spec(name: str) -> dict:
    """The plan spec (a :class:`PlanSpec` mapping) of the shipped plan ``name`` (conf/plan/NAME.yaml)."""
    names = plan_names()
    if name not in names:
        raise PlanError(
            f"unknown plan name {name!r}{did_you_mean(name, names)}; shipped plans: {', '.join(names)}"
        )
    path = config_dir() / "plan" / f"{name}.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PlanError(f"plan {name!r} ({path}): malformed YAML: {first_line(e)}") from None
    if not isinstance(raw, Mapping):
        raise PlanError(f"plan {name!r} ({path}): a plan must be a mapping with keys default/rules/units")
    return dict(raw)


@dataclass(frozen=True)
class Plan:
    """Resolved plan: every unit of a model mapped to a registered format name, in unit-table order."""

    formats: Mapping[str, str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", dict(self.formats))
        for unit, fmt in self.formats.items():
            _check_format(fmt, f"unit {unit!r}")

    def __getitem__(self, unit: str) -> str:
        return self.formats[unit]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.formats == other.formats

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.formats.items())))

    @classmethod
    def uniform(cls, table: UnitTable, fmt: str) -> Plan:
        return cls({u: fmt for u in table.names})

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "units": dict(self.formats)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """A short content hash (order-independent): identifies a plan across trials and runs."""
        blob = json.dumps(sorted(self.formats.items())).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        else:
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def histogram(self, table: UnitTable) -> dict[str, int]:
        """Parameters per format, e.g. ``{'int8': 120_000_000, 'fp16': 4_000_000}``."""
        counts: Counter[str] = Counter()
        for unit in table:
            counts[self.formats[unit.name]] += unit.numel
        return dict(counts)

    def check_units(self, table: UnitTable) -> None:
        missing = [u for u in table.names if u not in self.formats]
        extra = [u for u in self.formats if u not in table]
        if extra:
            raise PlanError(f"plan names unknown unit {extra[0]!r}{did_you_mean(extra[0], table.names)}")
        if missing:
            raise PlanError(f"plan gives no format to unit {missing[0]!r} ({len(missing)} units missing)")


@dataclass(frozen=True)
class Rule:
    pattern: str
    format: str


@dataclass(frozen=True)
class PlanSpec:
    """A plan as written: ``default`` + ordered regex ``rules`` + explicit ``units`` (see module docstring)."""

    default: str | None = None
    rules: tuple[Rule, ...] = ()
    units: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw, source: str = "plan") -> PlanSpec:
        if raw is None or (isinstance(raw, Mapping) and not raw):
            raise PlanError(f"{source}: the plan is empty (expected keys: default, rules, units)")
        if not isinstance(raw, Mapping):
            raise PlanError(
                f"{source}: a plan must be a mapping with keys default/rules/units, got {type(raw).__name__}"
            )
        unknown = set(raw) - _SPEC_KEYS
        if unknown:
            bad = sorted(unknown)[0]
            raise PlanError(
                f"{source}: unknown plan key {bad!r}{did_you_mean(bad, sorted(_SPEC_KEYS))}; valid keys: "
                f"{', '.join(sorted(_SPEC_KEYS))}"
            )
        version = raw.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(
                f"{source}: plan version {version!r} is not supported (this qsweep reads "
                f"version {PLAN_VERSION})"
            )
        default = raw.get("default")
        if default is not None:
            default = _check_format(default, f"{source}: default")
        compiled = OrderedRules.from_config(
            raw.get("rules"), "format", source=source, error=PlanError, convert=_check_format
        )
        rules = [Rule(pattern, fmt) for pattern, fmt in compiled]
        units_raw = raw.get("units") or {}
        if not isinstance(units_raw, Mapping):
            raise PlanError(f"{source}: 'units' must be a mapping unit -> format")
        units = {str(u): _check_format(f, f"{source}: unit {u!r}") for u, f in units_raw.items()}
        if default is None and not rules and not units:
            raise PlanError(f"{source}: the plan is empty (no default, rules or units)")
        return cls(default, tuple(rules), units)

    def to_dict(self) -> dict:
        out: dict = {"version": PLAN_VERSION}
        if self.default is not None:
            out["default"] = self.default
        if self.rules:
            out["rules"] = [{"pattern": r.pattern, "format": r.format} for r in self.rules]
        if self.units:
            out["units"] = dict(self.units)
        return out

    def resolve(self, table: UnitTable, source: str = "plan") -> Plan:
        """Assign every unit of ``table`` a format: its explicit entry, else the first rule that matches it, else
        the default. Unknown units and rules that match no unit at all are errors."""
        for u in self.units:
            if u not in table:
                raise PlanError(f"{source}: unknown unit {u!r}{did_you_mean(u, table.names)}")
        rules = OrderedRules.compile(
            ((r.pattern, r.format) for r in self.rules), source=source, error=PlanError
        )
        rules.check_used(table.names, subject="unit")
        out: dict[str, str] = {}
        for name in table.names:
            if name in self.units:
                out[name] = self.units[name]
            elif hit := rules.first(name):
                out[name] = hit.value
            elif self.default is not None:
                out[name] = self.default
            else:
                raise PlanError(f"{source}: unit {name!r} matches no rule and the plan has no default")
        return Plan(out)


def seed_plan_to_spec(raw: Mapping, table: UnitTable, source: str = "seed plan") -> PlanSpec:
    """Translate the seed's ``{substring: width}`` plan into explicit units for ``table``.

    Each parameter takes the width of the first pattern its name contains (unmatched: fp32). A unit whose
    parameters end up with different widths cannot be expressed at this granularity: that is an error that says
    to choose a finer one (``model.granularity=linear``).
    """
    if not raw:
        raise PlanError(f"{source}: the plan is empty")
    widths: dict[str, str] = {}
    for pattern, width in raw.items():
        name = _SEED_WIDTHS.get(width) if isinstance(width, int) and not isinstance(width, bool) else None
        if name is None:
            if isinstance(width, str) and width.isdigit() and int(width) in _SEED_WIDTHS:
                name = _SEED_WIDTHS[int(width)]
            elif isinstance(width, str):
                name = _check_format(width, f"{source}: pattern {pattern!r}")
            else:
                raise PlanError(
                    f"{source}: pattern {pattern!r} has width {width!r}; valid widths: "
                    f"{', '.join(map(str, _SEED_WIDTHS))} or a format name"
                )
        widths[str(pattern)] = name
    # "the first pattern the name contains" is an ordered rule set whose patterns are ``.*<literal>.*``
    patterns = list(widths)
    rules = OrderedRules.compile(
        ((f"(?s).*{re.escape(p)}.*", widths[p]) for p in patterns), source=source, error=PlanError
    )
    units: dict[str, str] = {}
    for unit in table:
        fmts = {hit.value if (hit := rules.first(p.name)) else "fp32" for p in unit.params}
        if len(fmts) > 1:
            raise PlanError(
                f"{source}: its patterns give unit {unit.name!r} several formats ({', '.join(sorted(fmts))}); "
                f"choose a finer unit granularity (model.granularity=linear)"
            )
        units[unit.name] = fmts.pop()
    unused = rules.unused(p.name for unit in table for p in unit.params)
    if unused:
        raise PlanError(
            f"{source}: pattern {patterns[rules.patterns.index(unused[0])]!r} matches no parameter name"
        )
    return PlanSpec(units=units)


def _is_seed_plan(raw) -> bool:
    """A mapping with none of the PlanSpec keys (nor a near-miss of one, such as a typo'd 'defualt')."""
    if not isinstance(raw, Mapping) or not raw:
        return False
    return not any(difflib.get_close_matches(str(k), _SPEC_KEYS, n=1, cutoff=0.75) for k in raw)


def load_plan_file(path: str | Path, table: UnitTable) -> Plan:
    """Read a qsweep plan (YAML or JSON) or a seed plan (JSON ``{pattern: width}``) and resolve it."""
    path = Path(path)
    source = f"plan file {str(path)!r}"
    try:
        text = path.read_text()
    except OSError as e:
        raise PlanError(f"{source}: cannot be read ({e.strerror})") from None
    if not text.strip():
        raise PlanError(f"{source}: the file is empty")
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        detail = str(e).replace("\n", " ")
        raise PlanError(f"{source}: malformed {kind}: {detail}") from None
    if _is_seed_plan(raw):
        return seed_plan_to_spec(raw, table, source).resolve(table, source)
    return PlanSpec.from_dict(raw, source).resolve(table, source)


def plan_from_config(raw, table: UnitTable, source: str = "plan") -> Plan:
    """Resolve a plan given inline in a config (a PlanSpec mapping or a seed ``{pattern: width}`` mapping)."""
    if _is_seed_plan(raw):
        return seed_plan_to_spec(raw, table, source).resolve(table, source)
    return PlanSpec.from_dict(raw, source).resolve(table, source)
