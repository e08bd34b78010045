"""Studies end to end on the bundled model (a few trials, few tokens): files, resume, reproducibility, errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT
from hydra import compose, initialize_config_dir

from qsweep.config import register_configs
from qsweep.paths import config_dir
from qsweep.plan import PlanError
from qsweep.search.space import SearchSpace
from qsweep.search.study import run_search

# Tiny evaluations: 1,024 tokens of each split, windows of 128.
FAST = ["eval.max_tokens=1024", "eval.context=128", "precision=seed", "search.enqueue=[uniform]"]


def compose_cfg(*overrides, tmp_path):
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[*FAST, f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def trials_of(summary) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=summary["study_name"], storage=summary["storage"]).trials


def cli(*args, tmp_path, check=True, **kw):
    env = {**os.environ, "QSWEEP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "qsweep", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600, **kw)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("search", ["nsga2", "tpe"])
def test_study_end_to_end(tmp_path, search):
    out = tmp_path / "run"
    out.mkdir()
    cfg = compose_cfg(f"+search={search}", "search.n_trials=7", "search.sampler_options.n_startup_trials=3"
                      if search == "tpe" else "search.sampler_options.population_size=4", tmp_path=tmp_path)  # fmt: skip
    summary = run_search(cfg, out)
    trials = trials_of(summary)
    assert sum(t.state.name == "COMPLETE" for t in trials) == 7
    assert [t.user_attrs["enqueued_as"] for t in trials[:3]] == [
        "uniform:fp16",
        "uniform:int8",
        "uniform:int4",
    ]
    for t in trials:
        for key in ("plan", "perplexity", "model_size_bytes", "packed_size_bytes", "compression", "degradation",
                    "fitness", "eval_tokens", "eval_seconds"):  # fmt: skip
            assert key in t.user_attrs
    results = json.loads((out / "results.json").read_text())
    assert results["search_split"] == "validation" and results["report_split"] == "test"
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert rows and all(r["report_perplexity"] for r in rows)
    assert (out / "pareto.png").stat().st_size > 10_000
    best = results["best"]
    assert best["search_fitness"] == max(float(r["search_fitness"]) for r in rows)
    # best_plan.yaml re-evaluates, through the CLI, to the perplexity stored for it on the same split
    stored = next(t for t in trials if t.number == best["trial"]).user_attrs["perplexity"]
    proc = cli(*FAST[:2], f"plan_file={out / 'best_plan.yaml'}", "split=validation", f"hydra.run.dir={tmp_path / 'v'}",
               tmp_path=tmp_path)  # fmt: skip
    assert json.loads(proc.stdout.strip().splitlines()[-1])["perplexity"] == stored
    assert yaml.safe_load((out / "best_plan.yaml").read_text())["version"] == 1


@pytest.mark.parametrize("search", ["random", "tpe", "nsga2"])
def test_same_seed_same_trials_different_seed_different(tmp_path, search):
    from qsweep.search.study import StudyRunner

    options = {"tpe": ["search.sampler_options.n_startup_trials=2"],
               "nsga2": ["search.sampler_options.population_size=2"]}.get(search, [])  # fmt: skip

    def params(seed, name):
        out = tmp_path / name
        out.mkdir()
        cfg = compose_cfg(f"+search={search}", "search.n_trials=5", f"search.seed={seed}", "search.enqueue=[]",
                          *options, tmp_path=tmp_path)  # fmt: skip
        runner = StudyRunner(cfg, out)
        study = runner.open_study()
        runner.optimize(study)
        return [t.params for t in study.trials]

    a, b, c = params(0, "a"), params(0, "b"), params(1, "c")
    assert len(a) == 5 and a == b and a != c


def test_duplicate_plans_are_not_evaluated_twice(tmp_path, monkeypatch):
    """A space of two plans and six trials: four trials are answered from earlier ones, none evaluated again."""
    out = tmp_path / "run"
    out.mkdir()
    menu = "precision.menu=[{pattern: 'wte', formats: [fp16, int4]}, {pattern: '.*', formats: [fp16]}]"
    cfg = compose_cfg("+search=random", "search.n_trials=6", "search.enqueue=[]", menu, tmp_path=tmp_path)
    from qsweep.session import EvalSession

    calls = []
    real = EvalSession.evaluate

    def spy(self, plan, split):
        calls.append((plan.digest(), split))
        return real(self, plan, split)

    monkeypatch.setattr(EvalSession, "evaluate", spy)
    trials = trials_of(run_search(cfg, out))
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    dup = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert len(dup) >= 4
    for t in dup:
        assert t.values == trials[t.user_attrs["duplicate_of"]].values
    on_search_split = [d for d, split in calls if split == "validation"]
    assert len(on_search_split) == len(set(on_search_split))  # the all-fp16 plan is the baseline: scored once


def test_interrupted_study_resumes_to_n_trials(tmp_path):
    db = tmp_path / "study.db"
    # 16k tokens per trial: slow enough (about a second) that the SIGINT lands mid-study
    args = [*FAST, "+search=random", "search.n_trials=8", f"storage.url=sqlite:///{db}", "search.study_name=resume",
            f"hydra.run.dir={tmp_path / 'r1'}", "eval.max_tokens=16384"]  # fmt: skip
    env = {**os.environ, "QSWEEP_CACHE": str(tmp_path / "cache")}
    # A background job of a non-interactive shell (as CI may be) inherits SIGINT ignored: give the child the default
    # disposition, as an interactive terminal would, so that Python turns SIGINT into KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "qsweep", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 300
    n = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            n = sum(
                t.state.name == "COMPLETE"
                for t in optuna.load_study(study_name="resume", storage=f"sqlite:///{db}").trials
            )
        except Exception:  # the study does not exist yet
            continue
        if n >= 3:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Resume with" in out + err
    done_before = sum(
        t.state.name == "COMPLETE"
        for t in optuna.load_study(study_name="resume", storage=f"sqlite:///{db}").trials
    )
    assert 3 <= done_before < 8
    args[-2] = f"hydra.run.dir={tmp_path / 'r2'}"
    cli(*args, tmp_path=tmp_path)
    trials = optuna.load_study(study_name="resume", storage=f"sqlite:///{db}").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 8
    evaluated = [t.user_attrs["plan_digest"] for t in complete if "duplicate_of" not in t.user_attrs]
    assert len(evaluated) == len(set(evaluated))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_optuna_dashboard_reads_the_stored_study(tmp_path):
    pytest.importorskip("optuna_dashboard", reason="the dashboard extra is not installed")
    db = tmp_path / "s.db"
    storage = f"sqlite:///{db}"
    study = optuna.create_study(storage=storage, study_name="dash", directions=["minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[10.0, 5.0], params={}, distributions={}))
    port = _free_port()
    exe = shutil.which(
        "optuna-dashboard", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    assert exe, "the optuna-dashboard command is not installed with the dashboard extra"
    server = subprocess.Popen([exe, storage, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        body = None
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, "optuna-dashboard did not answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["dash"]
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize(("overrides", "message"), [
    (["+search=nsga2", "search.n_trials=0"], "qsweep: error: search.n_trials must be > 0, got 0"),
    (["+search=nsga2", "precision.menu=[{pattern: 'wte', formats: [fp16]}]"],
     "qsweep: error: the precision menu leaves unit 'wpe' no format"),
    (["+search=nsga2", "search.enqueue=[int8]", "precision=lowbit"],
     "qsweep: error: search.enqueue: plan 'int8' puts unit 'wte' in int8, which the precision menu 'lowbit' does not"),
    (["+search=nsga2", "search.sampler=cmaes"], "qsweep: error: unknown search.sampler 'cmaes'"),
    (["+search=nsga2", "storage.url=postgresql+psycopg2://u@127.0.0.1:1/none"], "qsweep: error: cannot open storage.url"),
])  # fmt: skip
def test_bad_search_input_is_one_line_and_leaves_no_study(tmp_path, overrides, message):
    run = tmp_path / "run"
    proc = cli(*FAST, *overrides, f"hydra.run.dir={run}", tmp_path=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert not (run / "study.db").exists()


def test_unknown_search_name_lists_the_options(tmp_path):
    proc = cli("+search=nsga3", f"hydra.run.dir={tmp_path}", tmp_path=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Could not find 'search/nsga3'" in proc.stderr and "nsga2" in proc.stderr


def test_space_has_one_parameter_per_searchable_unit(gpt2_small_table):
    menu = yaml.safe_load((config_dir() / "precision" / "seed.yaml").read_text())["menu"]
    space = SearchSpace.from_menu(gpt2_small_table, menu)
    assert len(space.searchable) == 2 + 24 and space.choices["h.0.ln_1"] == ("fp32",)
    assert space.size == 3**26
    with pytest.raises(PlanError, match="unknown format 'int9'"):
        SearchSpace.from_menu(gpt2_small_table, [{"pattern": ".*", "formats": ["int9"]}])


@pytest.mark.slow
def test_multirun_runs_four_studies(tmp_path):
    # non-swept keys of an opt-in group are set with choice(): Hydra checks plain overrides before adding the group
    proc = cli("-m", "+search=nsga2,tpe", "search.seed=0,1", "search.n_trials=choice(3)", "search.enqueue=choice([])",
               *FAST[:3],
               f"hydra.sweep.dir={tmp_path / 'multi'}", tmp_path=tmp_path)  # fmt: skip
    results = sorted((tmp_path / "multi").glob("*/results.json"))
    assert len(results) == 4, proc.stdout[-2000:]
    names = {json.loads(r.read_text())["study_name"] for r in results}
    assert len(names) == 4
