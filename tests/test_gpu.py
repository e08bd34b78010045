"""GPU correctness (run on a CUDA machine with `pytest -m gpu`): the GPU paths agree with the CPU reference."""

from __future__ import annotations

import pytest
import torch
from conftest import model_cfg, tiny_model

from qsweep.apply import PlanApplier
from qsweep.evaluate import Evaluator
from qsweep.model import unit_table
from qsweep.plan import Plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def setup():
    ids = torch.randint(0, 101, (4000,), generator=torch.Generator().manual_seed(0))
    cpu = tiny_model("gpt2")
    ref = Evaluator(ids, 64, 32, device="cpu").evaluate(cpu).perplexity
    return ids, ref


def test_fp32_on_gpu_matches_cpu(setup):
    ids, ref = setup
    res = Evaluator(ids, 64, 32, device="cuda", dtype="fp32").evaluate(tiny_model("gpt2").cuda())
    assert res.perplexity == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_compute_is_close(setup, dtype, compile):
    ids, ref = setup
    res = Evaluator(ids, 64, 32, device="cuda", dtype=dtype, compile=compile).evaluate(
        tiny_model("gpt2").cuda()
    )
    assert res.perplexity == pytest.approx(ref, rel=1e-2)


def test_plan_switch_on_gpu_equals_cpu_quantization():
    cpu, gpu = tiny_model("llama"), tiny_model("llama").cuda()
    table = unit_table(cpu, model_cfg("llama"))
    cpu_applier, gpu_applier = PlanApplier(cpu, table), PlanApplier(gpu, table)
    for fmt in ("int8", "int4_g32", "int3", "int2_g32", "fp16"):
        plan = Plan.uniform(table, fmt)
        cpu_applier.apply_(plan)
        gpu_applier.apply_(plan)
        for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters(), strict=True):
            torch.testing.assert_close(a, b.cpu(), rtol=0, atol=1e-6, msg=f"{fmt} {name}")
