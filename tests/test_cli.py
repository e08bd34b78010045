"""`python -m qsweep` (single-plan evaluation): the overrides and the one-line JSON of the CLI contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, model_cfg

from qsweep.__main__ import USER_ERRORS, error_line
from qsweep.app import evaluate_one
from qsweep.apply import apply_plan_
from qsweep.errors import ConfigError
from qsweep.evaluate import Evaluator
from qsweep.model import load_model, load_tokenizer, unit_table
from qsweep.plan import Plan
from qsweep.session import EvalSession

# The record of a scored plan (qsweep/score.py), as the JSON line writes it: scripts read these names.
KEYS = {"split", "plan_digest", "perplexity", "baseline_perplexity", "degradation", "degradation_ci95_low",
        "degradation_ci95_high", "model_size_bytes", "packed_size_bytes", "baseline_size_bytes", "compression_seed",
        "compression_packed", "fitness_seed", "fitness_packed", "bits_per_param", "eval_tokens", "eval_seconds",
        "error", "bit_histogram"}  # fmt: skip


def run_qsweep(*overrides, tmp_path, check=True):
    env = {**os.environ, "QSWEEP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "qsweep", f"hydra.run.dir={tmp_path / 'run'}", *overrides],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def last_json_line(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluate_in_process(*overrides, tmp_path) -> dict:
    """What ``python -m qsweep OVERRIDES`` prints as its JSON line, computed in this process: the composed config
    through :func:`qsweep.app.evaluate_one`, as qsweep.__main__ calls it, without a new interpreter importing
    torch, transformers and Hydra (about 5 s per run on 2 cores). The subprocess tests keep the JSON line and the
    exit status honest."""
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    return evaluate_one(compose_config(*overrides, tmp_path=tmp_path), out)


def user_error_of(*overrides, tmp_path) -> str:
    """The one line ``python -m qsweep OVERRIDES`` prints before exiting with status 2 (qsweep.__main__: a
    USER_ERRORS exception, printed by error_line), computed in this process."""
    with pytest.raises(USER_ERRORS) as err:
        evaluate_in_process(*overrides, tmp_path=tmp_path)
    return error_line(err.value)


def tiny_overrides(tiny_dirs):
    model_dir, corpus = tiny_dirs
    return [
        f"model.path={model_dir}",
        "data=text",
        f"data.path={corpus}",
        "eval.context=32",
        "eval.stride=16",
    ]


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, tiny_dirs) -> tuple[dict, Path]:
    """The JSON line of ``plan=int8`` on the first 300 test tokens, and its run directory (one run, shared)."""
    tmp_path = tmp_path_factory.mktemp("int8")
    proc = run_qsweep(*tiny_overrides(tiny_dirs), "plan=int8", "eval.max_tokens=300", tmp_path=tmp_path)
    (tmp_path / "stderr.txt").write_text(proc.stderr)
    return last_json_line(proc), tmp_path / "run"


def test_a_successful_run_leaves_stderr_quiet(int8_run):
    # no "Loading weights" bar from transformers (qsweep.__main__.quiet_third_parties; hydra.verbose shows it)
    assert (int8_run[1].parent / "stderr.txt").read_text() == ""


def test_one_json_line_with_the_contract_keys(int8_run):
    row, run_dir = int8_run
    assert set(row) >= KEYS
    assert row["split"] == "test" and row["error"] is None
    assert row["model_size_bytes"] < row["baseline_size_bytes"] and row["compression_seed"] > 1.9
    assert row["compression_packed"] < row["compression_seed"]  # per-tensor scales cost a few bytes
    penalty = 10 * max(0.0, row["degradation"])
    assert row["fitness_seed"] == pytest.approx(row["compression_seed"] - penalty)
    assert row["fitness_packed"] == pytest.approx(row["compression_packed"] - penalty)
    assert json.loads((run_dir / "results.json").read_text())["perplexity"] == row["perplexity"]
    # a real interval (int8 moves every window differently), about this plan against this baseline: centred, in
    # log space, on the reported degradation (a swapped or mismatched pair would not be)
    lo, hi = row["degradation_ci95_low"], row["degradation_ci95_high"]
    assert lo < hi
    assert (1 + lo) * (1 + hi) == pytest.approx((1 + row["degradation"]) ** 2, rel=1e-9)


# A whole split through a new interpreter: slow. In the fast suite, test_degradation_is_paired_against_a_real_fp16_
# evaluation checks the CLI's JSON line against a computation outside the CLI too.
@pytest.mark.slow
def test_cli_number_equals_the_library(tmp_path, tiny_dirs):
    overrides = [*tiny_overrides(tiny_dirs), "plan=attn0_mlp123", "split=validation"]
    row = last_json_line(run_qsweep(*overrides, tmp_path=tmp_path))
    cfg = compose_config(*overrides, tmp_path=tmp_path)
    session = EvalSession(cfg)
    score = session.score(session.resolve_plan(cfg.plan), "validation")
    assert row["perplexity"] == score.perplexity and row["eval_tokens"] == score.result.n_tokens


def independent_perplexity(tiny_dirs, formats, max_tokens: int) -> float:
    """Perplexity of the tiny model with each unit in ``formats(unit name)``, outside the session and the CLI."""
    model_dir, corpus = tiny_dirs
    cfg = model_cfg("gpt2", path=str(model_dir))
    model = load_model(cfg)
    table = unit_table(model, cfg)
    apply_plan_(model, Plan({u: formats(u) for u in table.names}), table)
    text = (corpus / "test.txt").read_text()
    ids = torch.tensor(load_tokenizer(cfg)(text, verbose=False)["input_ids"][:max_tokens])
    return Evaluator(ids, 32, 16, batch_size=8, device="cpu").evaluate(model).perplexity


def test_degradation_is_paired_against_a_real_fp16_evaluation(tmp_path, tiny_dirs, int8_run):
    fp16 = independent_perplexity(tiny_dirs, lambda u: "fp16", 300)
    fp32 = independent_perplexity(tiny_dirs, lambda u: "fp32", 300)
    int8 = independent_perplexity(tiny_dirs, lambda u: "fp32" if "ln" in u else "int8", 300)  # conf/plan/int8
    # the three plans are told apart far beyond the tolerances below (measured: 6.8e-6 and 3.8e-4)
    assert abs(fp16 / fp32 - 1) > 1e-7 and abs(int8 / fp16 - 1) > 1e-5
    row, _ = int8_run
    assert row["baseline_perplexity"] == pytest.approx(fp16, rel=1e-12)  # the fp16 baseline, not fp32
    assert row["perplexity"] == pytest.approx(int8, rel=1e-12)
    assert row["degradation"] == pytest.approx(int8 / fp16 - 1, rel=1e-9)
    # the same plan as the baseline, written differently (a seed plan file: every parameter 16 bits)
    plan = tmp_path / "all16.json"
    plan.write_text(json.dumps({"transformer": 16}))
    row = evaluate_in_process(*tiny_overrides(tiny_dirs), f"plan_file={plan}", "eval.max_tokens=300",
                              tmp_path=tmp_path)  # fmt: skip
    assert row["perplexity"] == pytest.approx(fp16, rel=1e-12) and row["degradation"] == 0.0
    assert row["compression_seed"] == row["compression_packed"] == 1.0
    assert row["degradation_ci95_low"] == row["degradation_ci95_high"] == 0.0


def test_plan_file_and_pinned_baseline(tmp_path, tiny_dirs):
    plan = tmp_path / "seed.json"
    plan.write_text(json.dumps({"mlp": 4, "attn": 8, "wte": 16}))
    row = evaluate_in_process(*tiny_overrides(tiny_dirs), f"plan_file={plan}", "baseline.perplexity=100.0",
                              "baseline.size_bytes=1000000", tmp_path=tmp_path)  # fmt: skip
    assert row["baseline_perplexity"] == 100.0 and row["baseline_size_bytes"] == 1_000_000
    assert set(row["bit_histogram"]) == {"int4", "int8", "fp16", "fp32"}  # wpe and LayerNorms unmatched: fp32
    assert row["degradation_ci95_low"] is None and row["degradation_ci95_high"] is None  # no paired baseline


BAD_INPUT = [
    ("plan_file=/nonexistent/p.yaml", "qsweep: error: plan file '/nonexistent/p.yaml': cannot be read"),
    ("model.granularity=blocks", "qsweep: error: unknown model.granularity 'blocks'"),
    ("eval.dtype=int8", "qsweep: error: unknown eval.dtype 'int8'; valid: auto, fp32, bf16, fp16"),
    ("eval.stride=64", r"qsweep: error: eval.stride must be in [1, context=32], got 64"),
]


def test_bad_input_is_one_error_line_and_exit_status_2(tmp_path, tiny_dirs):
    """The contract end to end, through a real ``python -m qsweep`` (the other cases run in-process, below)."""
    override, message = BAD_INPUT[0]
    proc = run_qsweep(*tiny_overrides(tiny_dirs), override, tmp_path=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message)


@pytest.mark.parametrize(("override", "message"), BAD_INPUT)
def test_bad_input_is_one_error_line(tmp_path, tiny_dirs, override, message):
    # a USER_ERRORS exception is what qsweep.__main__ turns into exit status 2, printing error_line(err) last
    assert user_error_of(*tiny_overrides(tiny_dirs), override, tmp_path=tmp_path).startswith(message)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+search=nsga2", "search.n_trails=5"],
         "unknown config key 'search.n_trails' (did you mean search.n_trials, "),
        (["search.n_trails=5"],
         "unknown config key 'search.n_trails'; no search is selected: choose one with +search=OPTION (gp, nsga2, "),
        (["+search.degradation=kld", "search.n_trials=8"],  # + made a search node of one key, not a search
         "unknown config key 'search.n_trials'; no search is selected: choose one with +search=OPTION (gp, nsga2, "),
        (["eval.contxt=3"], "unknown config key 'eval.contxt' (did you mean eval.context"),
        (["+serch=nsga2"], "unknown config key 'serch' (did you mean search?)"),  # + adds keys Hydra would keep
        (["+model.nme=x"], "unknown config key 'model.nme' (did you mean model.name"),
        (["plan.units.x=int8"], "unknown config key 'plan.units.x'; to add it there, use +plan.units.x=VALUE"),
        (["+search=nsgaa2"], "unknown option 'nsgaa2' of config group 'search' (did you mean nsga2?); valid: gp, "),
        (["plan=nonexistent"], "unknown option 'nonexistent' of config group 'plan'; valid: all_int8_attn, "),
        (["precision=bogus"], "unknown option 'bogus' of config group 'precision'; valid: gguf, gguf_k, lowbit, open, seed"),
        (["search=nsga2"], "config group 'search' is not in the defaults list: add it with +search=OPTION"),
        (["penalty=abc"], "penalty=abc: Value 'abc' of type 'str' could not be converted to Float"),
        (["eval.context=["], "cannot parse the override: "),
    ],
)  # fmt: skip
def test_a_composition_error_is_one_line_naming_the_fix(overrides, message):
    from qsweep.config import compose_config as compose

    with pytest.raises(ConfigError) as err:
        compose(overrides)
    line = error_line(err.value)
    assert line.startswith(f"qsweep: error: {message}") and "\n" not in line, line


def test_the_cli_prints_hydras_composition_errors_as_one_line_with_exit_2(tmp_path):
    # Hydra itself prints 6-16 lines and exits 1 (qsweep.__main__._one_line_composition_errors); a multirun too
    for args in (
        ["+search=nsgaa2"],
        ["-m", "+search=nsga2", "search.n_trials=3,4", "search.seedd=1"],
        ["-m", "+search=tpe,random", "search.seedd=1"],
    ):  # a sweep of the group: its first option is read
        proc = subprocess.run([sys.executable, "-m", "qsweep", *args, f"hydra.run.dir={tmp_path / 'run'}",
                               f"hydra.sweep.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("qsweep: error: unknown "), (
            proc.stderr
        )
        assert "did you mean" in proc.stderr and not (tmp_path / "run").exists()
    (tmp_path / "file").write_text(
        ""
    )  # a run directory that cannot be made: Hydra's OSError, before the task
    proc = subprocess.run([sys.executable, "-m", "qsweep", f"hydra.run.dir={tmp_path / 'file' / 'run'}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr == (
        f"qsweep: error: cannot write the run directory ({tmp_path / 'file' / 'run'}: Not a directory); set "
        "hydra.run.dir (hydra.sweep.dir with -m) to a writable directory\n"
    )


def test_offline_hub_model_names_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(
        constants, "HF_HUB_OFFLINE", True
    )  # what HF_HUB_OFFLINE=1 sets as the hub is imported
    line = user_error_of("model=gpt2", "data=text", f"data.path={tmp_path}", tmp_path=tmp_path)
    assert "pass a local copy with model.path=DIR" in line


def test_help_describes_the_tool_not_hydra():
    proc = subprocess.run([sys.executable, "-m", "qsweep", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("qsweep: search mixed-precision quantization plans for causal language models.")
    assert "powered by Hydra" not in out
    commands = ("python -m qsweep plan=int8", "+search=nsga2", "-m +search=nsga2,tpe")
    groups = ("model: gpt2, llama, opt, tiny", "search: gp, nsga2, random, tpe")
    results = ("outputs/<date>/<time>/", "results.json", "pareto.csv", "study.db")
    for needle in (*commands, *groups, *results):
        assert needle in out, needle
