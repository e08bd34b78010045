"""apply_plan_ and PlanApplier: in-place fake quantization, exact identity for fp32, cached plan switches."""

from __future__ import annotations

import torch
from conftest import model_cfg, tiny_model

from qsweep.apply import PlanApplier, apply_plan_
from qsweep.formats import get_format
from qsweep.model import unit_table
from qsweep.plan import Plan


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fp32_plan_is_bit_identical():
    model = tiny_model("gpt2")
    before = _state(model)
    table = unit_table(model, model_cfg("gpt2"))
    apply_plan_(model, Plan.uniform(table, "fp32"), table)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_apply_quantizes_each_unit_with_its_format():
    model = tiny_model("gpt2")
    before = _state(model)
    table = unit_table(model, model_cfg("gpt2"))
    plan = Plan({**Plan.uniform(table, "fp32").formats, "h.0.mlp": "int4", "wte": "int8_channel"})
    apply_plan_(model, plan, table)
    w = model.transformer.h[0].mlp.c_fc.weight
    expected = get_format("int4").fake_quant(before["transformer.h.0.mlp.c_fc.weight"])
    assert torch.equal(w, expected)
    # tied lm_head follows wte (same tensor)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert not torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, before["transformer.h.1.mlp.c_fc.weight"])


def test_applier_switches_plans_from_the_originals():
    model = tiny_model("llama")
    original = _state(model)
    table = unit_table(model, model_cfg("llama"))
    applier = PlanApplier(model, table)
    applier.apply_(Plan.uniform(table, "int2"))
    int2_state = _state(model)
    applier.apply_(Plan.uniform(table, "int8"))
    applier.apply_(Plan.uniform(table, "int2"))  # back: same tensors, not int2 of int8
    assert all(torch.equal(int2_state[k], v) for k, v in model.state_dict().items())
    fresh = tiny_model("llama")
    apply_plan_(fresh, Plan.uniform(table, "int2"), table)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    applier.restore_()
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
