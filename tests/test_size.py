"""Exact sizes of the seed's named plans on GPT-2 small, from its config alone (../shared/REFERENCE.md)."""

from __future__ import annotations

import pytest

from qsweep.plan import Plan, named_plan_spec, plan_from_config, plan_names
from qsweep.size import bits_per_param, model_size_bytes, packed_size_bytes

SEED_SIZES = {
    "attn0_mlp123": 141_084_672,
    "attn1_mlp123": 143_447_040,
    "attn2_mlp123": 145_809_408,
    "emb_int8_first4": 155_256_576,
    "all_int8_attn": 138_722_304,
    "int8": 124_555_008,
    "fp16": 248_879_616,
}


def _named(name, table):
    return plan_from_config(named_plan_spec(name), table)


@pytest.mark.parametrize(("name", "size"), SEED_SIZES.items())
def test_seed_plan_sizes_exact(name, size, gpt2_small_table):
    assert model_size_bytes(gpt2_small_table, _named(name, gpt2_small_table)) == size


def test_champion_compression_vs_pinned_baseline(gpt2_small_table):
    assert (
        round(248_900_000 / model_size_bytes(gpt2_small_table, _named("attn0_mlp123", gpt2_small_table)), 3)
        == 1.764
    )


def test_every_named_plan_ships(gpt2_small_table):
    assert set(plan_names()) >= set(SEED_SIZES)


def test_packed_size_adds_scales(gpt2_small_table):
    t = gpt2_small_table
    fp16 = Plan.uniform(t, "fp16")
    assert packed_size_bytes(t, fp16) == model_size_bytes(t, fp16)
    int4 = Plan.uniform(
        t, "int4"
    )  # flattened groups of 128, one fp16 scale per group (per tensor, rounded up)
    n_scales = sum(-(-p.numel // 128) for u in t for p in u.params)
    assert packed_size_bytes(t, int4) == 124_439_808 // 2 + 2 * n_scales
    assert bits_per_param(t, int4) == 4.0
    assert 4.12 < bits_per_param(t, int4, packed=True) < 4.13


def test_fewer_bits_smaller_plan(gpt2_small_table):
    t = gpt2_small_table
    sizes = [
        packed_size_bytes(t, Plan.uniform(t, f)) for f in ("fp32", "fp16", "int8", "int4", "int3", "int2")
    ]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
