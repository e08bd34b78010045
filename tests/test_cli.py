"""`python -m qsweep` (single-plan evaluation): the overrides and the one-line JSON of the CLI contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir

from qsweep.config import register_configs
from qsweep.paths import config_dir
from qsweep.session import EvalSession

KEYS = {"perplexity", "baseline_perplexity", "model_size_bytes", "packed_size_bytes", "baseline_size_bytes",
        "compression", "degradation", "fitness", "bit_histogram", "eval_tokens", "eval_time_seconds"}  # fmt: skip


def run_qsweep(*overrides, tmp_path, check=True):
    env = {**os.environ, "QSWEEP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "qsweep", f"hydra.run.dir={tmp_path / 'run'}", *overrides],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def tiny_overrides(tiny_dirs):
    model_dir, corpus = tiny_dirs
    return [
        f"model.path={model_dir}",
        "data=text",
        f"data.path={corpus}",
        "eval.context=32",
        "eval.stride=16",
    ]


def test_one_json_line_with_the_contract_keys(tmp_path, tiny_dirs):
    proc = run_qsweep(*tiny_overrides(tiny_dirs), "plan=int8", "eval.max_tokens=300", tmp_path=tmp_path)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(row) >= KEYS
    assert row["split"] == "test" and row["error"] is None
    assert row["model_size_bytes"] < row["baseline_size_bytes"] and row["compression"] > 1.9
    assert row["fitness"] == pytest.approx(row["compression"] - 10 * max(0.0, row["degradation"]))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["perplexity"] == row["perplexity"]
    lo, hi = row["degradation_ci95"]
    assert lo <= row["degradation"] <= hi


def test_cli_number_equals_the_library(tmp_path, tiny_dirs):
    overrides = [*tiny_overrides(tiny_dirs), "plan=attn0_mlp123", "split=validation"]
    row = json.loads(run_qsweep(*overrides, tmp_path=tmp_path).stdout.strip().splitlines()[-1])
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"data.cache_dir={tmp_path / 'cache'}"])
    session = EvalSession(cfg)
    score = session.score(session.resolve_plan(cfg.plan), "validation")
    assert row["perplexity"] == score.perplexity and row["eval_tokens"] == score.result.n_tokens


def test_fp16_plan_against_fp16_baseline_is_zero_degradation(tmp_path, tiny_dirs):
    row = json.loads(
        run_qsweep(*tiny_overrides(tiny_dirs), tmp_path=tmp_path).stdout.strip().splitlines()[-1]
    )
    assert row["degradation"] == 0.0 and row["compression"] == 1.0


def test_plan_file_and_pinned_baseline(tmp_path, tiny_dirs):
    plan = tmp_path / "seed.json"
    plan.write_text(json.dumps({"mlp": 4, "attn": 8, "wte": 16}))
    proc = run_qsweep(*tiny_overrides(tiny_dirs), f"plan_file={plan}", "baseline.perplexity=100.0",
                      "baseline.size_bytes=1000000", tmp_path=tmp_path)  # fmt: skip
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["baseline_perplexity"] == 100.0 and row["baseline_size_bytes"] == 1_000_000
    assert set(row["bit_histogram"]) == {"int4", "int8", "fp16", "fp32"}  # wpe and LayerNorms unmatched: fp32
    assert row["degradation_ci95"] is None  # no paired baseline when it is pinned


@pytest.mark.parametrize(("override", "message"), [
    ("plan_file=/nonexistent/p.yaml", "qsweep: error: plan file '/nonexistent/p.yaml': cannot be read"),
    ("model.granularity=blocks", "qsweep: error: unknown model.granularity 'blocks'"),
    ("eval.dtype=int8", "qsweep: error: unknown eval.dtype 'int8'; valid: fp32, bf16, fp16"),
    ("eval.stride=64", r"qsweep: error: eval.stride must be in [1, context=32], got 64"),
])  # fmt: skip
def test_bad_input_is_one_error_line(tmp_path, tiny_dirs, override, message):
    proc = run_qsweep(*tiny_overrides(tiny_dirs), override, tmp_path=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message)


def test_unknown_config_key_is_rejected(tmp_path, tiny_dirs):
    proc = run_qsweep(*tiny_overrides(tiny_dirs), "eval.contxt=3", tmp_path=tmp_path, check=False)
    assert proc.returncode != 0 and "contxt" in proc.stderr


def test_offline_hub_model_names_the_fix(tmp_path):
    proc = run_qsweep("model=gpt2", "data=text", f"data.path={tmp_path}", tmp_path=tmp_path, check=False)
    assert proc.returncode == 2
    assert "pass a local copy with model.path=DIR" in proc.stderr.strip().splitlines()[-1]
