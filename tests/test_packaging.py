"""A non-editable install must carry conf/ (top level in the repository) with it."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_non_editable_install_finds_conf(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    code = (
        "import qsweep.paths as p, sys; d = p.config_dir(); "
        "assert str(d).startswith(sys.argv[1]), d; "
        "assert (d / 'plan' / 'attn0_mlp123.yaml').is_file() and (d / 'model' / 'gpt2.yaml').is_file(); "
        "print(d)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(target)], check=True, capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": ""},
    )  # fmt: skip
    assert out.stdout.strip() == str(target / "qsweep" / "conf")
