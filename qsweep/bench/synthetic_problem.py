"""Synthetic allocation problems: per-unit sizes and degradations with interactions, scored without a model.

A problem stands in for a model + evaluator so that allocation methods can be compared in seconds against known
optima (the seed shipped such a benchmark beside its GPT-2 evaluator). Every unit takes one format of the
problem's menu; ``formats[0]`` is the baseline (protected) format. A plan, as the format index of every unit
``x[u]``, has

* size: ``sum_u size[u, x[u]]`` (packed bytes: codes + scales, as qsweep.formats counts them; ``model_size`` holds
  the seed's accounting), the baseline being every unit in ``formats[0]``;
* log-perplexity change vs the baseline ``delta(x) = g(a(x))`` with ``g(t) = t + saturation * t^2`` (monotone:
  many degraded units hurt more than the sum of their parts, as measured on real models) and
  ``a(x) = sum_u D[u, x[u]] + sum_{(i, j, c)} c * E[i, x[i]] * D[j, x[j]]``, where ``D[u, 0] = 0``,
  ``D >= 0``, and ``E[i, f] = D[i, f] / max_f D[i, f]`` is how exposed unit i is in format f (0 when protected,
  1 in its worst format): an interaction ``(i, j, c)`` adds ``c`` times j's penalty when i is fully degraded, so
  protecting i lowers j's penalty (the seed's "compensation");
* perplexity ``base_perplexity * exp(delta)``, degradation ``expm1(delta)`` and the user's fitness
  (``qsweep.metrics.fitness`` of ``baseline_bytes / size`` and the degradation).

A problem without interactions is *separable*: its Pareto front in (size, delta) is the front of ``sum D`` (g is
monotone), so it is solved exactly (qsweep.bench.synthetic_optima). A one-unit change from the baseline meets no
interaction (every other unit is protected), so the measured sensitivity table is ``g(D)`` exactly, blind to the
interactions, as a real one is; ``proxy`` holds the cheap estimate a study starts from (``D`` with seeded
multiplicative noise, costing ``proxy_cost_evals`` evaluations, like the one-pass Taylor proxy).

:class:`ProblemSession` implements what the search phases need of a session
(:class:`qsweep.search.protocol.SearchSession`: ``score``, ``baseline_size_bytes``, ``penalty``), returning real :class:`qsweep.score.PlanScore` records, so every qsweep
method (``phases.build_study`` and its phases: allocator, sampler, refine) runs on a problem unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsweep.errors import QsweepError, read_json_file
from qsweep.evaluate import EvalResult
from qsweep.metrics import fitness, paired_degradation_ci
from qsweep.plan import Plan
from qsweep.score import PlanScore
from qsweep.search.sensitivity import SensitivityRow, SensitivityTable
from qsweep.search.space import SearchSpace

__all__ = [
    "PROBLEM_VERSION",
    "Problem",
    "ProblemError",
    "ProblemSession",
    "ProblemWindows",
    "load_problems",
    "save_problems",
]

PROBLEM_VERSION = 1
_N_TOKENS = 10_000  # the notional scored tokens of a synthetic evaluation (only the NLL sum's scale)


class ProblemError(QsweepError, ValueError):
    """A synthetic problem file that cannot be read or is inconsistent."""


@dataclass(frozen=True, eq=False)
class Problem:
    """One synthetic allocation problem (module docstring); arrays are ``[n_units, n_formats]``."""

    name: str
    units: tuple[str, ...]
    formats: tuple[str, ...]
    size: np.ndarray  # packed bytes, int64
    model_size: np.ndarray  # the seed's numel x bits / 8, int64
    delta: np.ndarray  # D: one-unit log-perplexity change before saturation, float64, D[:, 0] == 0
    proxy: np.ndarray  # the proxy sensitivity table's estimate of the one-unit change
    interactions: tuple[tuple[int, int, float], ...] = ()
    saturation: float = 0.0
    base_perplexity: float = 30.0
    penalty: float = 10.0
    proxy_cost_evals: float = 2.0
    info: Mapping[str, Any] = field(default_factory=dict)  # how it was made (generator spec, seed, source)
    optimum: Mapping[str, Any] | None = None  # {fitness, plan, how, evaluations}
    reference_front: tuple[tuple[float, float], ...] = ()  # (size ratio, ppl ratio) points, when not exact

    def __post_init__(self) -> None:
        shape = (len(self.units), len(self.formats))
        for key in ("size", "model_size", "delta", "proxy"):
            a = np.asarray(getattr(self, key), dtype=np.int64 if "size" in key else np.float64)
            if a.shape != shape:
                raise ProblemError(f"problem {self.name!r}: {key} has shape {a.shape}, expected {shape}")
            a.setflags(write=False)
            object.__setattr__(self, key, a)
        if np.any(self.delta[:, 0] != 0) or np.any(self.delta < 0) or self.saturation < 0:
            raise ProblemError(
                f"problem {self.name!r}: needs delta[:, 0] == 0, delta >= 0 and saturation >= 0"
            )
        for i, j, _ in self.interactions:
            if not (0 <= i < shape[0] and 0 <= j < shape[0]) or i == j:
                raise ProblemError(f"problem {self.name!r}: bad interaction pair ({i}, {j})")
        worst = self.delta.max(axis=1)
        expo = np.divide(self.delta, worst[:, None], out=np.zeros(shape), where=worst[:, None] > 0)
        expo.setflags(write=False)
        object.__setattr__(self, "_exposure", expo)
        object.__setattr__(
            self, "_pairs", np.array([(i, j) for i, j, _ in self.interactions], np.int64).reshape(-1, 2)
        )
        object.__setattr__(self, "_coef", np.array([c for _, _, c in self.interactions], np.float64))

    # -- sizes and the baseline ----------------------------------------------------------------------------------

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def separable(self) -> bool:
        """No interaction terms: the exact optimum is a Pareto DP (qsweep.bench.synthetic_optima)."""
        return not self.interactions

    @property
    def baseline_bytes(self) -> int:
        return int(self.model_size[:, 0].sum())

    @property
    def n_plans(self) -> int:
        return len(self.formats) ** self.n_units

    # -- vectorised evaluation: X is [n, n_units] format indices ------------------------------------------------

    def additive(self, X: np.ndarray) -> np.ndarray:
        """``a(x)`` of each row of X (module docstring): the one-unit terms plus the interactions. [n]"""
        X = np.atleast_2d(X)
        rows = np.arange(self.n_units)
        a = self.delta[rows, X].sum(axis=1)
        if len(self._coef):
            i, j = self._pairs[:, 0], self._pairs[:, 1]
            a = a + (self._coef * self._exposure[i, X[:, i]] * self.delta[j, X[:, j]]).sum(axis=1)
        return a

    def saturate(self, a: np.ndarray) -> np.ndarray:
        return a + self.saturation * a * a

    def delta_nll(self, X: np.ndarray) -> np.ndarray:
        return self.saturate(self.additive(X))

    def sizes(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(X)
        return self.size[np.arange(self.n_units), X].sum(axis=1)

    def fitness(self, X: np.ndarray) -> np.ndarray:
        """The user's fitness of each row of X (packed sizes). [n]"""
        return self.fitness_of(self.sizes(X), self.delta_nll(X))

    def fitness_of(self, size: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return fitness(self.baseline_bytes / np.asarray(size, float), np.expm1(delta), self.penalty)

    def ratio_points(self, size: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """(size ratio, perplexity ratio) of plans: qsweep.search.front's coordinates. [n, 2]"""
        return np.stack(
            [np.asarray(size, float) / self.baseline_bytes, np.exp(np.asarray(delta, float))], axis=1
        )

    # -- plans ---------------------------------------------------------------------------------------------------

    @property
    def space(self) -> SearchSpace:
        return SearchSpace({u: self.formats for u in self.units})

    def plan(self, x: Sequence[int]) -> Plan:
        return Plan({u: self.formats[int(f)] for u, f in zip(self.units, x, strict=True)})

    def indices(self, plan: Plan | Mapping[str, str]) -> np.ndarray:
        formats = plan.formats if isinstance(plan, Plan) else plan
        try:
            return np.array([self.formats.index(formats[u]) for u in self.units], np.int64)
        except (KeyError, ValueError):
            raise ProblemError(f"plan does not fit problem {self.name!r} (units {self.units[:3]}..., formats "
                               f"{', '.join(self.formats)})") from None  # fmt: skip

    def uniform(self, f: int) -> np.ndarray:
        return np.full(self.n_units, f, np.int64)

    # -- sensitivity tables --------------------------------------------------------------------------------------

    def sensitivity_table(self, kind: str = "proxy") -> SensitivityTable:
        """``proxy``: the noisy estimate (cost ``proxy_cost_evals``); ``measured``: the exact one-unit changes
        ``g(D)`` (cost: one evaluation per non-baseline (unit, format))."""
        values = self.proxy if kind == "proxy" else self.saturate(self.delta)
        cost = self.proxy_cost_evals if kind == "proxy" else float(self.n_units * (len(self.formats) - 1))
        rows = tuple(
            SensitivityRow(u, f, float(values[i, k]), int(self.model_size[i, k]), int(self.size[i, k]))
            for i, u in enumerate(self.units)
            for k, f in enumerate(self.formats)
        )
        return SensitivityTable(kind=kind, base_plan=self.plan(self.uniform(0)), split="validation",
                                n_tokens=_N_TOKENS, rows=rows, cost_evals=cost, seconds=0.0,
                                base_perplexity=self.base_perplexity, info={"synthetic": self.name})  # fmt: skip

    # -- JSON ----------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "units": list(self.units),
            "formats": list(self.formats),
            "size": self.size.tolist(),
            "model_size": self.model_size.tolist(),
            "delta": self.delta.tolist(),
            "proxy": self.proxy.tolist(),
            "interactions": [[int(i), int(j), float(c)] for i, j, c in self.interactions],
            "saturation": self.saturation,
            "base_perplexity": self.base_perplexity,
            "penalty": self.penalty,
            "proxy_cost_evals": self.proxy_cost_evals,
            "info": dict(self.info),
            "optimum": None if self.optimum is None else dict(self.optimum),
            "reference_front": [list(p) for p in self.reference_front],
        }

    @classmethod
    def from_dict(cls, raw: Mapping, source: str = "synthetic problem") -> Problem:
        try:
            return cls(
                name=str(raw["name"]),
                units=tuple(raw["units"]),
                formats=tuple(raw["formats"]),
                size=np.array(raw["size"], np.int64),
                model_size=np.array(raw["model_size"], np.int64),
                delta=np.array(raw["delta"], np.float64),
                proxy=np.array(raw["proxy"], np.float64),
                interactions=tuple((int(i), int(j), float(c)) for i, j, c in raw.get("interactions", ())),
                saturation=float(raw.get("saturation", 0.0)),
                base_perplexity=float(raw.get("base_perplexity", 30.0)),
                penalty=float(raw.get("penalty", 10.0)),
                proxy_cost_evals=float(raw.get("proxy_cost_evals", 2.0)),
                info=raw.get("info") or {},
                optimum=raw.get("optimum"),
                reference_front=tuple(tuple(p) for p in raw.get("reference_front", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ProblemError):
                raise
            raise ProblemError(f"{source}: malformed ({type(e).__name__}: {e})") from None

    def with_(self, **changes) -> Problem:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(changes)
        return Problem(**d)


def save_problems(problems: Sequence[Problem], path: str | Path, split: str) -> Path:
    """Write a problem set (one split: train, valid or test) as JSON; same problems, same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"version": PROBLEM_VERSION, "split": split, "problems": [p.to_dict() for p in problems]}
    path.write_text(json.dumps(blob, separators=(",", ":")) + "\n")
    return path


def load_problems(path: str | Path) -> list[Problem]:
    path = Path(path)
    raw = read_json_file(path, "synthetic problem file", ProblemError)
    if not isinstance(raw, Mapping) or raw.get("version") != PROBLEM_VERSION:
        raise ProblemError(f"{str(path)!r}: not a version-{PROBLEM_VERSION} qsweep synthetic problem set")
    return [Problem.from_dict(p, f"{path}: problem {k}") for k, p in enumerate(raw.get("problems", []))]


class ProblemWindows:
    """The notional windows of a synthetic evaluation: what racing needs of an evaluator (``n_windows``,
    ``n_tokens``, ``window_tokens``, ``windows_within``)."""

    def __init__(self, n_windows: int):
        sizes = np.full(n_windows, _N_TOKENS // n_windows)
        sizes[: _N_TOKENS % n_windows] += 1
        self.window_tokens = torch.tensor(sizes, dtype=torch.int64)
        self.n_windows, self.n_tokens = n_windows, _N_TOKENS

    def windows_within(self, share: float) -> int:
        return int((torch.cumsum(self.window_tokens, 0) <= share * self.n_tokens + 1e-9).sum())


class ProblemSession:
    """A :class:`qsweep.search.protocol.SearchSession` on a synthetic problem: ``score(plan, split)`` returns a
    :class:`PlanScore`, ``baseline_size_bytes``, ``penalty``; ``n_scored`` counts the calls and ``evaluations``
    the full evaluations they add up to (duplicates included: the Objective answers those itself).

    ``n_windows`` > 1 splits the notional evaluation into windows, so a plan can be scored on part of them (racing:
    ``windows`` is what the objective needs): window ``w`` (``n_w`` tokens) has the log-perplexity change
    ``delta * m_w + e_w``, with a difficulty ``m_w`` shared by every plan (log-normal, spread ``window_spread``) and
    a plan's own noise ``e_w`` (normal, sd ``window_spread * delta``, seeded by the plan), both weighted to mean 0
    over the split (``m`` to mean 1), so a full evaluation is exact and a partial one is noisy, as on real text where
    two quantized plans find the same windows hard."""

    def __init__(self, problem: Problem, n_windows: int = 1, window_spread: float = 0.3):
        self.problem = problem
        self.baseline_size_bytes = problem.baseline_bytes
        self.penalty = problem.penalty
        self.table = None  # no UnitTable: plans are built from the problem's units
        self.n_scored = 0
        self.evaluations = 0.0
        self.windows = ProblemWindows(n_windows)
        self.window_spread = window_spread
        t = self.windows.window_tokens.double().numpy()
        m = np.random.default_rng(0).lognormal(0.0, window_spread, n_windows) if n_windows > 1 else np.ones(1)
        self._difficulty = m / (m * t).sum() * t.sum()

    def baseline_perplexity(self, split: str = "validation") -> float:
        return self.problem.base_perplexity

    def _bits(self, x: np.ndarray) -> float:
        """Bits per parameter, with the baseline format counted as 16 bits (problems carry no parameter counts)."""
        p = self.problem
        return 16.0 * float(p.model_size[np.arange(p.n_units), x].sum()) / p.baseline_bytes

    def _window_nll(self, plan: Plan, delta: float) -> torch.Tensor:
        t = self.windows.window_tokens.double().numpy()
        per = delta * self._difficulty
        if self.windows.n_windows > 1:
            seed = int(plan.digest()[:12], 16)
            e = np.random.default_rng(seed).normal(
                0.0, self.window_spread * abs(delta), self.windows.n_windows
            )
            per = per + e - (e * t).sum() / t.sum()
        return torch.tensor(t * (math.log(self.problem.base_perplexity) + per), dtype=torch.float64)

    def score(
        self, plan: Plan, split: str = "validation", stop: int | None = None, resume: PlanScore | None = None
    ) -> PlanScore:
        p = self.problem
        x = p.indices(plan)[None, :]
        self.n_scored += 1
        delta = float(p.delta_nll(x)[0])
        w = self.windows
        stop = w.n_windows if stop is None else min(max(1, stop), w.n_windows)
        nll = self._window_nll(plan, delta)[:stop]
        tokens = w.window_tokens[:stop]
        done = 0 if resume is None else len(resume.result.window_nll)
        self.evaluations += float(tokens[done:].sum()) / w.n_tokens
        result = EvalResult(
            float(nll.sum()), int(tokens.sum()), nll, tokens, seconds=0.0, split_tokens=w.n_tokens
        )
        ci = None
        if stop > 1:
            base_nll = tokens.double() * math.log(p.base_perplexity)
            base = EvalResult(float(base_nll.sum()), int(tokens.sum()), base_nll, tokens, seconds=0.0)
            ci = paired_degradation_ci(result, base)
        hist: dict[str, int] = {}
        for f in plan.formats.values():
            hist[f] = hist.get(f, 0) + 1
        return PlanScore(plan=plan, split=split, result=result, baseline_perplexity=p.base_perplexity,
                         model_size_bytes=int(p.model_size[np.arange(p.n_units), x[0]].sum()),
                         packed_size_bytes=int(p.sizes(x)[0]), baseline_size_bytes=p.baseline_bytes,
                         bit_histogram=hist, bits_per_param=self._bits(x[0]), penalty=p.penalty,
                         degradation_ci95=ci)  # fmt: skip
