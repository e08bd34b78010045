"""What keeps a study whole (issue 9): its identity, heartbeats, storage files that are not its own, data errors
caught before anything is stored, the bundled corpus's cache, every sampler on the menu tested, the Quickstart.

Fast: the identity and storage checks need no model; the two studies run a few trials of 1,024 tokens.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import warnings

import optuna
import pytest
from conftest import ROOT, _corpus_docs, compose_config

import qsweep.corpus as corpus
from qsweep.app import run_search
from qsweep.data import DataLoadError, corpus_text
from qsweep.errors import ConfigError
from qsweep.paths import config_dir
from qsweep.search.config import search_config
from qsweep.search.storage import open_storage
from qsweep.search.study import open_study, optimize, study_identity

FAST = ["eval.max_tokens=1024", "eval.context=128", "precision=seed", "search.enqueue=[uniform]",
        "search.warm_start=false", "search.refine_trials=0"]  # fmt: skip


def compose_cfg(*overrides, tmp_path):
    return compose_config(*FAST, *overrides, tmp_path=tmp_path)


def _small_splits() -> dict[str, str]:
    docs = _corpus_docs()
    return {
        "train": "\n\n".join(docs[:3]),
        "validation": "\n\n".join(docs[40:43]),
        "test": "\n\n".join(docs[43:46]),
    }


@pytest.fixture
def small_corpus(monkeypatch) -> list:
    """The bundled corpus builder replaced by one of a few pydoc topics (the real one reads the whole stdlib, ~10 s
    per fresh data.cache_dir); returns the list of its calls."""
    calls = []

    def build():
        calls.append(1)
        return _small_splits()

    monkeypatch.setattr(corpus, "build_splits", build)
    return calls


# --------------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize(("key", "base", "changed"), [
    ("model", [], ["model.granularity=linear"]),
    ("model", ["model.path=/models/a"], ["model.path=/models/b"]),
    ("data", [], ["data=text", "data.path=/corpora/notes.txt"]),
    ("data", ["data=wikitext2"], ["data=wikitext2", "data.subset=wikitext-103-raw-v1"]),
    ("data", ["data=wikitext2"], ["data=wikitext2", "data.joiner=' '"]),
    ("protocol", [], ["eval.max_tokens=2048"]),
    ("protocol", [], ["eval.stride=64"]),
    ("protocol", [], ["eval.search_split=train"]),
    ("menu", [], ["precision=open"]),
    ("menu", [], ["precision.menu=[{pattern: '.*', formats: [fp16, int8]}]"]),
    ("size_metric", [], ["search.size_metric=seed"]),
    ("baseline", [], ["baseline.plan=int8"]),
    ("baseline", [], ["baseline.perplexity=28.4805"]),
    ("baseline", [], ["penalty=5"]),
])  # fmt: skip
def test_a_resume_that_changes_one_identity_key_is_refused_naming_it(tmp_path, key, base, changed):
    def identity(*overrides):
        cfg = compose_cfg("+search=random", *overrides, tmp_path=tmp_path)
        return study_identity(cfg, search_config(cfg.search), context=128)

    first, second = identity(*base), identity(*changed)
    assert {k for k in first if first[k] != second[k]} == {key}
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = open_storage(url)

    def resume(ident):
        return open_study(storage=storage, url=url, name="s", sampler=optuna.samplers.RandomSampler(),
                          directions=["minimize"], metric_names=["v"], identity=ident, enqueue={})  # fmt: skip

    study = resume(first)
    study.optimize(lambda t: 1.0, n_trials=1)
    assert resume(first).user_attrs["identity"] == first  # the same settings resume
    with pytest.raises(ConfigError) as e:
        resume(second)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(
        f"study 's' in {url} was run with {key} {first[key]!r}, this run has {second[key]!r}"
    )
    assert len(study.trials) == 1 and study.user_attrs["identity"] == first


# ------------------------------------------------------------------------------------------------ heartbeats


def test_heartbeats_are_on_by_default_for_sqlite_and_print_no_warnings(tmp_path, capfd):
    """The storage a default study opens (what run_search does with cfg.storage) beats, silently."""
    cfg = compose_cfg("+search=random", tmp_path=tmp_path)
    assert cfg.storage.url is None and cfg.storage.heartbeat_interval == 10  # storage=sqlite, the default
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage = open_storage(url, cfg.storage.heartbeat_interval, cfg.storage.grace_period)
        study = open_study(storage=storage, url=url, name="s", sampler=optuna.samplers.RandomSampler(seed=0),
                           directions=["minimize"], metric_names=["v"], identity={"k": "v"}, enqueue={})  # fmt: skip
        optimize(study, lambda t: t.suggest_float("x", 0, 1), budget=2, progress=False)
    assert [
        str(w.message) for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)
    ] == []
    assert "Warning" not in capfd.readouterr().err
    assert storage.get_heartbeat_interval() == 10
    with sqlite3.connect(tmp_path / "study.db") as con:  # each trial beat while it ran
        beats = con.execute("SELECT COUNT(DISTINCT trial_id) FROM trial_heartbeats").fetchone()[0]
    assert beats == 2


# ------------------------------------------------------------------------------- storage files not a study's


def _foreign_sqlite(path):
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_text("my notes\n"), r"exists and is not an Optuna journal file"),
    (lambda p: p.write_text("no newline"), r"exists and is not an Optuna journal file"),
    (lambda p: p.write_bytes(bytes(range(256))), r"exists and is not an Optuna journal file"),
    (_foreign_sqlite, r"is an SQLite database, not a journal file: for an SQLite study write storage.url=sqlite:///"),
])  # fmt: skip
def test_a_journal_url_at_a_foreign_file_is_refused_untouched(tmp_path, make, message):
    path = tmp_path / "app.db"
    make(path)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=rf"^storage.url='{path}' {message}"):
        open_storage(str(path), heartbeat_interval=10)
    assert path.read_bytes() == before


def test_an_existing_journal_is_reopened(tmp_path):
    path = tmp_path / "s.journal"
    study = optuna.create_study(study_name="j", storage=open_storage(str(path), heartbeat_interval=10))
    study.optimize(lambda t: 1.0, n_trials=2)
    again = optuna.load_study(study_name="j", storage=open_storage(str(path), heartbeat_interval=10))
    assert len(again.trials) == 2


# ----------------------------------------------------------------------------- data errors before the study


@pytest.mark.parametrize(("overrides", "error", "message"), [
    (["data=text", "data.path={five}"], ConfigError, r"split 'validation' of data.path='.*five.txt' has \d tokens"),
    (["data=text", "data.path={binary}"], DataLoadError, r"data.path: '.*binary.txt' is not UTF-8 text"),
    (["eval.search_split=valid"], DataLoadError, r"unknown split 'valid' of the bundled corpus \(did you mean"),
    (["eval.report_split=tset"], DataLoadError, r"unknown split 'tset' of the bundled corpus"),
])  # fmt: skip
def test_data_errors_of_a_search_come_before_its_study(
    tmp_path, caplog, small_corpus, overrides, error, message
):
    (tmp_path / "five.txt").write_text("the cat sat")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    paths = {"five": tmp_path / "five.txt", "binary": tmp_path / "binary.txt"}
    cfg = compose_cfg("+search=random", "search.n_trials=2", *[o.format(**paths) for o in overrides],
                      tmp_path=tmp_path)  # fmt: skip
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(error, match=message):
        run_search(cfg, out)
    assert not (out / "study.db").exists()  # refused before a study (or a failed trial) is stored
    assert [r for r in caplog.records if r.exc_info] == []  # no traceback logged


def test_a_user_error_inside_a_trial_is_not_logged_with_a_traceback(caplog):
    def objective(trial):
        trial.suggest_float("x", 0, 1)
        raise ConfigError("data.cache_dir: cannot write")

    study = optuna.create_study()
    with pytest.raises(ConfigError, match=r"data.cache_dir: cannot write"):
        optimize(study, objective, budget=2, progress=False)
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert [r for r in caplog.records if r.exc_info or "failed with value None" in r.getMessage()] == []


# ------------------------------------------------------------------------------- the bundled corpus's cache


@pytest.mark.parametrize("damage", [
    lambda f: f.write_bytes(f.read_bytes()[:10]),  # truncated JSON
    lambda f: f.write_bytes(b"\xff\xfe\x00junk"),  # not UTF-8
    lambda f: f.write_text(json.dumps({"train": "x"})),  # a split missing
    lambda f: f.write_text("[1, 2]"),  # not an object
])  # fmt: skip
def test_an_unreadable_corpus_cache_is_rebuilt_with_a_warning_naming_it(
    tmp_path, small_corpus, caplog, damage
):
    assert corpus.bundled_split_text("test", tmp_path) == _small_splits()["test"]
    (cache,) = (tmp_path / "corpus").glob("*.json")
    damage(cache)
    with caplog.at_level(logging.WARNING, logger="qsweep.corpus"):
        assert corpus.bundled_split_text("validation", tmp_path) == _small_splits()["validation"]
    assert (
        f"corpus cache {cache} is unreadable" in caplog.text and "deleting and rebuilding it" in caplog.text
    )
    assert json.loads(cache.read_text())["splits"] == _small_splits() and len(small_corpus) == 2


def test_an_unwritable_corpus_cache_names_the_key(tmp_path, small_corpus):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataLoadError, match=r"^cannot write the corpus cache '.*file/corpus/stdlib-.*json' .*set "
                                            r"data.cache_dir \(or QSWEEP_CACHE\) to a writable directory"):  # fmt: skip
        corpus_text({"source": "bundled", "cache_dir": str(blocker)}, "test")


def test_an_unknown_split_of_the_bundled_corpus_names_the_keys(tmp_path, small_corpus):
    with pytest.raises(DataLoadError, match=r"^unknown split 'valid' of the bundled corpus \(did you mean validation\?\)"
                                            r"; valid: train, validation, test \(eval.search_split, "
                                            r"eval.report_split, split\)"):  # fmt: skip
        corpus_text({"source": "bundled", "cache_dir": str(tmp_path)}, "valid")
    assert small_corpus == []  # refused before building anything


# ------------------------------------------------------------------------------------------- menu and README


def test_every_sampler_on_the_menu_runs_in_a_test():
    """conf/search/*.yaml is the menu; test_search runs a short study of each (reproducibility per sampler)."""
    import test_search

    (mark,) = [
        m
        for m in test_search.test_same_seed_same_trials_different_seed_different.pytestmark
        if m.name == "parametrize"
    ]
    tested = {getattr(p, "values", (p,))[0] for p in mark.args[1]}
    assert {p.stem for p in (config_dir() / "search").glob("*.yaml")} == tested


def test_the_quickstart_block_is_two_commands_with_the_venv_python_and_cpu_torch_lines():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(commands) == 2 and commands[1].startswith("python -m pytest")
    assert commands[0].startswith("python3.11 -m venv .venv && . .venv/bin/activate && pip install -e")
    assert "+search=nsga2" in commands[0]
    assert "Python 3.11 or newer" in block
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in block


@pytest.mark.slow
def test_cli_search_on_a_binary_corpus_is_one_line_and_leaves_no_study(tmp_path):
    import os
    import subprocess
    import sys

    binary = tmp_path / "corpus.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    run = tmp_path / "run"
    env = {**os.environ, "QSWEEP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "qsweep", "+search=random", "search.n_trials=2", "data=text", f"data.path={binary}",
         *FAST[:2], f"hydra.run.dir={run}"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout and "failed with" not in proc.stderr
    assert [ln for ln in lines if ln.startswith("qsweep: error:")] == [lines[-1]]
    assert lines[-1].startswith(f"qsweep: error: data.path: '{binary}' is not UTF-8 text")
    assert not (run / "study.db").exists()
