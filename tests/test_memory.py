"""Memory that grows with the model, not with the menu (issue 18): the plan switcher's pristine copy and bounded
cache, loading in the checkpoint's dtype, the evaluation dtype policy, the streaming proxy sensitivity, the memory
estimate and its one-line refusals, and the placement across GPUs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, model_cfg, tiny_model

from qsweep.apply import PlanApplier, apply_plan_
from qsweep.memory import (
    GIB,
    MemoryEstimate,
    ResourceError,
    check_fits,
    estimate_memory,
    out_of_memory_message,
    resolve_eval_dtype,
    split_across_gpus,
)
from qsweep.model import checkpoint_dtype, load_model, unit_table
from qsweep.plan import Plan
from qsweep.session import EvalSession

# Perplexities of the bundled model (fp32, eval.max_tokens=4096, conf defaults otherwise) measured with the code
# before issue 18 (commit 3207cdb: fp32 originals + a dense cache per (parameter, format)). Same plans, same numbers.
BEFORE = {
    "fp16/validation": 47.189118870833695, "fp16/test": 31.245628320329107,
    "int8/validation": 47.18575375218577, "int8/test": 31.273038985835086,
    "int4_g128/validation": 48.88746008985382, "int4_g128/test": 32.9690655154529,
    "int3_g32/validation": 57.617972384240495, "int3_g32/test": 37.90268814746203,
    "mixed/validation": 107.40111081561908, "mixed/test": 68.36584148108376,
}  # fmt: skip


def _plans(table) -> dict[str, Plan]:
    mixed = ["int4_g128", "int2_g32", "int8_channel", "fp16"]
    return {
        **{f: Plan.uniform(table, f) for f in ("fp16", "int8", "int4_g128", "int3_g32")},
        "mixed": Plan({u: mixed[i % 4] if u.startswith("h.") else "fp32" for i, u in enumerate(table.names)}),
    }


@pytest.mark.parametrize(
    ("cache_mb", "keys"),
    [
        pytest.param(512, [*BEFORE, "int4_g128/validation"], marks=pytest.mark.slow),  # 18 s
        (0, ["mixed/validation", "int3_g32/test", "mixed/validation"]),
    ],
)
def test_the_bundled_models_perplexities_are_unchanged(tmp_path, cache_mb, keys):
    """Exactness first: with the cache or quantizing every change anew, in any order (a plan switched back to
    gives its number again), the numbers of before."""
    session = EvalSession(
        compose_config("eval.max_tokens=4096", f"eval.cache_mb={cache_mb}", tmp_path=tmp_path)
    )
    assert session.dtype == "fp32"
    plans = _plans(session.table)
    for key in keys:
        name, split = key.split("/")
        assert session.evaluate(plans[name], split).perplexity == pytest.approx(BEFORE[key], rel=1e-6, abs=0)
    if cache_mb == 0:
        assert session.applier.cached_bytes == 0


def test_the_cache_keeps_its_byte_budget_and_evicts_the_least_recently_used():
    model = tiny_model("gpt2")
    table = unit_table(model, model_cfg("gpt2"))
    ref = tiny_model("gpt2")
    wte = model.transformer.wte.weight
    one = wte.numel() * 4
    applier = PlanApplier(model, table, cache_bytes=2 * one)
    for fmt in ("int8", "int4_g32", "int2_g32"):
        q = applier.quantized("transformer.wte.weight", 0, fmt)
        assert applier.cached_bytes <= 2 * one
    assert applier.n_quantized == 3
    applier.quantized("transformer.wte.weight", 0, "int2_g32")  # the most recent: a hit
    assert applier.n_quantized == 3
    applier.quantized(
        "transformer.wte.weight", 0, "int8"
    )  # evicted first (least recently used): computed again
    assert applier.n_quantized == 4
    expected = apply_plan_(ref, Plan.uniform(table, "int8"), table).transformer.wte.weight
    assert torch.equal(applier.quantized("transformer.wte.weight", 0, "int8"), expected)
    del q


def test_without_a_cache_plan_switches_give_the_same_weights():
    model, other = tiny_model("llama"), tiny_model("llama")
    table = unit_table(model, model_cfg("llama"))
    cached, uncached = PlanApplier(model, table), PlanApplier(other, table, cache_bytes=0)
    for fmt in ("int4_g32", "int8", "fp16", "int4_g32"):
        cached.apply_(Plan.uniform(table, fmt))
        uncached.apply_(Plan.uniform(table, fmt))
        for (n, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
            assert torch.equal(a, b), (fmt, n)
    assert uncached.cached_bytes == 0
    uncached.restore_()
    for a, b in zip(other.parameters(), tiny_model("llama").parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> Path:
    """A tiny Llama saved in bf16, as most checkpoints users quantize are."""
    from conftest import tiny_config, train_tiny_tokenizer
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16")
    tok = train_tiny_tokenizer()
    config = tiny_config("llama")
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_loading_keeps_the_checkpoints_dtype_and_the_pristine_copy_is_the_loaded_tensor(bf16_llama):
    model = load_model({"path": str(bf16_llama)})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # no fp32 copy of a bf16 checkpoint
    assert checkpoint_dtype(model.config) == torch.bfloat16
    loaded = {n: p.data for n, p in model.named_parameters()}
    applier = PlanApplier.converting(model, unit_table(model, model_cfg("llama")), torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for n, p in model.named_parameters():
        assert (
            applier._pristine[n].data_ptr() == loaded[n].data_ptr()
        )  # no extra copy where the dtype changes
        assert torch.equal(p, loaded[n].float())  # bf16 -> fp32 is exact
    assert applier.pristine_bytes == sum(t.numel() * 2 for t in loaded.values())
    # the same dtype: a clone, kept apart from the live weights
    same = PlanApplier.converting(model, applier.table, torch.float32)
    assert all(same._pristine[n].data_ptr() != p.data_ptr() for n, p in model.named_parameters())


@pytest.mark.parametrize(("name", "ckpt", "device", "expected"), [
    ("auto", torch.bfloat16, "cuda", "bf16"), ("auto", torch.float16, "cuda", "fp16"),
    ("auto", torch.float32, "cuda", "fp32"), ("auto", torch.bfloat16, "cpu", "fp32"), (None, torch.bfloat16, "cpu", "fp32"),
    ("fp32", torch.bfloat16, "cuda", "fp32"), ("bf16", torch.float32, "cpu", "bf16"),
])  # fmt: skip
def test_the_evaluation_dtype_policy(name, ckpt, device, expected):
    assert resolve_eval_dtype(name, ckpt, torch.device(device)) == expected


def test_an_unknown_evaluation_dtype_names_the_valid_ones():
    with pytest.raises(Exception, match=r"unknown eval.dtype 'int8'; valid: auto, fp32, bf16, fp16"):
        resolve_eval_dtype("int8", torch.float32, torch.device("cpu"))


def test_a_bf16_checkpoint_searches_on_the_cpu_in_fp32(tmp_path, bf16_llama, tiny_dirs):
    cfg = compose_config("model=llama", f"model.path={bf16_llama}", "data=text", f"data.path={tiny_dirs[1]}",
                         "eval.context=32", "eval.max_tokens=600", tmp_path=tmp_path)  # fmt: skip
    session = EvalSession(cfg)
    assert session.dtype == "fp32"
    assert {p.dtype for p in session.model.parameters()} == {torch.float32}
    assert {t.dtype for t in session.applier._pristine.values()} == {torch.bfloat16}
    assert math.isfinite(session.evaluate(Plan.uniform(session.table, "int8"), "validation").perplexity)
    session.applier.restore_()
    assert all(
        torch.equal(p, session.applier._pristine[n].float()) for n, p in session.model.named_parameters()
    )


# -- the estimate ----------------------------------------------------------------------------------------------


def test_the_estimate_counts_gpt2_small_exactly_and_scales_with_the_settings(gpt2_small_table):
    from transformers import GPT2Config

    kw = dict(dtype="fp32", checkpoint=torch.float32, batch_size=8, context=1024, backward=False)
    est = estimate_memory(GPT2Config(), torch.device("cpu"), **kw)
    assert est.n_params == 124_439_808  # REFERENCE.md: GPT-2 small, lm_head tied
    assert est.weights == 4 * est.n_params and est.pristine == est.weights
    half = estimate_memory(
        GPT2Config(), torch.device("cpu"), **{**kw, "dtype": "bf16", "checkpoint": torch.bfloat16}
    )
    assert half.weights == est.weights // 2
    smaller = estimate_memory(GPT2Config(), torch.device("cpu"), **{**kw, "batch_size": 1})
    assert smaller.activations < est.activations
    gpu = estimate_memory(GPT2Config(), torch.device("cuda"), **kw)
    host = estimate_memory(GPT2Config(), torch.device("cuda"), **{**kw, "pristine": "cpu"})
    assert (
        gpu.device_bytes - host.device_bytes == int(1.1 * gpu.pristine)
        or abs(gpu.device_bytes - host.device_bytes - 1.1 * gpu.pristine) <= 1
    )
    assert host.host_bytes == gpu.pristine and gpu.host_bytes == 0
    grads = estimate_memory(GPT2Config(), torch.device("cpu"), **{**kw, "backward": True})
    assert grads.activations > est.activations


def test_a_run_that_cannot_fit_is_refused_in_one_line_naming_what_lowers_it(monkeypatch):
    from transformers import LlamaConfig

    import qsweep.memory as memory

    shape = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=32000)  # fmt: skip
    est = estimate_memory(LlamaConfig(**shape), torch.device("cuda:0"), dtype="bf16", checkpoint=torch.bfloat16,
                          batch_size=8, context=2048, cache_bytes=512 * 2**20)  # fmt: skip
    assert 7.2e9 < est.n_params < 7.3e9  # issue 18's Llama-3-8B shape: 7.24B parameters
    monkeypatch.setattr(memory, "available_bytes", lambda device: (20 * GIB, f"{device} has 20.0 GiB free"))
    with pytest.raises(ResourceError) as err:
        check_fits(est)
    line = str(err.value)
    assert "\n" not in line and line.startswith("this run needs about ")
    assert "on cuda:0 (weights 13.5 GiB bf16, pristine copy 13.5 GiB" in line
    assert "but cuda:0 has 20.0 GiB free; lower it with eval.pristine=cpu (-13.5 GiB on the device)" in line
    for setting in ("eval.batch_size", "eval.context", "eval.cache_mb", "eval.device_map=auto"):
        assert setting in line
    monkeypatch.setattr(memory, "available_bytes", lambda device: (200 * GIB, "plenty"))
    check_fits(est)  # fits: nothing raised


def test_the_kl_reference_is_refused_in_one_line_when_the_device_cannot_hold_it(monkeypatch):
    """An 8B Llama's reference on 300k tokens: 300k x 4,096 bf16 hidden values plus a 128k x 4,096 head copy."""
    from transformers import LlamaConfig

    import qsweep.memory as memory

    conf = LlamaConfig(hidden_size=4096, vocab_size=128256)
    cuda = torch.device("cuda:0")
    monkeypatch.setattr(memory, "available_bytes", lambda device: (2 * GIB, f"{device} has 2.0 GiB free"))
    with pytest.raises(ResourceError) as err:
        memory.check_reference_fits(conf, cuda, 300_000, torch.bfloat16, with_head=True, split="validation")
    line = str(err.value)
    want = (300_000 + 128256) * 4096 * 2
    assert "\n" not in line and f"needs {want / GIB:.2f} GiB on cuda:0 but cuda:0 has 2.0 GiB free" in line
    assert "300,000 scored tokens x 4,096 hidden values, and a copy of the lm_head" in line
    assert "eval.kld=false" in line and "eval.max_tokens" in line
    # the second split shares the head copy: 2.29 GiB, which fits in 3
    monkeypatch.setattr(memory, "available_bytes", lambda device: (3 * GIB, "3 GiB"))
    assert memory.check_reference_fits(
        conf, cuda, 300_000, torch.bfloat16, with_head=False, split="test"
    ) == (300_000 * 4096 * 2)


def test_a_session_refuses_before_loading_when_the_host_cannot_hold_it(tmp_path, monkeypatch):
    import qsweep.memory as memory
    import qsweep.session as session_module

    monkeypatch.setattr(memory, "available_bytes", lambda device: (1000, "the host has 0.0 GiB available"))
    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(
        ResourceError, match=r"this run needs about 0\.\d GiB on cpu .* but the host has 0.0 GiB"
    ):
        EvalSession(compose_config(tmp_path=tmp_path))


@pytest.mark.slow
def test_out_of_memory_during_a_study_is_one_line_and_the_study_resumes(tmp_path, monkeypatch):
    """An OOM in the middle of a study (here: the 3rd evaluation) is one line naming the estimate and the settings,
    the study keeps its trials, and the same command resumes it to its budget."""
    from qsweep.app import run_search
    from qsweep.evaluate import Evaluator

    cfg = compose_config("+search=random", "search.n_trials=5", "search.warm_start=false", "search.enqueue=[]",
                         "eval.max_tokens=600", "eval.context=128", tmp_path=tmp_path)  # fmt: skip
    real, calls = Evaluator.evaluate, {"n": 0}

    def failing(self, model, stop=None, resume=None, record_reference=False):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, model, stop, resume, record_reference)

    monkeypatch.setattr(Evaluator, "evaluate", failing)
    with pytest.raises(ResourceError) as err:
        run_search(cfg, tmp_path)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("out of memory on cpu during an evaluation on split 'validation' (estimated need ")
    assert "CUDA out of memory. Tried to allocate 2.00 GiB; lower it with" in line
    assert "the study is stored (1.00 of 5 evaluations spent): resume with python -m qsweep" in line
    monkeypatch.setattr(Evaluator, "evaluate", real)
    summary = run_search(
        cfg, tmp_path
    )  # the same config: resumes to its budget (a duplicate plan costs nothing)
    assert summary["evaluations_spent"] == 5 and summary["n_trials_done"] >= 5


def test_out_of_memory_message_without_an_estimate():
    msg = out_of_memory_message(RuntimeError("boom\nmore"), None, "the proxy sensitivity table")
    assert msg == ("out of memory on the device during the proxy sensitivity table: boom; lower eval.batch_size "
                   "or eval.context")  # fmt: skip


# -- several GPUs ------------------------------------------------------------------------------------------------


def _est(weights: int, pristine_on_host: bool, acts: int = GIB) -> MemoryEstimate:
    return MemoryEstimate(device="auto device map", dtype="bf16", n_params=weights // 2, weights=weights,
                          pristine=weights, pristine_on_host=pristine_on_host, cache=0, activations=acts,
                          settings={"batch_size": 8, "context": 2048})  # fmt: skip


def test_placement_across_gpus_leaves_room_for_activations_and_the_pristine_copy():
    free = [80 * GIB, 80 * GIB, 40 * GIB]
    budget = split_across_gpus(_est(140 * GIB, pristine_on_host=True), free)
    reserve = int(1.1 * GIB)
    assert budget == {0: 80 * GIB - reserve, 1: 80 * GIB - reserve, 2: 40 * GIB - reserve}
    halved = split_across_gpus(
        _est(90 * GIB, pristine_on_host=False), free
    )  # the pristine copy beside each layer
    assert halved == {i: (f - reserve) // 2 for i, f in enumerate(free)}
    assert sum(halved.values()) >= 90 * GIB


def test_a_model_too_large_for_the_visible_gpus_is_one_line():
    with pytest.raises(ResourceError) as err:
        split_across_gpus(_est(140 * GIB, pristine_on_host=False), [80 * GIB, 80 * GIB])
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("the model's 140.0 GiB of bf16 weights do not fit the visible GPUs (free GiB: cuda:0 "
                           "80.0, cuda:1 80.0)")  # fmt: skip
    assert "eval.pristine=cpu" in line and "more GPUs (CUDA_VISIBLE_DEVICES)" in line


def test_workers_get_one_gpu_each_round_robin(monkeypatch):
    """``python -m qsweep.workers``: one replica per visible GPU (CUDA_VISIBLE_DEVICES), wrapping around; without
    GPUs the cores are shared out."""
    from qsweep.workers import gpu_ids, worker_environments

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert gpu_ids() == ["2", "5"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_environments(3, gpu_ids(), {})] == ["2", "5", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu_ids() == []
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    envs = worker_environments(4, [], {"PATH": "/bin"})
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["2"] * 4 and all(e["PATH"] == "/bin" for e in envs)
    assert (
        worker_environments(2, [], {"OMP_NUM_THREADS": "1"})[0]["OMP_NUM_THREADS"] == "1"
    )  # the user's wins


def test_the_proxy_streams_and_equals_the_full_gradient_formula(tmp_path, monkeypatch):
    """The proxy folds each parameter's gradient into the (unit, format) sums as backward makes it; checkpointing
    changes nothing. Reference: the full-gradient formula (g/N).dW + 0.5 (sum r^2 / N).dW^2 of the code before."""
    import qsweep.search.proxy as proxy
    import qsweep.search.sensitivity as sens
    from qsweep.search.space import SearchSpace

    session = EvalSession(compose_config("eval.max_tokens=512", "eval.context=64", "eval.batch_size=4",
                                         tmp_path=tmp_path))  # fmt: skip
    space = SearchSpace.from_menu(session.table, compose_config(tmp_path=tmp_path).precision.menu)
    base = sens.sensitivity_base(space, session.baseline_plan)
    ev = session.evaluator("validation")
    streamed = sens.proxy_sensitivity(session.applier, ev, space, base, max_batches=2, full_eval_seconds=1.0,
                                      fisher="batch")  # fmt: skip
    assert not streamed.info["checkpointed"]
    monkeypatch.setattr(proxy, "CHECKPOINT_ABOVE_BYTES", 0)
    checkpointed = sens.proxy_sensitivity(session.applier, ev, space, base, max_batches=2, full_eval_seconds=1.0,
                                          fisher="batch")  # fmt: skip
    assert checkpointed.info["checkpointed"]
    # the reference: whole-model gradients, summed over the same batches
    session.applier.apply_(base)
    model = session.model
    params = dict(model.named_parameters())
    g = {n: torch.zeros_like(p) for n, p in params.items()}
    sq = {n: torch.zeros_like(p) for n, p in params.items()}
    n_tok = 0
    for i in range(2):
        nll = ev.batch_nll(model, i)
        grads = [
            None if gr is None else gr.detach()
            for gr in torch.autograd.grad(nll.sum(), list(params.values()), allow_unused=True)
        ]
        for (n, _), gr in zip(params.items(), grads, strict=True):
            if gr is not None:
                g[n] += gr
                sq[n] += gr * gr
        n_tok += nll.numel()
    for row in streamed.rows:
        if row.format == base[row.unit] or row.unit not in space.searchable:
            continue
        d = 0.0
        for p in session.table[row.unit].params:
            dw = (
                session.applier.quantized(p.name, p.channel_dim, row.format).float()
                - params[p.name].detach().float()
            )
            d += float((g[p.name] / n_tok * dw).sum() + 0.5 * (sq[p.name] / n_tok * dw * dw).sum())
        assert row.delta_nll_per_token == pytest.approx(d, rel=1e-4, abs=1e-9)
        assert checkpointed.delta(row.unit, row.format) == pytest.approx(row.delta_nll_per_token, rel=1e-5,
                                                                         abs=1e-10)  # fmt: skip
    json.dumps(streamed.to_dict())


def test_the_scale_benchmark_shapes_have_their_published_sizes():
    from transformers import LlamaConfig

    from qsweep.bench.scale import SHAPES
    from qsweep.model import meta_model

    n = {k: sum(p.numel() for p in meta_model(LlamaConfig(**v)).parameters()) for k, v in SHAPES.items()}
    assert 134e6 < n["smollm2-135m"] < 135e6
    assert 1.23e9 < n["llama-3.2-1b"] < 1.24e9
    assert 1.09e9 < n["llama-1.1b"] < 1.11e9
    assert 7.2e9 < n["llama-3-8b"] < 7.3e9


def test_the_allocator_solves_at_the_byte_sizes_of_an_8b_model(tmp_path):
    """Unit sizes of 1e8-1e9 bytes (Llama-3-8B shape) broke HiGHS (status 4, or allocations a few bytes over the
    budget forever); every budget across the range now gives a plan within it, and larger budgets predict less."""
    import random

    from transformers import LlamaConfig

    from qsweep.bench.scale import SHAPES
    from qsweep.model import meta_model
    from qsweep.search.allocate import allocate
    from qsweep.search.sensitivity import SensitivityRow, SensitivityTable, sensitivity_base, unit_bytes
    from qsweep.search.space import SearchSpace

    cfg = compose_config("model=llama", tmp_path=tmp_path)
    table = unit_table(meta_model(LlamaConfig(**SHAPES["llama-3-8b"])), model_cfg("llama"))
    space = SearchSpace.from_menu(table, cfg.precision.menu)
    base = sensitivity_base(space, Plan.uniform(table, "fp16"))
    rng = random.Random(0)
    rows = tuple(SensitivityRow(u, f, 0.0 if f == base[u] else rng.uniform(1e-4, 1e-1), *unit_bytes(table[u], f))
                 for u, c in space.choices.items() for f in c)  # fmt: skip
    sens = SensitivityTable(kind="proxy", base_plan=base, split="validation", n_tokens=1, rows=rows, cost_evals=1.0,
                            seconds=1.0, base_perplexity=1.0, info={})  # fmt: skip
    sizes = sens.unit_sizes("packed")
    largest = sum(max(sizes[u].values()) for u in space.choices)
    previous = math.inf
    for share in (0.3, 0.5, 0.7, 0.9, 1.0):
        a = allocate(sens, space.choices, sizes, int(share * largest))
        assert a is not None and a.size_bytes <= int(share * largest)
        assert a.delta_nll <= previous + 1e-12
        previous = a.delta_nll


def test_the_default_cache_is_a_quarter_of_the_weights_at_most_512_mib():
    from qsweep.memory import cache_bytes_for

    assert cache_bytes_for(None, 540 * 2**20) == 135 * 2**20  # SmolLM2-135M in fp32
    assert cache_bytes_for(None, 14 * 2**30) == 512 * 2**20  # an 8B model in bf16
    assert cache_bytes_for(0, 14 * 2**30) == 0 and cache_bytes_for(3 * 2**20, 1) == 3 * 2**20


def test_peak_host_memory_is_the_processs_own_not_its_parents(tmp_path):
    """``resources.peak_host_rss_bytes`` of a run started by a large process (a benchmark run from a test session)
    is the run's own: ``getrusage``'s ``ru_maxrss`` carries the parent's peak across vfork + exec, and read 2 GiB
    in CI for a search that peaked at 0.6 GiB."""
    import subprocess
    import sys

    ballast = bytearray(600 * 2**20)
    ballast[:: 2**12] = b"\1" * len(ballast[:: 2**12])  # resident: one byte per page
    code = "from qsweep.memory import peak_host_rss_bytes; print(peak_host_rss_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    del ballast
    assert int(out) < 500 * 2**20  # torch's import is about 0.2 GiB; the parent holds more than 0.6 GiB


@pytest.mark.parametrize(
    "err",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                     "allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"),
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
)  # fmt: skip
def test_running_out_of_memory_while_loading_is_one_line(tmp_path, monkeypatch, err):
    """The host's allocator failing is a RuntimeError, not an OutOfMemoryError: it is one line too, whatever the
    phase (here: loading the model); any other RuntimeError keeps its traceback."""
    import qsweep.session as session_module
    from qsweep.memory import is_out_of_memory

    def failing(*args, **kwargs):
        raise err

    monkeypatch.setattr(session_module, "load_model", failing)
    with pytest.raises(ResourceError) as caught:
        EvalSession(compose_config("eval.max_tokens=600", tmp_path=tmp_path))
    line = str(caught.value)
    assert "\n" not in line and line.startswith(
        "out of memory on cpu during loading the model (estimated need "
    )
    assert "; lower it with " in line  # the settings that lower the estimate, named
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("memory"))
