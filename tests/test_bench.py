"""Smoke tests of the benchmarks whose tables the README quotes, at a tiny budget: each prints its table with the
README's columns and sane numbers (``python -m qsweep.bench.synthetic``: tests/test_synthetic.py;
``qsweep.bench.reference``: tests/test_bench_reference.py)."""

from __future__ import annotations

import math

import pytest


def table_rows(out: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The columns and rows of the Markdown table whose header line starts with ``header_start``."""
    lines = out.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(header_start))
    cols = [c.strip() for c in lines[i].strip("|").split("|")]
    assert set(lines[i + 1].replace("|", "").split()) == {"---"}
    rows = []
    for ln in lines[i + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
        assert len(rows[-1]) == len(cols), ln
    return cols, rows


@pytest.mark.slow  # GPT-2 small built and quantized three ways on the CPU: about 30 s on 2 cores
def test_bench_evaluate_prints_the_performance_tables(capsys):
    """README "Performance": ``python -m qsweep.bench.evaluate --device cpu --tokens N --batch-size 1 --compile no
    --repeats 1`` (random-init GPT-2 small), here on 512 tokens in windows of 128."""
    from qsweep.bench.evaluate import main

    tokens = 512
    main(["--device", "cpu", "--tokens", str(tokens), "--context", "128", "--batch-size", "2", "--dtypes", "fp32",
          "--compile", "no", "--repeats", "1"])  # fmt: skip
    out = capsys.readouterr().out
    cols, rows = table_rows(out, "| method |")
    assert cols == ["method", "dtype", "compile", "seconds / evaluation", "tokens / s", "perplexity"]
    assert [r[:3] for r in rows] == [
        ["seed loop (1 window at a time, HF loss)", "fp32", "no"],
        ["qsweep Evaluator", "fp32", "no"],
    ]
    ppl = [float(r[5]) for r in rows]
    for r in rows:
        sec, rate = float(r[3]), float(r[4].replace(",", ""))
        assert sec > 0 and rate == pytest.approx(tokens / sec, rel=0.01, abs=1)
    # random init: a near-uniform model over GPT-2's 50,257 tokens; the two evaluators agree (README: 1e-8)
    assert 1e4 < ppl[0] < 2e5 and ppl[1] == pytest.approx(ppl[0], rel=1e-6)
    cols, rows = table_rows(out, "| plan switch |")
    assert cols == ["plan switch", "milliseconds"]
    assert [r[0] for r in rows] == [
        "first apply (quantize + cache): champion",
        "first apply: int8",
        "first apply: int4_g128",
        "cached switch (best of 10, weights of most units change)",
    ]
    assert all(float(r[1]) > 0 for r in rows)


@pytest.mark.slow  # two measured tables of 53 evaluations and four proxies: about 20 s on 2 cores
def test_bench_sensitivity_prints_cost_and_rank_correlation(capsys, bundled_cache):
    """README "Searching" (warm start): ``python -m qsweep.bench.sensitivity`` on the bundled model, here on 512
    validation tokens and the seed's menu."""
    from qsweep.bench.sensitivity import main

    main(["eval.device=cpu", "eval.max_tokens=512", "precision=seed", f"data.cache_dir={bundled_cache}",
          "--batches", "1"])  # fmt: skip
    out = capsys.readouterr().out
    cols, rows = table_rows(out, "| table |")
    assert cols == ["table", "seconds", "full evals", "block forwards", "note"]
    assert [r[0] for r in rows] == ["measured, uncached", "measured, cached prefix"]
    uncached, cached = rows
    assert (
        uncached[4] == cached[4] == "53 evaluations"
    )  # the base plan, 26 searchable units x 2 other formats
    assert int(cached[3]) < int(uncached[3])  # the cached prefix skips the blocks before the changed unit
    diff = float(out.split("largest |delta| difference cached vs uncached: ")[1].split()[0])
    assert diff < 1e-9  # the cached prefix is exact
    cols, rows = table_rows(out, "| proxy |")
    assert cols[:5] == ["proxy", "batches", "seconds", "full evals", "Spearman vs measured"]
    assert [r[0] for r in rows] == ["rademacher", "batch"]  # 512 tokens: one batch, the proxy over all of it
    for r in rows:
        assert float(r[3]) > 0 and 0.5 < float(r[4]) <= 1.0  # the one-pass proxy ranks like the measurement


@pytest.mark.slow  # three studies of 30 evaluations: about 40 s on 2 cores
def test_bench_search_prints_the_methods_table(capsys, bundled_cache):
    """README "Results": ``python -m qsweep.bench.search --budgets ... --seeds ...``, here one budget of 30
    evaluations (the timed proxy pass costs a few of them, more on a loaded machine), one seed, three methods, on
    1,024 tokens of each split (no reference columns: the reference was measured on the whole split)."""
    from qsweep.bench.search import main

    methods = ["random", "allocator", "nsga2_warm"]
    assert main(["--budgets", "30", "--seeds", "0", "--methods", ",".join(methods), "--device", "cpu",
                 "eval.max_tokens=1024", f"data.cache_dir={bundled_cache}"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "no reference columns" in out
    cols, rows = table_rows(out, "| budget |")
    assert cols == ["budget", "method", "val fitness (median [min, max])", "% of ref",
                    "test fitness (median seed's 95% CI)", "HV ratio", "evals to 99% / 100% of ref",
                    "best is uniform"]  # fmt: skip
    assert [r[:2] for r in rows] == [["30", m] for m in methods], out
    for r in rows:
        fitness, lo_hi = r[2].split(" [")
        lo, hi = (float(x) for x in lo_hi.rstrip("]").split(", "))
        assert 1.0 < lo == float(fitness) == hi < 8  # one seed: min = median = max; compression at most 8x
        test, ci = r[4].split(" (")
        ci_lo, ci_hi = (float(x) for x in ci.rstrip(")").split(", "))
        assert ci_lo <= float(test) <= ci_hi
        assert math.isnan(float(r[3])) and r[5] == "-" and r[6] == "- / -"  # no reference
        assert r[7] in ("0/1", "1/1")


@pytest.mark.slow  # builds a toy model, then a fresh `python -m qsweep` evaluation and a 6-trial search: about 60 s
def test_bench_scale_prints_time_and_memory_per_shape(capsys, tmp_path, monkeypatch):
    """README "Real-size models": ``python -m qsweep.bench.scale --shapes ...``, here the two-layer toy of the same
    architecture on the CPU with a 6-trial search on 1,024 tokens."""
    import json

    from qsweep.bench.scale import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    main(["--shapes", "llama-toy", "--device", "cpu", "--trials", "6", "--max-tokens", "1024", "--context", "128",
          "--dir", str(tmp_path), "--json", str(tmp_path / "rows.json")])  # fmt: skip
    cols, rows = table_rows(capsys.readouterr().out, "| shape |")
    assert cols == ["shape", "params", "checkpoint GiB", "load s", "eval s", "sensitivity s", "trials", "s / trial",
                    "peak GPU GiB eval / search", "peak RSS GiB eval / search", "bounds"]  # fmt: skip
    (row,) = rows
    assert row[0] == "llama-toy" and row[8] == "- / -"  # no GPU here
    assert float(row[4]) > 0 and float(row[5]) > 0 and int(row[6]) >= 1 and float(row[7]) > 0
    rss_eval, rss_search = (float(x) for x in row[9].split(" / "))
    assert 0.1 < rss_eval <= rss_search < 4
    (saved,) = json.loads((tmp_path / "rows.json").read_text())
    ckpt = sum(f.stat().st_size for f in (tmp_path / "models" / "llama-toy").glob("*.safetensors"))
    assert saved["checkpoint_bytes"] == ckpt and saved["search"]["resources"]["dtype"] == "fp32"
    assert (
        int(row[6]) == saved["search"]["n_trials_done"] and saved["search"]["evaluations_spent"] <= 6
    )  # the budget
    assert "RSS <= ckpt+2GiB" in row[10]


@pytest.mark.slow  # a 0.25 GiB model: a fresh evaluation and a 10-trial search on 2 cores, about 6 minutes
def test_a_smollm2_shape_searches_on_the_cpu_within_its_checkpoint_plus_2_gib(capsys, tmp_path, monkeypatch):
    """Issue 18's CPU bound, the README's command: ``python -m qsweep.bench.scale --shapes smollm2-135m --trials 10
    --device cpu --max-tokens 4096 --context 512``. The search's peak RSS (its own process: VmHWM) stays within the
    checkpoint's bytes + 2 GiB (it was 13.1 GiB before issue 18, 4.85 GiB before the host-memory work)."""
    import json

    from qsweep.bench.scale import GIB, main

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    main(["--shapes", "smollm2-135m", "--device", "cpu", "--trials", "10", "--max-tokens", "4096", "--context", "512",
          "--dir", str(tmp_path), "--json", str(tmp_path / "rows.json")])  # fmt: skip
    (saved,) = json.loads((tmp_path / "rows.json").read_text())
    search = saved["search"]
    assert "failed" not in search, search
    peak, ckpt = search["resources"]["peak_host_rss_bytes"], saved["checkpoint_bytes"]
    assert 0.2 * GIB < ckpt < 0.3 * GIB and search["resources"]["dtype"] == "fp32"
    assert ckpt < peak <= ckpt + 2 * GIB, f"peak RSS {peak / GIB:.2f} GiB"
    assert (
        search["resources"]["quantizations"] > 0 and saved["eval"]["resources"]["peak_host_rss_bytes"] <= peak
    )


def test_every_benchmark_the_readme_quotes_has_a_smoke_test():
    """Each ``python -m qsweep.bench.NAME`` the README names is run, through its ``main``, by a test."""
    import re

    from conftest import ROOT

    named = set(re.findall(r"python\s+-m\s+qsweep\.bench\.(\w+)", (ROOT / "README.md").read_text()))
    assert {"search", "evaluate", "synthetic", "reference"} <= named
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for name in sorted(named):
        direct = re.search(rf"from qsweep\.bench\.{name} import [^\n]*\bmain\b", tests)
        alias = re.search(rf"from qsweep\.bench import {name} as (\w+)", tests)
        assert direct or (alias and f"{alias.group(1)}.main(" in tests), (
            f"no test runs qsweep.bench.{name}.main"
        )


def test_the_reference_held_out_line_scores_the_references_best_validation_plans_on_test():
    """``bench.search`` checks the committed reference on the test split: its best validation plan and its 20 best
    (README "Results": the reference's best validation fitness does not hold on test). A stand-in session scores a
    plan on test by its number of 3-bit units, so every number is known."""
    import statistics

    from qsweep.bench.reference import load_reference
    from qsweep.bench.search import METRIC, _reference_held_out

    class Score:
        penalty = 10.0

        def __init__(self, plan):
            self.value = 3.0 + 0.01 * sum(f.startswith("int3") for f in plan.formats.values())
            self.degradation_ci95 = (0.01, 0.03)

        def fitness(self, metric):
            return self.value

        def compression(self, metric):
            return 4.0

    class Session:
        def score(self, plan, split):
            assert split == "test"
            return Score(plan)

    ref = load_reference("lowbit")
    out = _reference_held_out(ref, Session(), n_top=20)
    top = sorted(ref.plans, key=lambda p: -ref.fitness(p, METRIC))[:20]
    assert out["n_top"] == 20 and out["top_val"][1] == pytest.approx(ref.best_fitness[METRIC])
    assert out["top_val"][0] == pytest.approx(ref.fitness(top[-1], METRIC))
    assert out["best_test"] == Score(ref.best(METRIC).plan).value
    assert out["best_test_ci95"] == pytest.approx(
        (4.0 - 10 * 0.03, 4.0 - 10 * 0.01)
    )  # fitness at the interval's ends
    assert out["top_test_median"] == pytest.approx(statistics.median(Score(p.plan).value for p in top))
    assert out["top_test_max"] == max(Score(p.plan).value for p in top)


@pytest.mark.extras  # gguf-py and llama-cpp-python, below
def test_bench_kld_puts_llama_cpps_kl_beside_qsweeps(capsys):
    """README "Export": ``python -m qsweep.bench.kld``, one plan on 1,024 tokens: llama.cpp's KL from the GGUF files'
    logits agrees with qsweep's simulated one (q4_0: the weights' error dominates llama.cpp's 8-bit activations)."""
    from qsweep.export.runtime import llama_cpp_missing

    if llama_cpp_missing():
        pytest.skip(llama_cpp_missing())
    pytest.importorskip("gguf", reason="needs gguf-py (the export extra)")
    from qsweep.bench.kld import main

    assert main(["--plans", "q4_0", "--threads", "1", "eval.max_tokens=1024"]) == 0
    _, rows = table_rows(capsys.readouterr().out, "| plan |")
    assert [r[0] for r in rows] == ["q4_0"]
    (ratio, ratio_rt), (ours, theirs), _, (top1, top1_rt) = (
        [float(x.strip().rstrip("%")) for x in r.split("/")] for r in rows[0][2:]
    )
    assert ratio > 1 and abs(ratio - ratio_rt) < 2e-3
    assert ours > 0 and abs(theirs / ours - 1) < 0.1 and abs(top1 - top1_rt) < 2
