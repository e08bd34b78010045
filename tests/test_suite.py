"""The test suite itself: every test function runs somewhere in CI, and CI fails when a test fails.

CI (.ci/run) runs the README's Quickstart commands verbatim (install + main job, then the test command: the fast
suite, pyproject's addopts deselect ``slow`` and ``gpu``), then the tests marked ``extras`` with the optional extras
installed, then ``pytest -m slow``; ``gpu`` tests need a CUDA device and run on GPU machines only. A test that is in
neither selection, or never collected at all (a file not named test_*.py, a function shadowed by a second one of
the same name, a test method in a class pytest does not collect), would silently never run.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

TESTS = ROOT / "tests"

# A pytest plugin for the collecting subprocess: every item with its markers (before -m deselects any), then the
# ids the command keeps.
PROBE = """
import json, os

_items = {}

def pytest_itemcollected(item):
    _items[item.nodeid] = {
        "file": str(item.path.relative_to(item.config.rootpath)),
        "name": getattr(item, "originalname", item.name),
        "cls": item.cls.__name__ if getattr(item, "cls", None) else None,
        "markers": sorted({m.name for m in item.iter_markers()}),
    }

def pytest_collection_finish(session):
    with open(os.environ["QSWEEP_PROBE_OUT"], "w") as f:
        json.dump({"items": _items, "kept": [i.nodeid for i in session.items]}, f)
"""


def readme_quickstart() -> list[str]:
    """The commands of the README's Quickstart: the non-comment lines of its first ```bash block."""
    text = (ROOT / "README.md").read_text().split("\n## Quickstart", 1)[1]
    block = text.split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def readme_test_command() -> str:
    """The README's test command: the ``python -m pytest...`` line of its Quickstart."""
    commands = [ln for ln in readme_quickstart() if re.fullmatch(r"python -m pytest( [^#`]*)?", ln.strip())]
    assert commands, "the README Quickstart has no `python -m pytest` line"
    return commands[0].strip()


def test_the_quickstart_is_two_commands_install_and_run_then_test():
    install, test = readme_quickstart()
    assert 'pip install -e ".[test,dashboard]"' in install
    assert install.endswith("python -m qsweep +search=nsga2 search.n_trials=40")
    assert test == "python -m pytest"


def defined_tests() -> dict[tuple[str, str | None, str], int]:
    """(file, class or None, function) -> how many times it is defined, for every test in a tests/ file."""
    found: dict[tuple[str, str | None, str], int] = {}
    for path in sorted(TESTS.rglob("*.py")):
        if path.name == "conftest.py":
            continue
        file = str(path.relative_to(ROOT))
        for node in ast.parse(path.read_text()).body:
            scopes = (
                [(None, node)] if not isinstance(node, ast.ClassDef) else [(node.name, n) for n in node.body]
            )
            for cls, fn in scopes:
                if (
                    isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                    and fn.name.startswith("test")
                    and not any(
                        "fixture" in ast.unparse(d) for d in fn.decorator_list
                    )  # a fixture named test_*
                ):
                    found[(file, cls, fn.name)] = found.get((file, cls, fn.name), 0) + 1
    return found


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> dict:
    """Collect with the README's command (plus --collect-only and the probe) in a subprocess."""
    tmp = tmp_path_factory.mktemp("probe")
    (tmp / "qsweep_collect_probe.py").write_text(PROBE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")])),
        "QSWEEP_PROBE_OUT": str(tmp / "out.json"),
    }
    args = readme_test_command().split()[1:]  # the README's words after `python`
    proc = subprocess.run(
        [sys.executable, *args, "--collect-only", "-q", "-p", "qsweep_collect_probe"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text())


def test_every_defined_test_is_collected(collected):
    defined = defined_tests()
    duplicates = sorted(k for k, n in defined.items() if n > 1)
    assert not duplicates, f"defined twice (the second silently replaces the first): {duplicates}"
    seen = {(i["file"], i["cls"], i["name"]) for i in collected["items"].values()}
    missing = sorted(set(defined) - seen, key=str)
    assert not missing, f"test functions pytest never collects (file name, class name?): {missing}"


def test_every_collected_test_runs_in_the_fast_suite_or_is_marked_slow_or_gpu(collected):
    items, kept = collected["items"], set(collected["kept"])
    assert kept, "the README's test command selects nothing"
    left_out = sorted(i for i in items if i not in kept and not {"slow", "gpu"} & set(items[i]["markers"]))
    assert not left_out, f"neither in the fast suite nor marked slow/gpu: {left_out}"
    # and the fast suite holds no test marked slow or gpu (they have their own runs)
    assert not [i for i in kept if {"slow", "gpu"} & set(items[i]["markers"])]


FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$FAKE_LOG"
case "$*" in
  *"-m qsweep"*) exit "$MAIN_RC" ;;
  *"-m pytest"*"-m slow"*) exit "$SLOW_RC" ;;
  *"-m pytest"*) exit "$FAST_RC" ;;
esac
"""
FAKE_PIP = """#!/usr/bin/env bash
echo "pip $*" >> "$FAKE_LOG"
"""
FAKE_PYTHON3 = """#!/usr/bin/env bash
# `python3.11 -m venv DIR`: a venv whose activate script changes nothing
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && : > "$3/bin/activate"; fi
"""


def run_ci(tmp_path: Path, fast_rc: int, slow_rc: int, main_rc: int = 0) -> tuple[int, list[str]]:
    """Run a copy of .ci/run (and the README it reads) with python, python3.11, pip and ruff replaced by fakes
    that log their calls and return the given codes; the calls of python."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = (
        ("python", FAKE_PYTHON),
        ("python3.11", FAKE_PYTHON3),
        ("pip", FAKE_PIP),
        ("ruff", "#!/usr/bin/env bash\n"),
    )
    for name, text in fakes:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log), "FAST_RC": str(fast_rc),
           "SLOW_RC": str(slow_rc), "MAIN_RC": str(main_rc), "HOME": str(tmp_path)}  # fmt: skip
    proc = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, timeout=60)
    return proc.returncode, log.read_text().splitlines() if log.exists() else []


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_runs_the_readme_commands_first_then_the_extras_and_slow_tests(tmp_path):
    rc, calls = run_ci(tmp_path, 0, 0)
    assert rc == 0
    install = readme_quickstart()[0]
    # CPU torch goes into the fresh venv first; then the README's commands, as written (the fakes log argv)
    assert calls.index("python -m pip install --quiet torch==2.13.0") < calls.index(
        "pip install -e .[test,dashboard]"
    )
    readme = [
        c for c in calls if c.startswith(("pip install -e .[test", "python -m qsweep", "python -m pytest"))
    ]
    assert readme[:3] == [
        "pip install -e .[test,dashboard]",
        install.split(" && ")[-1],
        readme_test_command(),
    ]
    assert [c for c in calls if "-m pytest" in c] == [
        readme_test_command(),
        "python -m pytest -m extras and not slow and not gpu",
        "python -m pytest -m slow",
    ]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_fails_when_the_readme_main_job_fails(tmp_path):
    rc, calls = run_ci(tmp_path, 0, 0, main_rc=3)
    assert rc == 3 and not [c for c in calls if "-m pytest" in c]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(("fast_rc", "slow_rc"), [(1, 0), (0, 1), (0, 2)])
def test_ci_fails_when_a_test_run_fails(tmp_path, fast_rc, slow_rc):
    rc, _ = run_ci(tmp_path, fast_rc, slow_rc)
    assert rc == max(fast_rc, slow_rc)
