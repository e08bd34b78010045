"""Compression, degradation and fitness on known answers; the paired degradation CI by hand and by simulation."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import t as student_t

from qsweep.evaluate import EvalResult
from qsweep.metrics import compression, degradation, fitness, paired_degradation_ci


def result(window_nll, window_tokens, error: str | None = None) -> EvalResult:
    nll = torch.as_tensor(window_nll, dtype=torch.float64)
    tokens = torch.as_tensor(window_tokens, dtype=torch.int64)
    return EvalResult(float(nll.sum()), int(tokens.sum()), nll, tokens, 0.0, error)


def test_compression_degradation_fitness_known_answers():
    assert compression(248_900_000, 124_450_000) == 2.0
    assert compression(1000, 1000) == 1.0 and compression(1000, 4000) == 0.25
    assert degradation(110.0, 100.0) == pytest.approx(0.10, abs=1e-15)
    assert degradation(90.0, 100.0) == pytest.approx(-0.10, abs=1e-15)
    assert degradation(100.0, 100.0) == 0.0
    assert fitness(2.0, 0.05) == pytest.approx(1.5)  # penalty 10 by default: 2 - 10 * 0.05
    assert fitness(2.0, 0.05, penalty=4) == pytest.approx(1.8)
    assert fitness(2.0, 0.0) == 2.0
    assert fitness(2.0, -0.30) == 2.0  # an improvement is clipped to 0, not rewarded
    assert fitness(1.5, 0.2) == pytest.approx(-0.5)  # fitness may go negative


def test_fitness_matches_the_seed():
    # the seed's champion: 141,084,672 bytes, ppl 30.00 vs pinned 28.4805 and 248,900,000 -> fitness 1.230
    c = compression(248_900_000, 141_084_672)
    d = degradation(30.00, 28.4805)
    assert round(c, 3) == 1.764 and round(d, 4) == 0.0534
    assert round(fitness(c, d), 2) == 1.23  # the seed reports 1.230 from an unrounded perplexity


# Three windows of 4, 4 and 2 scored tokens; the plan adds 0.4, 0.8 and 0.0 nats to them.
BASE = result([10.0, 12.0, 5.0], [4, 4, 2])
PLAN = result([10.4, 12.8, 5.0], [4, 4, 2])


@pytest.mark.parametrize(("level", "lo", "hi"), [(0.95, -0.0905911095616, 0.397885113822),
                                                 (0.50, 0.0824292750045, 0.174440843090)])  # fmt: skip
def test_ci_by_hand(level, lo, hi):
    # delta = 1.2 / 10 = 0.12 nats per token; residuals d_i - delta * n_i = -0.08, 0.32, -0.24 (squares sum to
    # 0.1664); se = sqrt(3 / 2 * 0.1664) / 10. Student t with 2 degrees of freedom has a closed-form quantile:
    # P(|T| < q) = q / sqrt(2 + q^2), so q = sqrt(2 L^2 / (1 - L^2)) for a two-sided level L (4.3027 at 0.95).
    se = math.sqrt(1.5 * 0.1664) / 10
    q = math.sqrt(2 * level**2 / (1 - level**2))
    expected = (math.exp(0.12 - q * se) - 1, math.exp(0.12 + q * se) - 1)
    assert expected == pytest.approx((lo, hi), abs=1e-11)
    assert paired_degradation_ci(PLAN, BASE, level) == pytest.approx(expected, rel=1e-12)


def test_ci_contains_and_mirrors_the_point_estimate():
    lo, hi = paired_degradation_ci(PLAN, BASE)
    d = degradation(math.exp(PLAN.nll_sum / 10), math.exp(BASE.nll_sum / 10))
    assert d == pytest.approx(math.expm1(0.12), rel=1e-12)
    assert math.log1p(lo) + math.log1p(hi) == pytest.approx(
        2 * math.log1p(d), rel=1e-12
    )  # centred in log space
    lo2, hi2 = paired_degradation_ci(BASE, PLAN)  # the baseline vs the plan: the mirrored interval
    assert (math.log1p(lo2), math.log1p(hi2)) == pytest.approx((-math.log1p(hi), -math.log1p(lo)), rel=1e-12)


def test_identical_windows_give_a_zero_width_interval():
    assert paired_degradation_ci(BASE, BASE) == (0.0, 0.0)


def test_no_interval_from_one_window_or_a_failed_evaluation():
    assert paired_degradation_ci(result([3.0], [4]), result([2.0], [4])) is None
    failed = result([10.0, float("nan"), 5.0], [4, 4, 2], error="non-finite loss from window 1 of 3")
    assert paired_degradation_ci(failed, BASE) is None
    assert paired_degradation_ci(BASE, failed) is None


def test_ci_refuses_unpaired_results_and_bad_levels():
    with pytest.raises(ValueError, match="same windows"):
        paired_degradation_ci(result([10.0, 12.0, 5.0], [4, 4, 3]), BASE)
    with pytest.raises(ValueError, match="same windows"):
        paired_degradation_ci(result([10.0, 12.0], [4, 4]), BASE)
    for level in (0.0, 1.0, 95):
        with pytest.raises(ValueError, match=rf"confidence level must be in \(0, 1\), got {level}"):
            paired_degradation_ci(PLAN, BASE, level)


def simulate_coverage(n_windows: int, reps: int, min_tokens: int, seed: int) -> tuple[float, float]:
    """Fraction of ``reps`` 95% intervals covering the true degradation: (Student t as shipped, z = 1.96).

    Synthetic paired data with a known truth: each window has a random number of scored tokens n_i; the plan's
    per-token log-perplexity shift is mu plus a per-window effect (tau), plus per-token noise (sigma), so the
    window NLL difference is (mu + tau * u_i) * n_i + sigma * sqrt(n_i) * e_i and the true degradation is
    exp(mu) - 1. The baseline's own NLL (noisy too) cancels in the pairing.
    """
    mu, tau, sigma = 0.02, 0.02, 0.5
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(min_tokens, 257, (reps, n_windows), generator=g)  # [reps, k]
    n = tokens.double()

    def normal():
        return torch.randn(reps, n_windows, generator=g, dtype=torch.float64)

    base = 4.0 * n + n.sqrt() * normal()  # [reps, k]
    plan = base + (mu + tau * normal()) * n + sigma * n.sqrt() * normal()
    truth = math.expm1(mu)
    z_over_t = 1.96 / student_t.ppf(0.975, n_windows - 1)
    covered_t = covered_z = 0
    for r in range(reps):
        lo, hi = paired_degradation_ci(result(plan[r], tokens[r]), result(base[r], tokens[r]))
        covered_t += lo <= truth <= hi
        # the same centre and standard error with the normal quantile 1.96 instead of the t quantile
        a, b = math.log1p(lo), math.log1p(hi)
        centre, half = (a + b) / 2, (b - a) / 2 * z_over_t
        covered_z += math.expm1(centre - half) <= truth <= math.expm1(centre + half)
    return covered_t / reps, covered_z / reps


def test_ci_covers_the_true_degradation_95_percent_of_the_time():
    # 2000 repetitions: the binomial standard error of a 95% coverage estimate is 0.5 percentage points
    cover_t, cover_z = simulate_coverage(n_windows=30, reps=2000, min_tokens=32, seed=1)
    assert 0.93 <= cover_t <= 0.97
    assert cover_z <= cover_t  # with 29 degrees of freedom the two barely differ (measured 0.95 vs 0.94)


def test_t_quantile_keeps_coverage_with_few_windows():
    # 4 windows: t(3) gives 3.18 instead of 1.96; the normal quantile covers about 85% (measured 0.84-0.87)
    cover_t, cover_z = simulate_coverage(n_windows=4, reps=2000, min_tokens=128, seed=2)
    assert 0.93 <= cover_t <= 0.97
    assert cover_z < 0.90


def test_fitness_on_floats_arrays_and_tensors_is_the_same_number():
    """One fitness for every caller (issue 17): numpy arrays and torch tensors give, element by element, the float
    the scalar path gives, bit for bit; a NaN degradation counts as 0 on floats (``max``) and stays NaN on arrays."""
    import numpy as np

    comp = [4.25, 1.0, 2.0 / 3.0, 7.125]
    deg = [0.0137, -0.2, 0.5, 1e-9]
    scalars = [fitness(c, d, 10.0) for c, d in zip(comp, deg, strict=True)]
    arr = fitness(np.array(comp), np.array(deg), 10.0)
    assert isinstance(arr, np.ndarray) and arr.tolist() == scalars
    ten = fitness(torch.tensor(comp, dtype=torch.float64), torch.tensor(deg, dtype=torch.float64), 10.0)
    assert isinstance(ten, torch.Tensor) and ten.tolist() == scalars
    assert (
        fitness(np.array(3.0), np.array(0.25), 2.0) == 2.5
    )  # 0-d arrays (the refine step's single proposals)
    assert fitness(3.0, math.nan) == 3.0
    assert math.isnan(float(fitness(np.array([3.0]), np.array([math.nan]))[0]))


def test_the_fitness_expression_is_written_in_one_module():
    """``penalty * max(0, ...)`` (or its numpy/torch spellings) appears in qsweep/metrics.py only."""
    import re
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "qsweep"
    pattern = re.compile(r"penalty\s*\*\s*(?:\(?\s*(?:np\.)?max(?:imum)?\(|\w+\.clamp\()")
    hits = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if pattern.search(p.read_text()))
    assert hits == ["metrics.py"], hits
