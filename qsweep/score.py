"""A scored plan: one plan measured against the baseline on one split, and its one serialised form (the record).

The record (:meth:`PlanScore.record`) is the single way a scored plan is written: the CLI's JSON line, a trial's
user attributes, the rows of ``pareto.csv`` (prefixed ``search_`` / ``report_``) and ``results.json`` all use its
names. Sizes and the numbers derived from them say which accounting they use:

* ``model_size_bytes`` is the seed's accounting (numel x bits / 8, scales not counted); ``compression_seed`` and
  ``fitness_seed`` use it, so they compare with the seed's published numbers;
* ``packed_size_bytes`` is what storage really costs (packed codes plus fp16 scales); ``compression_packed`` and
  ``fitness_packed`` use it. Searches optimise the one named by ``search.size_metric`` (default ``packed``).

Both compressions divide the same ``baseline_size_bytes`` (the baseline plan's seed-accounting size, or the pinned
``baseline.size_bytes``); the baseline plans (fp16, fp32) have no scales, so for them both accountings agree.

**Degradation** (:class:`Degradation`, ``search.degradation``): what a search calls a plan's loss. Both kinds are a
mean per-token change in nats, ``delta``, and a relative degradation ``expm1(delta)`` that the fitness rule
(qsweep.metrics.fitness) penalises:

* ``perplexity`` (the user's, the default): ``delta = log(ppl / baseline_ppl)`` on the split's text, so
  ``expm1(delta)`` is the record's ``degradation`` and the fitness is ``fitness_<metric>``;
* ``kld``: ``delta = kld_mean``, the mean KL(baseline || plan) per token. Since ``KL = E_{y ~ baseline}[log p(y) -
  log q(y)]``, ``expm1(kld_mean)`` is the relative perplexity increase on text the baseline itself would write: the
  same scale as the user's degradation, but it compares whole distributions instead of the corpus's next tokens,
  so it is never negative and carries no sampling noise from which token came next. Its fitness is
  ``fitness_kld_<metric>`` and its interval ``kld_ci95_low``/``high`` (of ``kld_mean``, windows as samples).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from qsweep.evaluate import EvalResult
from qsweep.heads import kld_summary, mean_kld
from qsweep.metrics import compression, degradation, fitness, mean_interval
from qsweep.plan import Plan

__all__ = [
    "DEGRADATIONS",
    "PERPLEXITY",
    "RECORD_FIELDS",
    "SIZE_METRICS",
    "Degradation",
    "PlanScore",
    "size_key",
]

SIZE_METRICS = ("packed", "seed")
DEGRADATIONS = ("perplexity", "kld")

# The scalar fields of a record, in the order reports write them (``bit_histogram`` is the one non-scalar field).
RECORD_FIELDS = (
    "split", "plan_digest", "perplexity", "baseline_perplexity", "degradation", "degradation_ci95_low",
    "degradation_ci95_high", "model_size_bytes", "packed_size_bytes", "baseline_size_bytes", "compression_seed",
    "compression_packed", "fitness_seed", "fitness_packed", "bits_per_param", "ppl_ratio", "kld_mean", "kld_median",
    "kld_p99", "kld_p999", "top1_agreement", "kld_ci95_low", "kld_ci95_high", "fitness_kld_seed", "fitness_kld_packed",
    "eval_tokens", "eval_share", "eval_seconds", "error",
)  # fmt: skip


def size_key(metric: str) -> str:
    """The record field holding the size of ``metric`` (``packed`` or ``seed``: its field keeps the name
    ``model_size_bytes``, which scripts read)."""
    return "packed_size_bytes" if metric == "packed" else "model_size_bytes"


@dataclass(frozen=True)
class Degradation:
    """The loss a search ranks plans by (module docstring): ``perplexity`` or ``kld``. Every search module reads a
    record's degradation, its interval, fitness and the multi-objective value through this, so the two kinds share
    one rule each."""

    name: str = "perplexity"

    def __post_init__(self) -> None:
        if self.name not in DEGRADATIONS:
            raise ValueError(f"unknown degradation {self.name!r}; valid: {', '.join(DEGRADATIONS)}")

    @property
    def kld(self) -> bool:
        return self.name == "kld"

    @property
    def objective_key(self) -> str:
        """The record field a multi-objective study minimises beside the size."""
        return "kld_mean" if self.kld else "perplexity"

    def fitness_key(self, size_metric: str) -> str:
        return f"fitness_kld_{size_metric}" if self.kld else f"fitness_{size_metric}"

    def delta(self, record: Mapping) -> float | None:
        """The record's mean per-token change in nats (``log1p(degradation)``, or ``kld_mean``); None if unknown."""
        if self.kld:
            return record.get("kld_mean")
        d = record.get("degradation")
        return None if d is None else math.log1p(d) if d > -1 else -math.inf

    def value(self, record: Mapping) -> float | None:
        """The relative degradation ``expm1(delta)`` (the record's ``degradation`` itself for ``perplexity``)."""
        if not self.kld:
            return record.get("degradation")
        d = record.get("kld_mean")
        return None if d is None else math.expm1(d)

    def bound(self, record: Mapping, end: str) -> float | None:
        """The ``low`` or ``high`` end of the 95% interval of :meth:`value` on the record's windows, or None."""
        x = record.get(f"{'kld' if self.kld else 'degradation'}_ci95_{end}")
        return None if x is None else math.expm1(x) if self.kld else x

    def fitness_of(self, score: PlanScore, size_metric: str) -> float | None:
        """A score's fitness under this degradation (``fitness_key``'s value, without building the record)."""
        return score.kld_fitness(size_metric) if self.kld else score.fitness(size_metric)

    def window_losses(self, result: EvalResult) -> torch.Tensor | None:
        """Per-window sums whose differences between two plans on the same windows are their ``delta`` difference
        times the tokens: NLL, or KL (None without a reference)."""
        return result.window_kld if self.kld else result.window_nll


PERPLEXITY = Degradation("perplexity")  # the user's degradation: every rule's default


@dataclass(frozen=True)
class PlanScore:
    """One plan measured against the baseline on one split."""

    plan: Plan
    split: str
    result: EvalResult
    baseline_perplexity: float
    model_size_bytes: int
    packed_size_bytes: int
    baseline_size_bytes: int
    bit_histogram: dict[str, int]
    bits_per_param: float
    penalty: float
    degradation_ci95: tuple[float, float] | None = None

    @property
    def perplexity(self) -> float | None:
        return self.result.perplexity

    @property
    def degradation(self) -> float | None:
        return None if self.perplexity is None else degradation(self.perplexity, self.baseline_perplexity)

    def size_bytes(self, metric: str) -> int:
        """``seed``: the seed's accounting (no scales); ``packed``: codes plus scales."""
        return self.packed_size_bytes if metric == "packed" else self.model_size_bytes

    def compression(self, metric: str) -> float:
        return compression(self.baseline_size_bytes, self.size_bytes(metric))

    def fitness(self, metric: str) -> float | None:
        d = self.degradation
        return None if d is None else fitness(self.compression(metric), d, self.penalty)

    def kld_interval(self) -> tuple[float, float] | None:
        """The 95% interval of the mean per-token KL over this score's windows (None without KL or 2 windows)."""
        sums = self.result.window_kld if self.result.ok else None
        return None if sums is None else mean_interval(sums, self.result.window_tokens)

    def kld_fitness(self, metric: str) -> float | None:
        """The fitness with the KL degradation ``expm1(kld_mean)`` (module docstring), or None without KL."""
        k = self.result.token_kld
        if not self.result.ok or k is None or not len(k):
            return None
        return fitness(self.compression(metric), math.expm1(mean_kld(k)), self.penalty)

    def record(self) -> dict:
        """The record (module docstring): every field of RECORD_FIELDS plus ``bit_histogram``."""
        ci = self.degradation_ci95 or (None, None)
        kci = self.kld_interval() or (None, None)
        return {
            "split": self.split,
            "plan_digest": self.plan.digest(),
            "perplexity": self.perplexity,
            "baseline_perplexity": self.baseline_perplexity,
            "degradation": self.degradation,
            "degradation_ci95_low": ci[0],
            "degradation_ci95_high": ci[1],
            "model_size_bytes": self.model_size_bytes,
            "packed_size_bytes": self.packed_size_bytes,
            "baseline_size_bytes": self.baseline_size_bytes,
            "compression_seed": self.compression("seed"),
            "compression_packed": self.compression("packed"),
            "fitness_seed": self.fitness("seed"),
            "fitness_packed": self.fitness("packed"),
            "bits_per_param": self.bits_per_param,
            # llama.cpp's quant comparison: perplexity ratio, KL(baseline || plan) per token, same top-1 (qsweep.heads)
            "ppl_ratio": None if self.perplexity is None else self.perplexity / self.baseline_perplexity,
            **kld_summary(self.result.token_kld, self.result.same_top1),
            "kld_ci95_low": kci[0],
            "kld_ci95_high": kci[1],
            "fitness_kld_seed": self.kld_fitness("seed"),
            "fitness_kld_packed": self.kld_fitness("packed"),
            "eval_tokens": self.result.n_tokens,
            "eval_share": self.result.share,  # < 1: a partial evaluation (racing), on the split's first windows
            "eval_seconds": self.result.seconds,
            "error": self.result.error,
            "bit_histogram": self.bit_histogram,
        }
