"""The sensitivity record: per-(unit, format) loss change vs a base plan, with the unit's bytes; JSON and CSV.

One record type for both kinds of table (``measured`` and ``proxy``; see qsweep.search.sensitivity, which computes
them and re-exports these names). A row holds ``delta_nll_per_token`` (mean per-token log-perplexity change vs the
base plan; ``inf`` for a plan that failed to evaluate, written as null; in a table of ``degradation`` ``kld``, the
mean per-token KL(baseline || plan) change instead: qsweep.score.Degradation), ``degradation = expm1(delta)`` and the
unit's bytes in that format under both accountings (``model_size_bytes``: ``seed``, numel x bits / 8;
``packed_size_bytes``: codes plus scales). A table carries its split, token count, base perplexity and cost (full
evaluations of the split, counted by work; ``info`` holds its wall time too), and saves to a versioned JSON file that :meth:`SensitivityTable.load`
reads back exactly.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsweep.errors import QsweepError, read_json_file
from qsweep.formats import get_format
from qsweep.plan import Plan
from qsweep.score import DEGRADATIONS
from qsweep.units import Unit

if TYPE_CHECKING:
    from qsweep.apply import PlanApplier
    from qsweep.search.space import SearchSpace

__all__ = [
    "KINDS",
    "SensitivityError",
    "SensitivityRow",
    "SensitivityTable",
    "check_base",
    "rank_correlation",
    "sensitivity_base",
    "table_rows",
    "unit_bytes",
]

KINDS = ("measured", "proxy")
TABLE_VERSION = 1
CSV_FIELDS = ("unit", "format", "delta_nll_per_token", "degradation", "model_size_bytes", "packed_size_bytes")


class SensitivityError(QsweepError, ValueError):
    """A sensitivity table that cannot be read, or does not fit the model or menu it is used with."""


def unit_bytes(unit: Unit, fmt: str) -> tuple[int, int]:
    """``(model_size_bytes, packed_size_bytes)`` of ``unit`` stored in ``fmt`` (as qsweep.size counts them)."""
    f = get_format(fmt)
    return (
        sum(f.seed_bytes(p.numel) for p in unit.params),
        sum(f.packed_bytes(p.shape, p.channel_dim) for p in unit.params),
    )


@dataclass(frozen=True)
class SensitivityRow:
    unit: str
    format: str
    delta_nll_per_token: (
        float  # mean per-token log-perplexity change vs the base plan; inf: failed to evaluate
    )
    model_size_bytes: int
    packed_size_bytes: int

    @property
    def degradation(self) -> float:
        """Relative perplexity change vs the base plan."""
        return math.expm1(self.delta_nll_per_token) if math.isfinite(self.delta_nll_per_token) else math.inf

    def size_bytes(self, metric: str = "packed") -> int:
        return self.packed_size_bytes if metric == "packed" else self.model_size_bytes

    def to_dict(self) -> dict:
        d = self.delta_nll_per_token
        return {
            "unit": self.unit,
            "format": self.format,
            "delta_nll_per_token": d if math.isfinite(d) else None,
            "degradation": self.degradation if math.isfinite(d) else None,
            "model_size_bytes": self.model_size_bytes,
            "packed_size_bytes": self.packed_size_bytes,
        }


@dataclass(frozen=True)
class SensitivityTable:
    """Per-(unit, format) loss change vs ``base_plan`` on ``split`` (see module docstring)."""

    kind: str
    base_plan: Plan
    split: str
    n_tokens: int
    rows: tuple[SensitivityRow, ...]
    cost_evals: float  # full evaluations of the split, counted by work (the same on any machine and load)
    seconds: float
    base_perplexity: float | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
    degradation: str = "perplexity"  # what the deltas measure (qsweep.score.Degradation): perplexity or kld

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SensitivityError(f"unknown sensitivity kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.degradation not in DEGRADATIONS:
            raise SensitivityError(
                f"unknown sensitivity degradation {self.degradation!r}; valid: {', '.join(DEGRADATIONS)}"
            )
        object.__setattr__(self, "rows", tuple(self.rows))
        index = {(r.unit, r.format): r for r in self.rows}
        if len(index) != len(self.rows):
            raise SensitivityError("sensitivity table has duplicate (unit, format) rows")
        object.__setattr__(self, "_index", index)

    def row(self, unit: str, fmt: str) -> SensitivityRow:
        try:
            return self._index[(unit, fmt)]
        except KeyError:
            raise SensitivityError(
                f"the {self.kind} sensitivity table has no row for unit {unit!r} in format {fmt!r} "
                f"(rebuild it for this model and precision menu)"
            ) from None

    def delta(self, unit: str, fmt: str) -> float:
        return self.row(unit, fmt).delta_nll_per_token

    def choices(self) -> dict[str, tuple[str, ...]]:
        """unit -> formats with a row, in row order."""
        out: dict[str, list[str]] = {}
        for r in self.rows:
            out.setdefault(r.unit, []).append(r.format)
        return {u: tuple(f) for u, f in out.items()}

    def unit_sizes(self, metric: str = "packed") -> dict[str, dict[str, int]]:
        """unit -> format -> bytes (``packed`` or ``seed`` accounting), for the allocator."""
        out: dict[str, dict[str, int]] = {}
        for r in self.rows:
            out.setdefault(r.unit, {})[r.format] = r.size_bytes(metric)
        return out

    def to_dict(self) -> dict:
        return {
            "version": TABLE_VERSION,
            "kind": self.kind,
            "degradation": self.degradation,
            "split": self.split,
            "n_tokens": self.n_tokens,
            "cost_evals": self.cost_evals,
            "seconds": self.seconds,
            "base_perplexity": self.base_perplexity,
            "info": dict(self.info),
            "base_plan": self.base_plan.to_dict()["units"],
            "rows": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, raw: Mapping, source: str = "sensitivity table") -> SensitivityTable:
        if not isinstance(raw, Mapping) or raw.get("version") != TABLE_VERSION:
            raise SensitivityError(f"{source}: not a version-{TABLE_VERSION} qsweep sensitivity table")
        try:
            rows = [
                SensitivityRow(
                    str(r["unit"]),
                    str(r["format"]),
                    math.inf if r["delta_nll_per_token"] is None else float(r["delta_nll_per_token"]),
                    int(r["model_size_bytes"]),
                    int(r["packed_size_bytes"]),
                )
                for r in raw["rows"]
            ]
            return cls(
                kind=raw["kind"],
                base_plan=Plan(raw["base_plan"]),
                split=str(raw["split"]),
                n_tokens=int(raw["n_tokens"]),
                rows=tuple(rows),
                cost_evals=float(raw["cost_evals"]),
                seconds=float(raw["seconds"]),
                base_perplexity=raw.get("base_perplexity"),
                info=raw.get("info") or {},
                degradation=str(raw.get("degradation", "perplexity")),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, SensitivityError):
                raise
            raise SensitivityError(f"{source}: malformed ({type(e).__name__}: {e})") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        path = Path(path)
        raw = read_json_file(path, "sensitivity file", SensitivityError)
        return cls.from_dict(raw, f"sensitivity file {str(path)!r}")

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(r.to_dict() for r in self.rows)
        return path


def rank_correlation(a: SensitivityTable, b: SensitivityTable) -> float:
    """Spearman rank correlation of two tables' deltas over the rows both have, base rows (0 in both by
    definition) and non-finite rows left out."""
    from scipy.stats import spearmanr

    pairs = [
        (r.delta_nll_per_token, b.delta(r.unit, r.format))
        for r in a.rows
        if r.format != a.base_plan[r.unit] and (r.unit, r.format) in b._index
    ]
    pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        raise ValueError(f"rank correlation needs at least 3 common non-base rows, got {len(pairs)}")
    xs, ys = zip(*pairs, strict=True)
    return float(spearmanr(xs, ys).statistic)


def sensitivity_base(space: SearchSpace, baseline: Plan) -> Plan:
    """The plan rows depart from: each unit in the baseline's format where its menu allows it, else (fixed units,
    or a menu without the baseline's format) in its first menu format."""
    return Plan({u: baseline[u] if baseline[u] in c else c[0] for u, c in space.choices.items()})


def check_base(space: SearchSpace, base_plan: Plan) -> None:
    """A table's base plan must put every unit in a format its menu allows."""
    bad = [u for u, c in space.choices.items() if base_plan[u] not in c]
    if bad:
        raise SensitivityError(
            f"base plan puts unit {bad[0]!r} in {base_plan[bad[0]]!r}, which its menu does not allow "
            f"({', '.join(space.choices[bad[0]])}); use sensitivity_base(space, baseline)"
        )


def table_rows(applier: PlanApplier, space: SearchSpace, base_plan: Plan, deltas: Mapping) -> tuple:
    """One row per (unit, format) of ``space``: its delta (0 for the base format) and its bytes."""
    table = applier.table
    return tuple(
        SensitivityRow(u, f, 0.0 if f == base_plan[u] else deltas[(u, f)], *unit_bytes(table[u], f))
        for u, c in space.choices.items()
        for f in c
    )
