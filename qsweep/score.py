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
"""

from __future__ import annotations

from dataclasses import dataclass

from qsweep.evaluate import EvalResult
from qsweep.heads import kld_summary
from qsweep.metrics import compression, degradation, fitness
from qsweep.plan import Plan

__all__ = ["RECORD_FIELDS", "SIZE_METRICS", "PlanScore", "size_key"]

SIZE_METRICS = ("packed", "seed")

# The scalar fields of a record, in the order reports write them (``bit_histogram`` is the one non-scalar field).
RECORD_FIELDS = (
    "split", "plan_digest", "perplexity", "baseline_perplexity", "degradation", "degradation_ci95_low",
    "degradation_ci95_high", "model_size_bytes", "packed_size_bytes", "baseline_size_bytes", "compression_seed",
    "compression_packed", "fitness_seed", "fitness_packed", "bits_per_param", "ppl_ratio", "kld_mean", "kld_median",
    "kld_p99", "kld_p999", "top1_agreement", "eval_tokens", "eval_share", "eval_seconds", "error",
)  # fmt: skip


def size_key(metric: str) -> str:
    """The record field holding the size of ``metric`` (``packed`` or ``seed``: its field keeps the name
    ``model_size_bytes``, which scripts read)."""
    return "packed_size_bytes" if metric == "packed" else "model_size_bytes"


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

    def record(self) -> dict:
        """The record (module docstring): every field of RECORD_FIELDS plus ``bit_histogram``."""
        ci = self.degradation_ci95 or (None, None)
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
            "eval_tokens": self.result.n_tokens,
            "eval_share": self.result.share,  # < 1: a partial evaluation (racing), on the split's first windows
            "eval_seconds": self.result.seconds,
            "error": self.result.error,
            "bit_histogram": self.bit_histogram,
        }
