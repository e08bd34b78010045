"""Cached-prefix evaluation, measured and proxy sensitivity tables, and their files, on tiny GPT-2 / OPT / Llama."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import model_cfg, tiny_config

from qsweep.apply import PlanApplier, apply_plan_
from qsweep.errors import QsweepError
from qsweep.evaluate import Evaluator
from qsweep.model import unit_table
from qsweep.plan import Plan
from qsweep.prefix import PrefixRunner, decoder_blocks
from qsweep.search.sensitivity import (
    SensitivityError,
    SensitivityTable,
    measure_sensitivity,
    proxy_sensitivity,
    rank_correlation,
    sensitivity_base,
    unit_bytes,
)
from qsweep.search.space import SearchSpace

MENU = [
    {"pattern": ".*(ln|norm).*", "formats": ["fp32"]},
    {"pattern": ".*", "formats": ["fp16", "int8_channel", "int4_g32", "int2_g32"]},
]
N_LAYERS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU: one thread is far faster than several competing ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny4(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    conf = tiny_config(arch)
    conf.num_hidden_layers = N_LAYERS
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa").float().eval()
    with torch.no_grad():  # norms start at exactly 1 and 0, which every format stores exactly: make them not
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, unit_table(model, model_cfg(arch))


def evaluator(n: int = 203, context: int = 32, stride: int = 24, batch_size: int = 3) -> Evaluator:
    """Overlapping windows, a short tail window and a ragged last batch."""
    ids = torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n))
    return Evaluator(ids, context, stride, batch_size=batch_size, device="cpu")


# The first unit of the first, a middle and the last block, and what runs after the last block
PROBES = {
    "gpt2": {"h.0.attn": 0, "h.2.mlp": 2, "h.3.attn": 3, "ln_f": 4, "wte": 0, "wpe": 0},
    "opt": {"layers.0.mlp": 0, "layers.1.attn": 1, "layers.3.mlp": 3, "norm": 4, "embed_tokens": 0},
    "llama": {"layers.0.attn": 0, "layers.2.mlp": 2, "layers.3.mlp": 3, "norm": 4, "lm_head": 4},
}


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_first_block_of_each_unit(arch):
    model, table = tiny4(arch)
    runner = PrefixRunner(model, table)
    assert runner.n_blocks == N_LAYERS and runner.blocks is decoder_blocks(model)
    for unit, block in PROBES[arch].items():
        assert runner.first_block(unit) == block, unit
    assert runner.first_block(list(PROBES[arch])) == 0


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_cached_prefix_equals_uncached(arch):
    model, table = tiny4(arch)
    ev, runner, applier = evaluator(), PrefixRunner(model, table), PlanApplier(model, table)
    base = Plan.uniform(table, "fp32")
    applier.apply_(base)
    base_ppl = ev.evaluate(model).perplexity
    calls = []  # block 0's first layer (a skipped block's hooks still fire; its children's do not)
    next(decoder_blocks(model)[0].children()).register_forward_hook(lambda *a: calls.append(1))
    for unit, block in PROBES[arch].items():
        applier.apply_(base)
        cache = runner.capture(ev, block)
        assert cache.block == block and len(cache.states) == ev.n_batches
        applier.apply_(Plan({**base.formats, unit: "int2_g32"}))
        want = ev.evaluate(model)
        calls.clear()
        got = runner.evaluate(ev, cache)
        assert got.ok and got.n_tokens == want.n_tokens
        assert got.perplexity == pytest.approx(want.perplexity, rel=1e-6), unit
        assert torch.allclose(got.window_nll, want.window_nll, rtol=1e-6)
        assert want.perplexity != base_ppl  # the change is visible
        # block 0 ran (once per batch) only when the unit starts there
        assert len(calls) == (ev.n_batches if block == 0 else 0), unit


def test_capture_advances_one_block_at_a_time():
    model, table = tiny4("gpt2")
    ev, runner = evaluator(), PrefixRunner(model, table)
    direct = runner.capture(ev, 3)
    stepped = runner.capture(ev, 3, runner.capture(ev, 1))
    assert all(torch.equal(a, b) for a, b in zip(direct.states, stepped.states, strict=True))
    last = runner.capture(ev, N_LAYERS, stepped)
    assert last.block == N_LAYERS and last.states[0].shape == direct.states[0].shape


def space_of(table) -> SearchSpace:
    return SearchSpace.from_menu(table, MENU)


@pytest.fixture(scope="module")
def gpt2_tables():
    model, table = tiny4("gpt2")
    space, ev, applier = space_of(table), evaluator(), PlanApplier(model, table)
    base = sensitivity_base(space, Plan.uniform(table, "fp16"))
    measured = measure_sensitivity(applier, ev, space, base, split="validation")
    proxy = proxy_sensitivity(applier, ev, space, base, split="validation", full_eval_seconds=1.0)
    return SimpleNamespace(model=model, table=table, space=space, ev=ev, applier=applier, base=base,
                           measured=measured, proxy=proxy)  # fmt: skip


def test_tables_have_one_row_per_unit_and_format(gpt2_tables):
    g = gpt2_tables
    table, space, ev, base, measured, proxy = g.table, g.space, g.ev, g.base, g.measured, g.proxy
    want = [(u, f) for u, c in space.choices.items() for f in c]
    for t in (measured, proxy):
        assert [(r.unit, r.format) for r in t.rows] == want
        assert t.base_plan == base and t.split == "validation"
        for r in t.rows:
            assert (r.model_size_bytes, r.packed_size_bytes) == unit_bytes(table[r.unit], r.format)
            assert math.isfinite(r.delta_nll_per_token)
            if r.format == base[r.unit]:
                assert r.delta_nll_per_token == 0.0
    assert measured.kind == "measured" and proxy.kind == "proxy"
    assert measured.n_tokens == ev.n_tokens and proxy.n_tokens == ev.n_tokens
    assert base["h.0.ln_1"] == "fp32" and base["h.0.attn"] == "fp16"  # fixed units in their only format
    assert measured.info["block_forwards"] < measured.info["block_forwards_uncached"]


def test_measured_row_equals_an_independent_evaluation(gpt2_tables):
    table, base, measured = gpt2_tables.table, gpt2_tables.base, gpt2_tables.measured
    fresh, _ = tiny4("gpt2")  # same seed, same weights; quantized by the one-shot verb, not the applier
    ev2 = evaluator()
    apply_plan_(fresh, base, table)
    base_nll = ev2.evaluate(fresh).nll_sum
    for unit, fmt in [("h.2.mlp", "int2_g32"), ("wte", "int4_g32"), ("h.3.attn", "int8_channel")]:
        one, _ = tiny4("gpt2")
        apply_plan_(one, Plan({**base.formats, unit: fmt}), table)
        delta = (ev2.evaluate(one).nll_sum - base_nll) / ev2.n_tokens
        assert measured.delta(unit, fmt) == pytest.approx(delta, rel=1e-6, abs=1e-9)
    assert measured.base_perplexity == pytest.approx(math.exp(base_nll / ev2.n_tokens), rel=1e-9)


def test_uncached_measurement_is_the_same_table(gpt2_tables):
    g = gpt2_tables
    plain = measure_sensitivity(g.applier, g.ev, g.space, g.base, prefix_cache=False)
    for a, b in zip(g.measured.rows, plain.rows, strict=True):
        assert a.delta_nll_per_token == pytest.approx(b.delta_nll_per_token, rel=1e-6, abs=1e-9)


def test_proxy_is_a_loss_change_in_the_measured_units(gpt2_tables):
    """Where the Taylor expansion holds (small per-channel INT8 perturbations), the proxy is the measured delta."""
    measured, proxy = gpt2_tables.measured, gpt2_tables.proxy
    for r in measured.rows:
        if r.format == "int8_channel":
            assert proxy.delta(r.unit, r.format) == pytest.approx(r.delta_nll_per_token, rel=0.1, abs=2e-7), r
    assert rank_correlation(measured, proxy) > 0.7
    assert proxy.info["batches"] == proxy.info["batches_total"]


def test_proxy_leaves_the_model_as_it_found_it():
    model, table = tiny4("llama")
    space, ev, applier = space_of(table), evaluator(), PlanApplier(model, table)
    base = sensitivity_base(space, Plan.uniform(table, "fp16"))
    model.get_submodule("model.norm").weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    a = proxy_sensitivity(applier, ev, space, base, max_batches=2, full_eval_seconds=1.0, seed=3)
    b = proxy_sensitivity(applier, ev, space, base, max_batches=2, full_eval_seconds=1.0, seed=3)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [r.delta_nll_per_token for r in a.rows] == [r.delta_nll_per_token for r in b.rows]  # seeded
    assert a.info["batches"] == 2 and a.n_tokens < ev.n_tokens
    applier.apply_(base)
    want = ev.evaluate(model).nll_sum
    assert all(p.grad is None for p in model.parameters())
    assert ev.evaluate(model).nll_sum == want


def test_save_load_round_trip_and_csv(gpt2_tables, tmp_path):
    measured, proxy = gpt2_tables.measured, gpt2_tables.proxy
    rows = list(proxy.rows)
    rows[3] = type(rows[3])(rows[3].unit, rows[3].format, math.inf, 1, 2)  # a failed evaluation
    failed = dataclasses.replace(proxy, rows=tuple(rows))
    for t in (measured, failed):
        path = t.save(tmp_path / f"{t.kind}.json")
        back = SensitivityTable.load(path)
        assert back == t and back.info == t.info
        assert json.loads(path.read_text())["version"] == 1
    assert SensitivityTable.load(tmp_path / "proxy.json").rows[3].delta_nll_per_token == math.inf
    out = list(csv.DictReader(measured.write_csv(tmp_path / "m.csv").open()))
    assert len(out) == len(measured.rows)
    r = next(r for r in out if r["format"] == "int2_g32")
    assert float(r["degradation"]) == pytest.approx(math.expm1(float(r["delta_nll_per_token"])))


def test_bad_inputs_are_user_errors(gpt2_tables, tmp_path):
    g = gpt2_tables
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(QsweepError, match="malformed JSON"):
        SensitivityTable.load(bad)
    bad.write_text(json.dumps({"version": 1, "kind": "measured"}))
    with pytest.raises(SensitivityError, match="malformed"):
        SensitivityTable.load(bad)
    with pytest.raises(SensitivityError, match="no row for unit 'wte' in format 'int3'"):
        g.measured.delta("wte", "int3")
    wrong = Plan({**g.base.formats, "h.0.ln_1": "fp16"})
    with pytest.raises(SensitivityError, match=r"base plan puts unit 'h\.0\.ln_1' in 'fp16'"):
        measure_sensitivity(g.applier, g.ev, g.space, wrong)


def test_session_tables_on_the_bundled_model(tmp_path):
    """The EvalSession entry points on the bundled model (3 units x the seed's formats, 512 tokens of a local text)."""
    from pydoc_data.topics import topics

    from hydra import compose, initialize_config_dir

    from qsweep.config import register_configs
    from qsweep.paths import config_dir
    from qsweep.search.sensitivity import measured_table, proxy_table
    from qsweep.session import EvalSession

    text = (
        tmp_path / "validation.txt"
    )  # a small local corpus: building the bundled one takes longer than the test
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:12]))
    register_configs()
    overrides = ["data=text", f"data.path={text}", f"data.cache_dir={tmp_path}", "eval.max_tokens=512",
                 "eval.context=128"]  # fmt: skip
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    session = EvalSession(cfg)
    few = [  # three searchable units keep it fast; the rest fixed as the seed menu would have them by default
        {"pattern": ".*(ln|norm).*", "formats": ["fp32"]},
        {"pattern": r"wte|h\.(5|11)\.mlp", "formats": ["fp16", "int8", "int4"]},
        {"pattern": ".*", "formats": ["fp16"]},
    ]
    space = SearchSpace.from_menu(session.table, few)
    measured = measured_table(session, space)
    proxy = proxy_table(session, space, full_eval_seconds=1.0)
    for t in (measured, proxy):
        assert t.split == "validation" and len(t.rows) == sum(len(c) for c in space.choices.values())
        assert t.base_plan["h.0.ln_1"] == "fp32" and t.base_plan["wte"] == "fp16"
    base = session.evaluate(measured.base_plan, "validation")
    assert measured.base_perplexity == pytest.approx(base.perplexity, rel=1e-9)
    one = session.evaluate(Plan({**measured.base_plan.formats, "h.5.mlp": "int4"}), "validation")
    delta = (one.nll_sum - base.nll_sum) / base.n_tokens
    assert measured.delta("h.5.mlp", "int4") == pytest.approx(delta, rel=1e-6, abs=1e-9)
    # of the three, the bundled model's most sensitive unit at INT4 is the embedding, by both measures
    int4 = [r for r in measured.rows if r.format == "int4"]
    assert max(int4, key=lambda r: r.delta_nll_per_token).unit == "wte"
    assert max(int4, key=lambda r: proxy.delta(r.unit, r.format)).unit == "wte"
    assert measured.cost_evals > 1 and measured.info["prefix_cache"]
    # multi-fidelity: the same table on the split's first 256 tokens, its cost counted in full evaluations
    full_ev, half = session.evaluator("validation"), measured_table(session, space, max_tokens=256)
    sub = full_ev.first_tokens(256)
    assert half.info["tokens"] == sub.n_tokens < full_ev.n_tokens and half.n_tokens == sub.n_tokens
    n_rows = sum(len(c) - 1 for c in space.choices.values())
    assert measured.cost_evals == pytest.approx(1 + measured.info["block_forwards"] / 12) and n_rows == 6
    assert half.cost_evals == pytest.approx(measured.cost_evals * sub.n_tokens / full_ev.n_tokens)
    first = session.evaluate(measured.base_plan, "validation")
    assert half.base_perplexity != pytest.approx(first.perplexity, rel=1e-6)  # measured on fewer tokens
    # a KL table on the subsample: its own reference (the baseline there, one more evaluation of it, counted), the
    # session's one head copy shared; a row is the KL of that one-unit plan on those tokens
    session.baseline("validation")
    kl = measured_table(session, space, max_tokens=256, degradation="kld")
    assert kl.degradation == "kld" and len(session._kld_heads) == 1
    assert kl.cost_evals == pytest.approx(half.cost_evals + sub.n_tokens / full_ev.n_tokens)
    sub.shared_heads = session._kld_heads
    session.applier.apply_(session.baseline_plan)
    sub.evaluate(session.model, record_reference=True)
    kld = {}
    for name, plan in (
        ("base", measured.base_plan),
        ("one", Plan({**measured.base_plan.formats, "h.5.mlp": "int4"})),
    ):
        session.applier.apply_(plan)  # the table's base plan keeps the norms in fp32, the baseline in fp16
        kld[name] = float(sub.evaluate(session.model).token_kld.double().sum()) / sub.n_tokens
    want = kld["one"] - kld["base"]
    assert kl.delta("h.5.mlp", "int4") == pytest.approx(want, rel=1e-5) and want > 0
