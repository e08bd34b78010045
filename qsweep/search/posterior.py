"""The sensitivity table corrected by what the study measured: the refine step's model learns from each trial.

The refine step prices a move by the table's rows (qsweep.search.refine). Without this module a measurement moves
only the anchor and the two numbers of the calibration ``g``: a row the table got wrong stays wrong, so every
two-unit move holding that row ranks high again, and each is measured, and each disappoints. Here every row gets a
correction, fitted to every measured plan:

* **Model.** A plan's measured loss change ``y`` is ``g(sum_u t[u, f_u])`` with ``t = table + c``: ``g`` is the
  study's calibration (fitted to the table alone), so ``z = g^-1(y)`` is the additive sum the plan *should* have
  had, and ``z - sum_u table[u, f_u]`` is a linear observation of the corrections of its rows.
* **Prior.** The table's errors are shared: a unit whose curvature the proxy misjudges is off in every format, and
  a format's error model is off in every unit. So ``c[u, f] = table[u, f] * (a[u] + b[f]) + r[u, f]`` with
  independent normal priors: ``a`` (per unit) and ``b`` (per format) of standard deviation ``UNIT_REL`` and
  ``FORMAT_REL`` (relative to the row), and the row's own ``r`` of ``ROW_REL * |table[u, f]|`` plus ``floor``
  (a tenth of the median non-zero row) in quadrature, so a row the table puts at zero may still move. One
  measured move of a unit then reprices the unit's other formats too.
* **Misfit.** The additive model is not exact, least of all far from the plans the step moves around, so each
  observation carries a misfit of standard deviation ``MISFIT_REL * |z|`` (a plan a hundred times worse than the
  others, uniform int2, moves the rows less than its size would say), correlated between two plans as
  ``exp(-units they differ in / MISFIT_UNITS)``: the difference of two near plans is measured almost exactly, so a
  one-unit move prices its row, not the plans' common level. Plus ``floor`` in quadrature.
* **Fit.** The posterior mean, by normal equations in the coefficients (their number does not grow with the
  study).

The base plan's rows (the formats the table was measured against) stay as they are: their change is zero by
construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from qsweep.search.sensitivity import SensitivityError, SensitivityTable

__all__ = ["FORMAT_REL", "MISFIT_REL", "ROW_REL", "UNIT_REL", "RowCovariance", "posterior_table"]

UNIT_REL = 0.5  # prior standard deviation of a unit's shared relative error
FORMAT_REL = 0.5  # ... of a format's shared relative error
ROW_REL = 0.5  # ... of a row's own relative error
MISFIT_REL = 0.1  # an observation's misfit standard deviation, relative to its additive sum
MISFIT_UNITS = 8.0  # plans this many units apart have misfits correlated exp(-1) (0: independent misfits)
FLOOR_REL = 0.1  # the floor of both, relative to the median row's |value|


def posterior_table(
    table: SensitivityTable, plans: Sequence, deltas: Sequence[float], g_inverse, covariance: bool = True
) -> tuple[SensitivityTable, RowCovariance | None]:
    """``table`` with every row moved to its posterior mean given the measured ``plans`` (each a
    qsweep.plan.Plan) and their loss changes ``deltas`` (module docstring), and the rows' posterior covariance.
    ``g_inverse`` maps a measured change to the additive sum the calibration says it came from. ``(table, None)``
    when nothing usable is measured; the covariance is None when ``covariance`` is false (it costs a solve with
    one right-hand side per row: skipped when nothing ranks by it)."""
    rows = table.rows
    base = table.base_plan.formats
    free = [
        i for i, r in enumerate(rows) if base.get(r.unit) != r.format and math.isfinite(r.delta_nll_per_token)
    ]
    if not free or not plans:
        return table, None
    index = {(rows[i].unit, rows[i].format): k for k, i in enumerate(free)}
    value = np.array([rows[i].delta_nll_per_token for i in free])
    x = np.zeros((len(plans), len(free)))
    fixed = np.zeros(len(plans))  # the table's sum over rows outside the fit (base formats, fixed units)
    ok = np.ones(len(plans), bool)
    for m, plan in enumerate(plans):
        for u, f in plan.formats.items():
            k = index.get((u, f))
            if k is not None:
                x[m, k] = 1.0
            elif base.get(u) != f:
                try:
                    fixed[m] += table.delta(u, f)
                except SensitivityError:  # a unit the table has no row for: this plan says nothing here
                    ok[m] = False
    z = np.asarray(g_inverse(np.asarray(deltas, float)), float)
    ok &= np.isfinite(z) & np.isfinite(fixed)
    if not ok.any():
        return table, None
    x, z, fixed = x[ok], z[ok], fixed[ok]
    floor = _floor(value)
    # the row corrections as a linear map of the coefficients (a, b, and each row's own e * value + d):
    # c = basis @ coef
    units = np.unique([rows[i].unit for i in free], return_inverse=True)[1]
    formats = np.unique([rows[i].format for i in free], return_inverse=True)[1]
    n_u, n_f = units.max() + 1, formats.max() + 1
    basis = np.concatenate(
        [
            value[:, None] * (units[:, None] == np.arange(n_u)),
            value[:, None] * (formats[:, None] == np.arange(n_f)),
            np.eye(len(free)),
        ],
        axis=1,
    )
    prior = np.concatenate(
        [np.full(n_u, UNIT_REL**2), np.full(n_f, FORMAT_REL**2), (ROW_REL * value) ** 2 + floor**2]
    )
    design = x @ basis
    chol = _cholesky(_misfit(plans, ok, z, floor))
    wd = np.linalg.solve(chol, design)  # whitened
    wr = np.linalg.solve(chol, z - fixed - x @ value)
    precision = wd.T @ wd + np.diag(1.0 / prior)
    coef = np.linalg.solve(precision, wd.T @ wr)
    moved = dict(zip(free, value + basis @ coef, strict=True))
    new = replace(table, rows=tuple(replace(r, delta_nll_per_token=float(moved[i])) if i in moved else r
                                    for i, r in enumerate(rows)))  # fmt: skip
    if not covariance:
        return new, None
    # the rows' posterior covariance, indexed by (unit, format); the base plan's rows are exact (absent)
    return new, RowCovariance(index, basis @ np.linalg.solve(precision, basis.T))


def _floor(value: np.ndarray) -> float:
    """The prior's and the misfit's floor: a tenth of the median non-zero row (1e-6 if every row is zero)."""
    nonzero = np.abs(value[value != 0])
    return FLOOR_REL * float(np.median(nonzero)) if nonzero.size else 1e-6


def _misfit(plans: Sequence, ok: np.ndarray, z: np.ndarray, floor: float) -> np.ndarray:
    """The observations' misfit covariance: ``(MISFIT_REL z_m)(MISFIT_REL z_n) exp(-apart / MISFIT_UNITS)``, with
    ``apart`` the number of units two plans differ in, plus ``floor**2`` on the diagonal."""
    scale = MISFIT_REL * np.abs(z)
    if MISFIT_UNITS > 0:
        pairs = {uf: k for k, uf in enumerate(sorted({uf for p in plans for uf in p.formats.items()}))}
        onehot = np.zeros((len(plans), len(pairs)))
        for m, p in enumerate(plans):
            onehot[m, [pairs[uf] for uf in p.formats.items()]] = 1.0
        onehot = onehot[ok]
        n_units = onehot.sum(1)
        # units two plans differ in
        apart = np.maximum(n_units[:, None], n_units[None, :]) - onehot @ onehot.T
        cov = scale[:, None] * scale[None, :] * np.exp(-apart / MISFIT_UNITS)
    else:
        cov = np.diag(scale**2)
    cov[np.diag_indices_from(cov)] += floor**2
    return cov


def _cholesky(cov: np.ndarray) -> np.ndarray:
    """The lower Cholesky factor, with jitter added until it exists (rounding can break the definiteness of a
    covariance whose plans nearly coincide)."""
    jitter = 0.0
    for _ in range(8):
        try:
            return np.linalg.cholesky(cov + jitter * np.eye(len(cov)))
        except np.linalg.LinAlgError:
            jitter = max(10 * jitter, 1e-12 * float(np.max(np.diag(cov))) + 1e-300)
    return np.diag(np.sqrt(np.maximum(np.diag(cov), 1e-300)))


@dataclass(frozen=True)
class RowCovariance:
    """The posterior covariance of the corrected rows: how uncertain a move's predicted change still is."""

    index: Mapping[tuple[str, str], int]
    cov: np.ndarray

    def vectors(self, moves: Sequence[tuple[str, str, str]]) -> np.ndarray:
        """Each move ``(unit, from_format, to_format)`` as a row-change vector (+1 the new row, -1 the old)."""
        out = np.zeros((len(moves), len(self.cov)))
        for i, (u, old, new) in enumerate(moves):
            for f, sign in ((new, 1.0), (old, -1.0)):
                k = self.index.get((u, f))
                if k is not None:
                    out[i, k] += sign
        return out

    def sd(self, moves: Sequence[tuple[str, str, str]]) -> float:
        """The posterior standard deviation of the summed row change of ``moves`` (different units) made together."""
        v = self.vectors(moves).sum(0)
        return math.sqrt(max(float(v @ self.cov @ v), 0.0))
