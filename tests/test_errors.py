"""Bad input fails with one line naming the key or file (issue 9): models, devices, protocols, data, plans.

Most cases call the library directly (fast); a handful run ``python -m qsweep`` end to end and check the CLI
contract for user errors: exit status 2, one ``qsweep: error:`` line on stderr naming the key/file, no traceback,
and the user's own files (model directory, corpus) left byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, model_cfg, tiny_config, train_tiny_tokenizer

import qsweep.data as data
import qsweep.model as qmodel
from qsweep.__main__ import USER_ERRORS, error_line
from qsweep.data import DataLoadError, load_token_ids
from qsweep.errors import ConfigError, QsweepError, user_error_line
from qsweep.evaluate import MIN_SCORED_TOKENS, resolve_device, sliding_windows
from qsweep.families import resolve_for_model
from qsweep.model import ModelLoadError, load_model, load_model_config, meta_model, unit_table
from qsweep.plan import PlanError, named_plan_spec, plan_from_config, plan_names
from qsweep.search.config import search_config
from qsweep.session import EvalSession

# The seed's plans name GPT-2 small's units; every other shipped plan must fit every supported family.
SEED_PLANS = {"attn0_mlp123", "attn1_mlp123", "attn2_mlp123", "emb_int8_first4", "all_int8_attn"}
ARCHS = ("gpt2", "opt", "llama")


# ---------------------------------------------------------------------------------------------------- helpers


def save_tiny(arch: str, directory: Path) -> Path:
    """A random-init 2-block model of ``arch`` with a small BPE tokenizer, saved as safetensors."""
    from transformers import AutoModelForCausalLM

    tok = train_tiny_tokenizer()
    conf = tiny_config(arch)
    conf.vocab_size = len(tok)
    conf.bos_token_id = conf.eos_token_id = tok.eos_token_id
    conf.pad_token_id = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: save_tiny(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from conftest import _corpus_docs

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(_corpus_docs()[40:43]))
    return path


def fingerprint(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths``: a user's files must not change when qsweep refuses them."""
    out = {}
    for p in paths:
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def cli(*overrides: str, tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "QSWEEP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "qsweep", f"hydra.run.dir={tmp_path / 'run'}", *overrides],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip


def assert_one_error_line(proc: subprocess.CompletedProcess, expected: str) -> str:
    """Exit 2, no traceback, exactly one ``qsweep: error:`` line (the last on stderr) starting with ``expected``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert [ln for ln in lines if ln.startswith("qsweep: error:")] == [lines[-1]]
    assert lines[-1].startswith(f"qsweep: error: {expected}"), lines[-1]
    return lines[-1]


def session_cfg(model_dir: Path, corpus: Path, tmp_path: Path, arch: str = "gpt2", **eval_overrides) -> dict:
    ev = {"name": "t", "context": 32, "stride": 16, "max_tokens": None, "device": "cpu", **eval_overrides}
    return {
        "model": {**model_cfg(arch), "path": str(model_dir), "name": None},
        "data": {"name": "text", "source": "text", "path": str(corpus), "cache_dir": str(tmp_path / "cache")},
        "eval": ev,
        "baseline": {"plan": "fp16"},
    }


# ------------------------------------------------------------------------------------------ error types and CLI


def test_only_the_projects_errors_are_user_errors():
    assert (QsweepError,) == USER_ERRORS
    for err in (ModelLoadError, DataLoadError, ConfigError, PlanError):
        assert issubclass(err, QsweepError)
    assert not issubclass(ValueError, USER_ERRORS) and not issubclass(FileNotFoundError, USER_ERRORS)
    assert (
        error_line(ConfigError("eval.stride bad\n  second line"))
        == "qsweep: error: eval.stride bad second line"
    )


def test_every_cli_prints_a_user_error_as_one_joined_line():
    # qsweep, qsweep.bench.reference and qsweep.bench.synthetic all print through errors.user_error_line
    err = ConfigError("eval.stride bad\n  second line")
    assert (
        user_error_line("qsweep.bench.reference", err)
        == "qsweep.bench.reference: error: eval.stride bad second line"
    )
    assert error_line(err) == user_error_line("qsweep", err)


def test_a_bad_search_value_is_one_line_with_the_key_and_the_omegaconf_error():
    with pytest.raises(ConfigError) as info:
        search_config({"name": "x", "sampler": "nsga2", "n_trials": "abc"})
    assert str(info.value) == (
        "bad search setting search.n_trials: ValidationError: Value 'abc' of type 'str' could not be converted "
        "to Integer"
    )


# ------------------------------------------------------------------------------------------------------ models


def test_truncated_safetensors_names_the_file(arch_dirs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in arch_dirs["gpt2"].iterdir():
        blob = f.read_bytes()
        (broken / f.name).write_bytes(blob[: len(blob) // 2] if f.name == "model.safetensors" else blob)
    with pytest.raises(
        ModelLoadError, match=rf"weights file '{broken}/model.safetensors' is truncated or corrupt"
    ):
        load_model({"path": str(broken)})


def test_pickle_weights_need_the_opt_in(arch_dirs, tmp_path):
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_bytes((arch_dirs["gpt2"] / "config.json").read_bytes())
    good = load_model({"path": str(arch_dirs["gpt2"])})
    torch.save(good.state_dict(), pkl / "pytorch_model.bin")
    with pytest.raises(
        ModelLoadError, match=r"holds only pickle weights \(pytorch_model.bin\).*model.allow_pickle=true"
    ):
        load_model({"path": str(pkl)})
    loaded = load_model({"path": str(pkl), "allow_pickle": True})
    assert all(
        torch.equal(a, b)
        for a, b in zip(good.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


class _Payload:
    """A pickle that runs a command when loaded: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_even_with_the_opt_in(arch_dirs, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_bytes((arch_dirs["gpt2"] / "config.json").read_bytes())
    marker = tmp_path / "PWNED"
    torch.save({"transformer.wte.weight": _Payload(marker)}, evil / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"weights-only unpickler refused .*GLOBAL posix.system"):
        load_model({"path": str(evil), "allow_pickle": True})
    assert not marker.exists()


def test_empty_or_configless_model_dir_says_so_without_a_hub_hint(tmp_path):
    with pytest.raises(ModelLoadError, match=r"is an empty directory; point it at a Hugging Face model") as e:
        load_model({"path": str(tmp_path)})
    assert "hub" not in str(e.value)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=r"has no config.json \(it holds: notes.txt\)") as e:
        load_model_config({"path": str(tmp_path)})
    assert "hub" not in str(e.value)


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_offline_hub_id_fails_fast(monkeypatch, how):
    from huggingface_hub import constants

    qmodel.hub_unreachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", how == "HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    reason = "HF_HUB_OFFLINE is set" if how == "HF_HUB_OFFLINE" else "127.0.0.1:9 does not answer"
    start = time.perf_counter()
    try:
        with pytest.raises(
            ModelLoadError, match=rf"out of reach \({reason}.*pass a local copy with model.path=DIR"
        ):
            load_model_config({"name": "qsweep-tests/no-such-model"})
    finally:
        qmodel.hub_unreachable.cache_clear()
    assert time.perf_counter() - start < 5  # no retries (transformers' retry loop takes ~26 s)


# ----------------------------------------------------------------------------------------- devices, protocols


@pytest.mark.parametrize(("name", "message"), [
    ("tpu9", r"unknown eval.device 'tpu9'; valid: auto, cpu, cuda, cuda:N, mps"),
    ("cuda:x", r"unknown eval.device 'cuda:x'"),
    ("cuda", r"eval.device=cuda but CUDA is not available here .*use eval.device=auto or eval.device=cpu"),
    ("cuda:1", r"eval.device=cuda:1 but CUDA is not available here"),
])  # fmt: skip
def test_bad_device(monkeypatch, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=message):
        resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")


def test_cuda_index_beyond_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        ConfigError, match=r"eval.device=cuda:2 but this machine has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"
    ):
        resolve_device("cuda:2")


def test_stride_zero_is_refused_not_read_as_null(arch_dirs, corpus, tmp_path):
    with pytest.raises(
        ConfigError, match=r"eval.stride must be in \[1, context=32\], got 0 \(null: stride = context\)"
    ):
        sliding_windows(100, 32, 0)
    with pytest.raises(ConfigError, match=r"eval.stride must be >= 1 or null, got 0 \(null: = context\)"):
        EvalSession(session_cfg(arch_dirs["gpt2"], corpus, tmp_path, stride=0))


def test_context_longer_than_the_model_names_both_numbers(arch_dirs, corpus, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"eval.context=100000 is longer than the model's 64 positions \(config n_positions\)",
    ):
        EvalSession(session_cfg(arch_dirs["gpt2"], corpus, tmp_path, context=100000))
    with pytest.raises(
        ConfigError, match=r"is longer than the model's 64 positions \(config max_position_embeddings\)"
    ):
        EvalSession(session_cfg(arch_dirs["llama"], corpus, tmp_path, "llama", context=65))


# -------------------------------------------------------------------------------------------------------- data


def test_corrupt_token_cache_is_rebuilt_with_a_warning(tmp_path, corpus, caplog):
    tok = train_tiny_tokenizer()
    cfg = {"path": str(corpus), "cache_dir": str(tmp_path)}
    ids = load_token_ids(cfg, "test", tok)
    (cache,) = (tmp_path / "tokens").glob("*.safetensors")
    cache.write_bytes(cache.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="qsweep.data"):
        again = load_token_ids(cfg, "test", tok)
    assert torch.equal(ids, again)
    assert f"token cache {cache} is unreadable" in caplog.text and "deleting and rebuilding it" in caplog.text
    assert torch.equal(data._read_cache(cache, "test"), ids)  # rebuilt whole, and it verifies


@pytest.mark.parametrize(("blob", "message"), [
    (b"\x89PNG\r\n\x1a\n\xff\xfe", r"is not UTF-8 text \(byte 0x89 at offset 0\); pass a UTF-8 text file"),
    (b"text\x00\x00\x00", r"looks binary \(NUL byte at offset 4\)"),
])  # fmt: skip
def test_binary_data_file_names_the_file_and_key(tmp_path, blob, message):
    f = tmp_path / "corpus.bin"
    f.write_bytes(blob)
    with pytest.raises(DataLoadError, match=rf"^data.path: '{f}' {message}"):
        data.corpus_text({"path": str(f)}, "test")
    assert f.read_bytes() == blob


def test_tiny_corpus_is_refused_and_a_small_one_warned(arch_dirs, tmp_path, caplog):
    five = tmp_path / "five.txt"
    five.write_text("the cat sat")
    session = EvalSession(session_cfg(arch_dirs["gpt2"], five, tmp_path))
    n = load_token_ids(session.data_cfg, "test", session.tokenizer).numel()
    assert n <= MIN_SCORED_TOKENS
    with pytest.raises(
        ConfigError, match=rf"split 'test' of data.path='{five}' has {n} tokens .*at least 33 are needed"
    ):
        session.evaluator("test")
    small = tmp_path / "small.txt"
    small.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    session.data_cfg["path"] = str(small)
    session.eval_cfg.update(stride=32, max_tokens=70)  # windows of 31, 31 and 5 scored tokens
    with caplog.at_level(logging.WARNING, logger="qsweep.session"):
        ev = session.evaluator("test")
    assert [w.n_scored for w in ev.windows] == [31, 31, 5]
    assert f"split 'test' of data.path='{small}' gives only 67 scored tokens in 3 windows" in caplog.text


# ------------------------------------------------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def tables():
    """Unit tables (meta device) of each family: GPT-2 small (the seed's model) and tiny OPT / Llama."""
    from transformers import GPT2Config

    return {
        "gpt2": unit_table(meta_model(GPT2Config()), model_cfg("gpt2")),
        "opt": unit_table(meta_model(tiny_config("opt")), model_cfg("opt")),
        "llama": unit_table(meta_model(tiny_config("llama")), model_cfg("llama")),
    }


@pytest.mark.parametrize("name", sorted(set(plan_names()) - SEED_PLANS))
@pytest.mark.parametrize("arch", ARCHS)
def test_generic_plans_fit_every_family(tables, name, arch):
    table = tables[arch]
    plan = plan_from_config(named_plan_spec(name), table)
    assert set(plan.formats) == set(table.names)
    if name == "int8":  # norms fp32, everything else int8, whatever the family calls its norms
        norms = {u for u in table.names if "ln" in u.split(".")[-1] or "norm" in u}
        assert norms and {u for u, f in plan.formats.items() if f == "fp32"} == norms
        assert {f for u, f in plan.formats.items() if u not in norms} == {"int8"}


def test_int8_plan_unchanged_on_gpt2_small(tables):
    from qsweep.size import model_size_bytes

    assert (
        model_size_bytes(tables["gpt2"], plan_from_config(named_plan_spec("int8"), tables["gpt2"]))
        == 124_555_008
    )


@pytest.mark.parametrize("name", sorted(SEED_PLANS))
def test_seed_plans_say_they_are_written_for_gpt2(tables, name):
    resolve_for_model(named_plan_spec(name), tables["gpt2"], f"plan={name}")  # fits GPT-2 small
    for arch in ("opt", "llama"):
        with pytest.raises(
            PlanError, match=rf"^plan={name} is written for GPT-2 unit names \(wte, wpe, h.N.attn"
        ):
            resolve_for_model(named_plan_spec(name), tables[arch], f"plan={name}")


def test_a_plan_that_fits_no_family_keeps_its_own_message(tables):
    with pytest.raises(PlanError, match=r"rule pattern 'nope' matches no unit"):
        resolve_for_model(
            {"default": "int8", "rules": [{"pattern": "nope", "format": "fp16"}]}, tables["llama"]
        )


# ------------------------------------------------------------------------------------- end to end (subprocess)


def test_cli_truncated_weights_one_line(arch_dirs, corpus, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in arch_dirs["gpt2"].iterdir():
        blob = f.read_bytes()
        (broken / f.name).write_bytes(blob[:1000] if f.name == "model.safetensors" else blob)
    before = fingerprint(broken, corpus)
    proc = cli(f"model.path={broken}", "data=text", f"data.path={corpus}", tmp_path=tmp_path)
    assert_one_error_line(proc, f"weights file '{broken}/model.safetensors' is truncated or corrupt")
    assert fingerprint(broken, corpus) == before


@pytest.mark.slow
def test_cli_bad_device_and_binary_data(arch_dirs, tmp_path):
    proc = cli(f"model.path={arch_dirs['gpt2']}", "eval.device=tpu9", tmp_path=tmp_path)
    assert_one_error_line(proc, "unknown eval.device 'tpu9'; valid: auto, cpu, cuda, cuda:N, mps")
    binary = tmp_path / "corpus.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    before = fingerprint(arch_dirs["gpt2"], binary)
    proc = cli(f"model.path={arch_dirs['gpt2']}", "data=text", f"data.path={binary}", "eval.context=32",
               tmp_path=tmp_path)  # fmt: skip
    assert_one_error_line(proc, f"data.path: '{binary}' is not UTF-8 text")
    assert fingerprint(arch_dirs["gpt2"], binary) == before


@pytest.mark.slow
def test_cli_llama_generic_plan_runs_and_seed_plan_says_gpt2(arch_dirs, corpus, tmp_path):
    common = ["model=llama", f"model.path={arch_dirs['llama']}", "data=text", f"data.path={corpus}",
              "eval.context=32", "eval.max_tokens=200"]  # fmt: skip
    proc = cli(*common, "plan=attn0_mlp123", tmp_path=tmp_path)
    assert_one_error_line(proc, "plan=attn0_mlp123 is written for GPT-2 unit names")
    proc = cli(*common, "plan=int8", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = yaml.safe_load(proc.stdout.strip().splitlines()[-1])
    assert row["error"] is None and set(row["bit_histogram"]) == {"int8", "fp32"}


def test_cli_offline_hub_model_fails_fast_without_retries(tmp_path):
    start = time.perf_counter()
    proc = cli(
        "model=gpt2", tmp_path=tmp_path, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    )
    elapsed = time.perf_counter() - start
    assert_one_error_line(
        proc, "cannot load the config of 'gpt2': the Hugging Face hub is out of reach (127.0.0.1:9"
    )
    assert "Retrying" not in proc.stderr and "Retry" not in proc.stdout
    assert elapsed < 60, elapsed  # the interpreter and imports only: no retry loop


def test_refine_trials_without_the_warm_start_is_an_error_not_ignored():
    with pytest.raises(ConfigError, match=r"search.refine_trials=5 needs the warm start"):
        search_config({"name": "x", "sampler": "nsga2", "refine_trials": 5, "warm_start": False})
    assert (
        search_config(
            {"name": "x", "sampler": "nsga2", "refine_trials": 0, "warm_start": False}
        ).refine_trials
        == 0
    )


def test_a_negative_penalty_and_sampler_options_optuna_refuses_are_one_line(tmp_path):
    """A negative penalty would reward degradation (issue 20: fitness 17.1 above compression 6.4); NSGA-II refuses
    population_size=1 with a ValueError: both are one line before anything is loaded or stored."""
    from conftest import compose_config

    from qsweep.session import EvalSession

    with pytest.raises(ConfigError, match=r"^penalty must be >= 0 .*got -1"):
        EvalSession(compose_config("penalty=-1", tmp_path=tmp_path))
    with pytest.raises(ConfigError, match=r"^bad search.sampler_options for nsga2: "):
        search_config({"name": "x", "sampler": "nsga2", "sampler_options": {"population_size": 1}})
