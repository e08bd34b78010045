"""Hypervolume known answers, the reference search's bookkeeping, and the committed reference fronts' consistency."""

from __future__ import annotations

import itertools
import json
import math
import random
from types import SimpleNamespace

import pytest
import yaml
from conftest import CONF, model_cfg, tiny_config

from qsweep.bench.reference import load_reference, main, reference_path, token_fingerprint
from qsweep.bench.reference_search import ReferenceSearch
from qsweep.errors import ConfigError
from qsweep.model import meta_model, unit_table
from qsweep.plan import Plan
from qsweep.score import SIZE_METRICS
from qsweep.search.front import (
    REFERENCE_POINT,
    hypervolume,
    hypervolume_ratio,
    nondominated,
    ratio_point,
)
from qsweep.search.space import SearchSpace
from qsweep.size import model_size_bytes, packed_size_bytes

MENUS = ("lowbit", "seed")


def menu(name: str) -> list[dict]:
    return yaml.safe_load((CONF / "precision" / f"{name}.yaml").read_text())["menu"]


# ---- hypervolume ----
def test_hypervolume_known_answers():
    ref = (1.0, 1.5)
    assert hypervolume([], ref) == 0.0
    assert hypervolume([(0.5, 1.0)], ref) == pytest.approx(0.25)
    # staircase: [0.2, 0.5] x [1.2, 1.5] + [0.5, 1] x [1.0, 1.5]
    assert hypervolume([(0.2, 1.2), (0.5, 1.0)], ref) == pytest.approx(0.3 * 0.3 + 0.5 * 0.5)
    # a dominated point, a duplicate and points on or outside the box add nothing
    pts = [(0.2, 1.2), (0.5, 1.0), (0.6, 1.1), (0.5, 1.0), (1.0, 0.9), (0.1, 1.5), (0.05, math.inf)]
    assert hypervolume(pts, ref) == pytest.approx(0.34)
    assert hypervolume([(0.0, 0.0)], (2.0, 3.0)) == pytest.approx(6.0)
    assert REFERENCE_POINT == (0.5, 1.2)
    assert hypervolume([(0.25, 1.05)]) == pytest.approx(0.25 * 0.15)  # the default box
    assert ratio_point(500, 30.0, 1000, 20.0) == (0.5, 1.5)


def test_nondominated_indices_sorted_by_size_first_of_equals():
    pts = [(0.5, 1.0), (0.2, 1.2), (0.6, 1.1), (0.5, 1.0), (0.2, 1.3), (0.9, 0.95)]
    assert nondominated(pts) == [1, 0, 5]
    with pytest.raises(ValueError, match="NaN"):
        nondominated([(0.1, math.nan)])
    with pytest.raises(ValueError, match="two coordinates"):
        hypervolume([(0.1, 1.0, 2.0)])


def _grid_hypervolume(points, ref) -> float:
    """Brute force: the exact area on the grid of every coordinate, cell by cell (a cell is dominated when a point
    lies at or below its lower-left corner)."""
    pts = [(x, y) for x, y in points if x < ref[0] and y < ref[1]]
    xs = sorted({x for x, _ in pts} | {ref[0]})
    ys = sorted({y for _, y in pts} | {ref[1]})
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(itertools.pairwise(xs), itertools.pairwise(ys)):
        if any(x <= x0 and y <= y0 for x, y in pts):
            area += (x1 - x0) * (y1 - y0)
    return area


@pytest.mark.parametrize("seed", range(5))
def test_hypervolume_equals_brute_force_on_random_fronts(seed):
    rng = random.Random(seed)
    pts = [(rng.uniform(0.1, 1.2), rng.uniform(0.9, 1.8)) for _ in range(rng.randint(1, 40))]
    pts += pts[:3]  # duplicates
    for box in (REFERENCE_POINT, (1.0, 1.5)):
        assert hypervolume(pts, box) == pytest.approx(_grid_hypervolume(pts, box), abs=1e-12)
        # only the non-dominated points matter
        front = [pts[i] for i in nondominated(pts)]
        assert hypervolume(front, box) == pytest.approx(hypervolume(pts, box), abs=1e-12)


def test_hypervolume_ratio():
    ref_front, box = [(0.2, 1.1), (0.3, 1.0)], (1.0, 1.5)
    assert hypervolume_ratio(ref_front, ref_front, box) == pytest.approx(1.0)
    assert hypervolume_ratio([(0.3, 1.0)], ref_front, box) == pytest.approx(0.35 / (0.1 * 0.4 + 0.35))
    assert hypervolume_ratio([(0.3, 1.0)], ref_front) == pytest.approx(
        0.04 / (0.1 * 0.1 + 0.04)
    )  # (0.5, 1.2)
    assert hypervolume_ratio([], ref_front) == 0.0
    with pytest.raises(ValueError, match="no point inside"):
        hypervolume_ratio(ref_front, [(0.6, 1.0)])


# ---- the search, on a synthetic model (no evaluation: perplexity from a formula with interactions) ----
BITS = {"fp16": 0.0, "int8": 0.002, "int4": 0.03}


class FakeSession:
    """What ReferenceSearch uses of an EvalSession; log-perplexity adds per-unit costs plus a pairwise interaction."""

    def __init__(self):
        self.table = unit_table(meta_model(tiny_config("gpt2")), model_cfg("gpt2"))
        self.baseline_size_bytes = model_size_bytes(self.table, Plan.uniform(self.table, "fp16"))
        self.penalty = 10.0
        rng = random.Random(0)
        self.weight = {u: rng.uniform(0.5, 3.0) for u in self.table.names}

    def baseline_perplexity(self, split):
        return 20.0

    def evaluate(self, plan, split):
        costs = [self.weight[u] * BITS.get(plan[u], 0.0) for u in self.table.names]
        log_ppl = math.log(20.0) + sum(costs) + 2.0 * sum(costs) ** 2
        return SimpleNamespace(ok=True, perplexity=math.exp(log_ppl))


def test_search_finds_the_brute_force_best_and_counts_sizes_exactly():
    session = FakeSession()
    space = SearchSpace.from_menu(session.table, menu("seed"))
    search = ReferenceSearch(session, space, evals=150, seed=0)
    search.run()
    assert search.n == 150 and sum(search.phase_counts.values()) == 150
    assert [m.index for m in search.archive.values()] == list(range(1, 151))
    every = list(itertools.product(*search.choices))  # 3**6 = 729 plans
    for metric in SIZE_METRICS:
        brute = max(
            session.baseline_size_bytes / search.size(k, metric)
            - 10 * max(0.0, session.evaluate(search.plan(k), "v").perplexity / 20.0 - 1)
            for k in every
        )
        assert search.fitness(search.best(metric)[0], metric) == pytest.approx(brute, rel=1e-12)
    for m in search.archive.values():  # per-unit size bookkeeping equals the project's accounting
        plan = search.plan(m.key)
        assert list(plan.formats) == list(session.table.names)
        assert m.model_size_bytes == model_size_bytes(session.table, plan)
        assert m.packed_size_bytes == packed_size_bytes(session.table, plan)


# ---- the committed reference fronts ----
@pytest.fixture(scope="module")
def bundled_table():
    from transformers import AutoConfig

    from qsweep.config import _asset_dir

    return unit_table(meta_model(AutoConfig.from_pretrained(_asset_dir("tiny"))), model_cfg("gpt2"))


@pytest.mark.parametrize("name", MENUS)
def test_committed_reference_is_consistent(name, bundled_table):
    ref = load_reference(name)
    assert ref.menu == name and ref.model == "qsweep-tiny" and ref.split == "validation"
    assert ref.n_evaluations >= 1000
    assert ref.meta["command"].startswith(f"python -m qsweep.bench.reference --menu {name} ")
    space = SearchSpace.from_menu(bundled_table, menu(name))
    for (
        p
    ) in ref.plans:  # full plans of the bundled model, allowed by the menu, sizes as the project counts them
        assert list(p.plan.formats) == list(bundled_table.names)
        assert space.params_of(p.plan) is not None
        assert p.model_size_bytes == model_size_bytes(bundled_table, p.plan)
        assert p.packed_size_bytes == packed_size_bytes(bundled_table, p.plan)
        assert math.isfinite(p.perplexity) and 1 <= p.found_at <= ref.n_evaluations
    for metric in SIZE_METRICS:
        # the stored best equals the best recomputed from stored sizes and perplexities
        assert ref.best_fitness[metric] == pytest.approx(
            max(ref.fitness(p, metric) for p in ref.plans), abs=1e-12
        )
        assert ref.fitness(ref.best(metric), metric) == pytest.approx(ref.best_fitness[metric], abs=1e-12)
        # the front is non-dominated, sorted by size, and no stored plan dominates any of its points
        front = ref.front(metric)
        pts = [(p.size_bytes(metric), p.perplexity) for p in front]
        assert nondominated(pts) == list(range(len(pts)))
        every = [(p.size_bytes(metric), p.perplexity) for p in ref.plans]
        assert all(not (a <= x and b <= y and (a, b) != (x, y)) for x, y in pts for a, b in every)
        assert ref.meta["hypervolume"]["ref"] == list(REFERENCE_POINT)
        assert ref.hypervolume(metric) == pytest.approx(ref.meta["hypervolume"][metric], rel=1e-12)
        assert 0 < ref.hypervolume(metric) < (REFERENCE_POINT[0] - 0) * (REFERENCE_POINT[1] - 1)
        assert ref.best(metric).found_at == ref.meta["best"][metric]["found_at"]


def test_load_reference_unknown_menu():
    with pytest.raises(ConfigError, match=r"no reference front for menu 'open' .*available: lowbit, seed"):
        load_reference("open")
    assert reference_path("seed").name == "reference_tiny_seed.json"


def test_builder_cpu_run_writes_a_valid_file(tmp_path):
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus"  # a small local corpus: no stdlib corpus to build
    corpus.mkdir()
    (corpus / "validation.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:3]))
    out = tmp_path / "ref.json"
    argv = ["--menu", "seed", "--evals", "9", "--out", str(out), "--archive", str(tmp_path / "all.jsonl"),
            "eval.max_tokens=160", "eval.context=32", f"data.path={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert main(argv) == 0
    ref = load_reference("seed", out)
    assert ref.n_evaluations == 9 and ref.meta["command"].endswith(f"data.cache_dir={tmp_path / 'cache'}")
    assert ref.protocol["context"] == 32 and ref.protocol["n_tokens"] == 160
    assert len(ref.protocol["token_sha256"]) == 64
    lines = [json.loads(x) for x in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and sorted(x["found_at"] for x in lines) == list(range(1, 10))
    for metric in SIZE_METRICS:
        assert ref.best_fitness[metric] == pytest.approx(max(ref.fitness(p, metric) for p in ref.plans))
        best_all = max(ref.baseline_size_bytes / x[f"{'packed' if metric == 'packed' else 'model'}_size_bytes"]
                       - 10 * max(0.0, x["perplexity"] / ref.baseline_perplexity - 1) for x in lines)  # fmt: skip
        assert ref.best_fitness[metric] == pytest.approx(best_all)


def test_builder_cli_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "ref.json"
    assert main(["--menu", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "qsweep.bench.reference: error: unknown --menu 'nope'; valid: gguf, gguf_k, lowbit, open, seed (conf/precision/)"
    )
    assert main(["--menu", "seed", "--out", str(out), "eval.nope=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "qsweep.bench.reference: error: unknown config key 'eval.nope' (did you mean eval.name, "
    )
    assert not out.exists()


def test_token_fingerprint_is_of_the_ids():
    import torch

    a = torch.arange(10)
    assert token_fingerprint(a) == token_fingerprint(a.to(torch.int32).reshape(2, 5))
    assert token_fingerprint(a) != token_fingerprint(a.flip(0))
