"""Exact byte accounting for a plan, from parameter shapes alone (a meta-device model is enough).

Two numbers per plan:
  * ``model_size_bytes``: the seed's convention, sum over parameters of numel x bits / 8, scales not counted;
    this is what the user's compression ratio and fitness use, so results compare with the seed's.
  * ``packed_size_bytes``: what storing the plan really costs: low-bit codes packed densely plus every scale at
    its stored dtype (fp16), per the format's granularity.
Tied parameters are counted once (the unit table lists them once).
"""

from __future__ import annotations

from qsweep.formats import get_format
from qsweep.plan import Plan
from qsweep.units import UnitTable

__all__ = ["bits_per_param", "model_size_bytes", "packed_size_bytes"]


def model_size_bytes(table: UnitTable, plan: Plan) -> int:
    """Bytes under the seed's accounting (numel x bits / 8 per tensor, rounded up; no scales)."""
    plan.check_units(table)
    return sum(get_format(plan[u.name]).seed_bytes(p.numel) for u in table for p in u.params)


def packed_size_bytes(table: UnitTable, plan: Plan) -> int:
    """Bytes of packed codes plus scales: the real storage cost of ``plan``."""
    plan.check_units(table)
    return sum(get_format(plan[u.name]).packed_bytes(p.shape, p.channel_dim) for u in table for p in u.params)


def bits_per_param(table: UnitTable, plan: Plan, packed: bool = False) -> float:
    """Average storage bits per parameter (seed accounting, or packed with scales)."""
    size = packed_size_bytes(table, plan) if packed else model_size_bytes(table, plan)
    return 8 * size / table.numel
