"""Which model family a plan's unit names are written for.

Plans name units by regex, and unit names differ by architecture (conf/model/*.yaml): GPT-2 has ``wte``,
``h.N.attn``, ``h.N.mlp``, ``h.N.ln_1``; OPT and Llama have ``embed_tokens``, ``layers.N.attn``,
``layers.N.attn_norm``. The generic shipped plans (``fp16``, ``int8``) are written to fit every family; the seed's
plans (``attn0_mlp123``, ...) name GPT-2 small's units. Applied to another family such a plan fails on its first
rule that matches nothing, which says what failed but not why: :func:`resolve_for_model` re-resolves a failing
plan against GPT-2 small's units and, when it fits those, says in one line that it is written for GPT-2.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import yaml

from qsweep.paths import config_dir
from qsweep.plan import Plan, PlanError, plan_from_config
from qsweep.units import UnitTable

__all__ = ["GPT2_UNIT_NAMES", "gpt2_reference_table", "resolve_for_model", "summarise_units"]

GPT2_UNIT_NAMES = "wte, wpe, h.N.attn, h.N.mlp, h.N.ln_1, h.N.ln_2, ln_f"


@functools.cache
def gpt2_reference_table() -> UnitTable:
    """GPT-2 small's units at the seed's (component) granularity, from its config alone (meta device)."""
    from transformers import GPT2Config

    from qsweep.model import meta_model, unit_table

    cfg = yaml.safe_load((config_dir() / "model" / "gpt2.yaml").read_text())
    return unit_table(meta_model(GPT2Config()), {**cfg, "granularity": "component"})


def summarise_units(table: UnitTable, limit: int = 5) -> str:
    """The first ``limit`` distinct unit names with block numbers written ``N``: ``embed_tokens, layers.N.attn``."""
    seen: list[str] = []
    for name in table.names:
        generic = re.sub(r"\.\d+(?=\.|$)", ".N", name)
        if generic not in seen:
            seen.append(generic)
    return ", ".join(seen[:limit]) + (", ..." if len(seen) > limit else "")


def resolve_for_model(raw: Mapping, table: UnitTable, source: str = "plan") -> Plan:
    """``plan_from_config(raw, table, source)``; a plan written for GPT-2 that does not fit a model of another
    family fails with one line saying so (and naming this model's units) instead of the first rule that missed."""
    try:
        return plan_from_config(raw, table, source)
    except PlanError as err:
        if "wte" in table.names:  # a GPT-2 family model: the plan's own message is the right one
            raise
        try:
            plan_from_config(raw, gpt2_reference_table(), source)
        except PlanError:
            raise err from None
        raise PlanError(
            f"{source} is written for GPT-2 unit names ({GPT2_UNIT_NAMES}) and this model's units are "
            f"{summarise_units(table)}; use a generic plan (plan=fp16, plan=int8) or write rules for these "
            f"names (README: Plan files)"
        ) from None
