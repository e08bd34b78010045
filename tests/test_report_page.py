"""report.html (issue 22): one self-contained page per study, its numbers those of results.json, rebuilt the same by
``python -m qsweep.report``, and drawn by a real browser (the slow test)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import compose_config

from qsweep.app import run_search
from qsweep.report_page import _scrub, main, plan_grid

# 10 evaluations on 1,024 tokens of each split: 3 uniform plans, the proxy table (on 512 tokens), allocator plans,
# NSGA-II and refine trials
STUDY = ["eval.max_tokens=1024", "eval.context=128", "precision=seed", "+search=nsga2", "search.n_trials=10",
         "search.sampler_options.population_size=4", "search.warm_start_plans=3", "search.refine_trials=2",
         "search.sensitivity_tokens=512"]  # fmt: skip


class Page(HTMLParser):
    """The page's sections: text by id, table cells by their data attributes, every src/href."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: dict[str, str] = {}
        self.cells: list[dict] = []
        self.links: list[str] = []
        self.rows: dict[str, list[list[str]]] = {}
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of open elements
        self._text: dict[str, list[str]] = {}
        self._cell: dict | None = None
        self._plan: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v]
        if tag in ("br", "meta", "img", "link"):
            return
        self._open.append((tag, a.get("id")))
        if a.get("id"):
            self._text.setdefault(a["id"], [])
        if tag == "table" and "data-plan" in a:
            self._plan = a["data-plan"]
        if tag == "tr":
            table = next((i for t, i in reversed(self._open) if t == "table" and i), None)
            if table:
                self.rows.setdefault(table, []).append([])
        if tag in ("td", "th"):
            self._cell = {**a, "plan": self._plan, "text": ""}

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(self._cell)
            table = next((i for t, i in reversed(self._open) if t == "table" and i), None)
            if table and self.rows.get(table):
                self.rows[table][-1].append(self._cell["text"].strip())
            self._cell = None
        if (
            tag == "table"
            and self._plan is not None
            and any(t == "table" for t, _ in self._open[:-1]) is False
        ):
            self._plan = None
        while self._open:
            t, _ = self._open.pop()
            if t == tag:
                break

    def handle_data(self, data):
        for _, i in self._open:
            if i:
                self._text[i].append(data)
        if self._cell is not None:
            self._cell["text"] += data

    def text(self, id_: str) -> str:
        return " ".join("".join(self._text[id_]).split())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, bundled_cache):
    tmp = tmp_path_factory.mktemp("page")
    out = tmp / "run"
    out.mkdir()
    run_search(compose_config(*STUDY, tmp_path=tmp, cache_dir=bundled_cache), out)
    return out, json.loads((out / "results.json").read_text())


def test_each_section_of_the_page_holds_the_numbers_of_results_json(finished):
    out, results = finished
    text = (out / "report.html").read_text()
    page = Page(text)
    # self-contained: no fetched resource, plots inline; no local path
    assert (
        not [u for u in page.links if not u.startswith("#")]
        and "<script" not in text
        and "<link" not in text
        and text.count("<svg") == 2
    )
    assert str(out) not in text and str(out.parent) not in text
    # the verdict: chosen vs best uniform on the report split, with its paired interval
    vs, fit = results["best_vs_uniform"], results["fitness"]
    verdict = page.text("verdict")
    if vs["best_is_uniform"]:
        assert vs["uniform"] in verdict and "no mixed plan" in verdict
    else:
        lo, hi = vs["ci95"]
        assert f"difference {vs['difference']:+.4f} (paired 95% CI [{lo:+.4f}, {hi:+.4f}])" in verdict
        assert f"{vs[f'best_report_{fit}']:.4f} vs {vs[f'uniform_report_{fit}']:.4f}" in verdict
    # the front's candidates: every candidate, with its search and report fitness
    head, *rows = page.rows["candidates"]
    assert head[4:6] == [f"search {fit}", f"report {fit}"]
    by_trial = {int(r[0].split()[0]): r for r in rows}
    assert set(by_trial) == {c["trial"] for c in results["candidates"]}
    for c in results["candidates"]:
        r = by_trial[c["trial"]]
        assert r[4] == f"{c['search'][fit]:.4f}" and r[5] == f"{c['report'][fit]:.4f}"
        assert r[2] == str(c["search"]["packed_size_bytes"])
    assert by_trial[results["best"]["trial"]][0].endswith("(chosen)")
    # the plans: the chosen plan's grid is its plan, cell by cell; the uniform grid is one format throughout
    chosen = {
        c["data-unit"]: c["data-format"] for c in page.cells if c["plan"] == "chosen" and "data-unit" in c
    }
    assert chosen == results["best"]["plan"]
    uniform = {
        c["data-unit"]: c["data-format"] for c in page.cells if c["plan"] == "uniform" and "data-unit" in c
    }
    label = vs["uniform"]
    assert set(uniform) == set(chosen) and {f for u, f in uniform.items() if "ln" not in u} == {
        label.split(":")[1]
    }
    rec = results["best"]["report"]
    assert f"{rec['bits_per_param']:.3f} bits per parameter, {rec['packed_size_bytes']:,} bytes" in page.text(
        "plans"
    )
    # sensitivity: every (searchable unit, format) of the table, as degradation in percent
    table = json.loads((out / "sensitivity.json").read_text())
    shown = {(c["data-unit"], c["data-format"]): float(c["data-predicted"]) for c in page.cells
             if "data-predicted" in c}  # fmt: skip
    rows = [r for r in table["rows"] if not r["unit"].split(".")[-1].startswith("ln") and r["unit"] != "ln_f"]
    assert len(shown) == len(rows) == 26 * 3
    for r in rows:
        assert shown[(r["unit"], r["format"])] == pytest.approx(
            100 * math.expm1(r["delta_nll_per_token"]), rel=1e-5
        )
    # the study: identity, and the budget by phase adding up to what results.json says was spent
    ident = page.text("identity")
    assert all(str(v) in ident for v in results["identity"].values())
    head, *budget = page.rows["budget"]
    assert head == ["phase", "trials", "evaluations"]
    phases = {r[0]: (int(r[1]), float(r[2])) for r in budget}
    assert phases["sensitivity table"][1] == pytest.approx(results["sensitivity"]["cost_evals"], abs=1e-3)
    assert phases["total"][1] == pytest.approx(results["evaluations_spent"], abs=2e-3)
    assert phases["uniform"][0] == 3 and phases["total"][0] == sum(
        n for p, (n, _) in phases.items() if p != "total"
    )
    assert "+export=gguf plan_file=&lt;run dir&gt;/best_plan.yaml" in text


def test_python_m_qsweep_report_rebuilds_the_same_page_from_the_run_directory_or_the_study(
    finished, tmp_path
):
    out, results = finished
    written = (out / "report.html").read_text()
    (out / "report.html").unlink()
    assert main([str(out)]) == 0
    assert (out / "report.html").read_text() == written
    assert (
        main(["--storage", results["storage"], "--study", results["study_name"], "--out", str(tmp_path)]) == 0
    )
    rebuilt = (tmp_path / "report.html").read_text()
    assert str(out) not in rebuilt and Page(rebuilt).text("verdict") == Page(written).text("verdict")
    assert main([str(tmp_path / "nowhere")]) == 2  # one line, no traceback


def test_plan_grids_and_paths_are_read_from_any_family():
    comps, rows, other = plan_grid({"model.embed_tokens": "int8", "model.layers.0.self_attn": "int4",
                                    "model.layers.0.mlp": "int8", "model.layers.1.self_attn": "fp16",
                                    "model.layers.1.mlp": "int4", "lm_head": "fp16"})  # fmt: skip
    assert comps == ["self_attn", "mlp"] and rows == [("0", {"self_attn": "int4", "mlp": "int8"}),
                                                      ("1", {"self_attn": "fp16", "mlp": "int4"})]  # fmt: skip
    assert other == {"model.embed_tokens": "int8", "lm_head": "fp16"}
    cmd = "python -m qsweep model.path=/data/m storage.url=sqlite:////srv/x/study.db hydra.run.dir=/tmp/r +search=tpe"
    assert _scrub(cmd, None) == ("python -m qsweep model.path=<model.path> storage.url=<storage.url> "
                                 "hydra.run.dir=<hydra.run.dir> +search=tpe")  # fmt: skip
    # passwords, quoted paths with spaces, the run directory inside a URL, free text
    cmd = "python -m qsweep 'data.path=/home/me/my data' storage.url=postgresql://u:hunter2@db/x"
    assert _scrub(cmd, None) == "python -m qsweep data.path=<data.path> storage.url=postgresql://u:***@db/x"
    cmd = "python -m qsweep storage.url=sqlite:////tmp/r/study.db search.study_name=s"
    assert (
        _scrub(cmd, Path("/tmp/r"))
        == "python -m qsweep 'storage.url=sqlite:///<run dir>/study.db' search.study_name=s"
    )
    assert _scrub("/tmp/r/x and /home/me/m (component)", Path("/tmp/r"), command=False) == (
        "<run dir>/x and <local path> (component)"
    )
    assert (
        _scrub("python -m qsweep plan_file=best_plan.yaml", Path("."))
        == "python -m qsweep plan_file=best_plan.yaml"
    )
    # a lone slash between words is no path (the identity table's "sampler / objective / seed")
    assert _scrub("nsga2 / multi / 0", None, command=False) == "nsga2 / multi / 0"


def test_a_seed_size_metric_study_draws_its_page(finished):
    """search.size_metric=seed: sizes are model_size_bytes (qsweep.score.size_key), not "seed_size_bytes"."""
    import optuna

    from qsweep.report_page import render_page

    _, results = finished
    study = optuna.load_study(study_name=results["study_name"], storage=results["storage"])
    page = Page(render_page(results, study.get_trials(), None, title="t", metric="seed",
                            baseline_bytes=results["baseline_size_bytes"]))  # fmt: skip
    rows = page.rows["candidates"][1:]
    assert sorted(int(r[2]) for r in rows) == sorted(
        c["search"]["model_size_bytes"] for c in results["candidates"]
    )


@pytest.mark.slow
def test_headless_chromium_draws_the_page_without_the_network(finished, tmp_path):
    """Debian's chromium, the network unreachable (every host unresolvable, no proxy): the screenshot is not blank."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("needs chromium (apt-get install chromium; .ci/run installs it)")
    out, _ = finished
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--window-size=1200,1800",
                    f"--screenshot={shot}", (out / "report.html").as_uri()], check=True, capture_output=True,
                   timeout=180)  # fmt: skip
    import matplotlib.image

    img = matplotlib.image.imread(shot)[..., :3]
    ink = (img.min(axis=-1) < 0.8).mean()  # share of pixels that are not white or near-white
    coloured = (img.max(axis=-1) - img.min(axis=-1) > 0.25).mean()  # the plan grids and the plot's markers
    assert 0.03 < ink < 0.9 and coloured > 0.01, (ink, coloured)
