"""Reference fronts for the bundled model: the best plans a long measured search finds, committed as data.

Search methods are judged against these (issue 10's benchmark): the best validation fitness of each size metric and
the non-dominated (size, perplexity) set, under both accountings, for the ``lowbit`` and ``seed`` menus. They were
built once by :class:`qsweep.bench.reference_search.ReferenceSearch` (greedy descent, local search with one- and
two-unit moves, random perturbations; thousands of real evaluations) on one H100, with (as recorded in each file's
``command``, the output written to the device's $OUT and copied here)::

    python -m qsweep.bench.reference --menu lowbit --evals 12000 --seconds 290 \
        --out qsweep/bench/data/reference_tiny_lowbit.json data.path=.carry/corpus eval.batch_size=128
    python -m qsweep.bench.reference --menu seed --evals 6000 --seconds 170 \
        --out qsweep/bench/data/reference_tiny_seed.json data.path=.carry/corpus eval.batch_size=128

Any trailing ``key=value`` is a Hydra override of the config, which defaults to model=tiny data=tiny eval=standard
(``--help`` lists the options). The time limit shrinks every phase in proportion, so a rebuild on another machine
measures a different number of plans; the best plans were found long before the end (``best.*.found_at``).

The bundled corpus is built from the running Python's standard library, and the GPU machine runs Python 3.12, so
the validation text was the one Python 3.11.7 builds here (the Python the bundled model card and the tests use),
written out first and passed as ``data.path``::

    python -c "import pathlib; from qsweep.corpus import bundled_split_text as t; d = pathlib.Path('.carry/corpus'); \
        d.mkdir(parents=True, exist_ok=True); [(d / f'{s}.txt').write_text(t(s), encoding='utf-8') for s in ('validation', 'test')]"

Each file records the command, the date, torch, Python and the device, the evaluation protocol and a SHA-256 of the
evaluated token ids; a benchmark must check :func:`token_fingerprint` of its own tokens against
``protocol["token_sha256"]`` before comparing numbers (``eval.batch_size`` changes perplexities only by float
rounding, about 1e-6 relative).

Stored (compactly): every plan on the non-dominated set of either size metric, plus the top plans by each
fitness, each with its validation perplexity and both sizes; plans as ``{unit: format}`` over the searchable
units, with the units every plan shares (LayerNorms) stored once under ``fixed_units``. :func:`load_reference`
returns a :class:`ReferenceFront`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qsweep.errors import ConfigError, one_line_errors
from qsweep.metrics import fitness
from qsweep.plan import Plan
from qsweep.score import SIZE_METRICS
from qsweep.search.front import REFERENCE_POINT, hypervolume, ratio_point

__all__ = [
    "DATA_DIR",
    "ReferenceFront",
    "ReferencePlan",
    "build_reference",
    "load_reference",
    "reference_path",
    "session_token_fingerprint",
    "token_fingerprint",
    "write_reference",
]

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
FILE_FORMAT = "qsweep-reference-front"
VERSION = 1
DEFAULTS = ("model=tiny", "data=tiny", "eval=standard")


def reference_path(menu: str) -> Path:
    """The committed reference file of the bundled model for ``menu``."""
    return DATA_DIR / f"reference_tiny_{menu}.json"


def _check_metric(metric: str) -> str:
    if metric not in SIZE_METRICS:
        raise ConfigError(f"unknown size metric {metric!r}; valid: {', '.join(SIZE_METRICS)}")
    return metric


@dataclass(frozen=True)
class ReferencePlan:
    """A stored plan with its validation perplexity, both sizes, and when (evaluation number) it was measured."""

    plan: Plan
    perplexity: float
    model_size_bytes: int
    packed_size_bytes: int
    found_at: int
    phase: str

    def size_bytes(self, metric: str) -> int:
        return self.packed_size_bytes if _check_metric(metric) == "packed" else self.model_size_bytes


@dataclass(frozen=True)
class ReferenceFront:
    """A reference search's result for one model and menu (module docstring); fitness as :mod:`qsweep.metrics`."""

    menu: str
    model: str
    split: str
    penalty: float
    baseline_perplexity: float
    baseline_size_bytes: int
    n_evaluations: int
    plans: tuple[ReferencePlan, ...]
    front_ids: Mapping[str, tuple[int, ...]]
    top_ids: Mapping[str, tuple[int, ...]]
    best_fitness: Mapping[str, float]
    protocol: Mapping = field(default_factory=dict)
    meta: Mapping = field(default_factory=dict)

    def fitness(self, p: ReferencePlan, metric: str) -> float:
        deg = p.perplexity / self.baseline_perplexity - 1
        return fitness(self.baseline_size_bytes / p.size_bytes(metric), deg, self.penalty)

    def point(self, p: ReferencePlan, metric: str) -> tuple[float, float]:
        """``(size ratio, perplexity ratio)`` of ``p`` (:mod:`qsweep.search.front`)."""
        return ratio_point(
            p.size_bytes(metric), p.perplexity, self.baseline_size_bytes, self.baseline_perplexity
        )

    def front(self, metric: str) -> list[ReferencePlan]:
        """The non-dominated plans under ``metric``'s size, smallest first."""
        return [self.plans[i] for i in self.front_ids[_check_metric(metric)]]

    def points(self, metric: str) -> list[tuple[float, float]]:
        return [self.point(p, metric) for p in self.front(metric)]

    def best(self, metric: str) -> ReferencePlan:
        """The stored plan of best ``metric`` fitness (earliest found on ties)."""
        return max(self.plans, key=lambda p: (self.fitness(p, metric), -p.found_at))

    def hypervolume(self, metric: str, ref: Sequence[float] = REFERENCE_POINT) -> float:
        return hypervolume(self.points(metric), ref)


def token_fingerprint(ids: torch.Tensor) -> str:
    """SHA-256 of a 1-D tensor of token ids (as int64): identifies the exact tokens a front was measured on."""
    return hashlib.sha256(ids.reshape(-1).to(torch.int64).cpu().numpy().tobytes()).hexdigest()


def session_token_fingerprint(session, split: str) -> str:
    """:func:`token_fingerprint` of the tokens ``session`` evaluates on ``split``: compare with a reference's
    ``protocol["token_sha256"]`` before comparing numbers."""
    return token_fingerprint(_session_ids(session, split))


def _session_ids(session, split: str) -> torch.Tensor:
    """The token ids ``session`` evaluates on ``split`` (as :meth:`qsweep.session.EvalSession.evaluator` cuts them)."""
    from qsweep.data import load_token_ids

    ids = load_token_ids(session.data_cfg, split, session.tokenizer)
    max_tokens = session.eval_cfg.get("max_tokens")
    return ids if max_tokens is None else ids[: int(max_tokens)]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def build_reference(session, menu: Sequence[Mapping], menu_name: str, *, evals: int, seconds: float | None = None,
                    seed: int = 0, split: str = "validation", top: int = 20, command: str = "",
                    archive: str | Path | None = None) -> dict:  # fmt: skip
    """Run the reference search on ``session`` and return the document that :func:`write_reference` saves."""
    from qsweep.bench.reference_search import ReferenceSearch
    from qsweep.search.space import SearchSpace

    space = SearchSpace.from_menu(session.table, menu)
    search = ReferenceSearch(session, space, split=split, evals=evals, seconds=seconds, seed=seed)
    search.run()
    if archive:
        with open(archive, "w") as f:
            for m in search.archive.values():
                f.write(json.dumps({"units": list(m.key), "perplexity": m.perplexity, "model_size_bytes":
                                    m.model_size_bytes, "packed_size_bytes": m.packed_size_bytes, "found_at":
                                    m.index, "phase": m.phase}) + "\n")  # fmt: skip
    fronts = {metric: search.front(metric) for metric in SIZE_METRICS}
    tops = {metric: search.best(metric, top) for metric in SIZE_METRICS}
    keep = list(dict.fromkeys(m.key for ms in (*fronts.values(), *tops.values()) for m in ms))
    keep.sort(key=lambda k: search.archive[k].index)
    index = {k: i for i, k in enumerate(keep)}
    best = {metric: search.best(metric)[0] for metric in SIZE_METRICS}
    e = session.eval_cfg
    ids = _session_ids(session, split)
    evaluator = session.evaluator(split)
    base = {
        "plan": session.cfg["baseline"]["plan"],
        "perplexity": search.base_ppl,
        "size_bytes": search.base_size,
    }
    doc = {
        "format": FILE_FORMAT,
        "version": VERSION,
        "command": command,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": _device_name(session.device),
        "seconds": round(search.elapsed(), 1),
        "model": session.model_cfg.get("name"),
        "menu": menu_name,
        "menu_entries": list(menu),
        "split": split,
        "protocol": {
            "context": session.context,
            "stride": e.get("stride") or session.context,
            "max_tokens": e.get("max_tokens"),
            "dtype": e.get("dtype", "fp32"),
            "batch_size": int(e.get("batch_size", 8)),
            "scored_tokens": evaluator.n_tokens,
            "n_tokens": int(ids.numel()),
            "token_sha256": token_fingerprint(ids),
            "data": session.data_cfg.get("name"),
            "data_path": session.data_cfg.get("path"),
        },
        "baseline": base,
        "penalty": search.penalty,
        "evaluations": {
            "total": search.n,
            "by_phase": dict(search.phase_counts),
            "seed": seed,
            "budget": evals,
            "time_limit_s": seconds,
        },
        "best": {
            metric: {"fitness": search.fitness(m, metric), "plan": index[m.key], "found_at": m.index}
            for metric, m in best.items()
        },
        "hypervolume": {"ref": list(REFERENCE_POINT)}
        | {
            metric: hypervolume(
                [
                    ratio_point(m.size_bytes(metric), m.perplexity, search.base_size, search.base_ppl)
                    for m in fronts[metric]
                ]
            )
            for metric in SIZE_METRICS
        },
        "units": list(search.table_order),
        "fixed_units": search.fixed,
        "front": {metric: [index[m.key] for m in ms] for metric, ms in fronts.items()},
        "top": {metric: [index[m.key] for m in ms] for metric, ms in tops.items()},
        "plans": [
            {
                "units": dict(zip(search.units, k, strict=True)),
                "perplexity": search.archive[k].perplexity,
                "model_size_bytes": search.archive[k].model_size_bytes,
                "packed_size_bytes": search.archive[k].packed_size_bytes,
                "found_at": search.archive[k].index,
                "phase": search.archive[k].phase,
            }
            for k in keep
        ],
    }
    return doc


def write_reference(doc: Mapping, path: str | Path) -> Path:
    """Write ``doc`` as JSON with one line per top-level entry and per plan (small, diff-friendly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != "plans"]
    plans = ",\n".join(f"    {json.dumps(p)}" for p in doc["plans"])
    path.write_text("{\n" + ",\n".join(items) + ',\n  "plans": [\n' + plans + "\n  ]\n}\n")
    return path


def load_reference(menu: str, path: str | Path | None = None) -> ReferenceFront:
    """The reference front for ``menu`` (a committed file of the bundled model, or ``path``)."""
    path = Path(path) if path is not None else reference_path(menu)
    if not path.is_file():
        have = sorted(p.stem.removeprefix("reference_tiny_") for p in DATA_DIR.glob("reference_tiny_*.json"))
        raise ConfigError(
            f"no reference front for menu {menu!r} ({path}); available: {', '.join(have) or 'none'}"
        )
    doc = json.loads(path.read_text())
    if doc.get("format") != FILE_FORMAT or doc.get("version") != VERSION:
        raise ConfigError(f"{path} is not a {FILE_FORMAT} file of version {VERSION}")
    order, fixed = doc["units"], doc["fixed_units"]
    plans = tuple(
        ReferencePlan(
            plan=Plan({u: (p["units"] | fixed)[u] for u in order}),
            perplexity=float(p["perplexity"]),
            model_size_bytes=int(p["model_size_bytes"]),
            packed_size_bytes=int(p["packed_size_bytes"]),
            found_at=int(p["found_at"]),
            phase=p["phase"],
        )
        for p in doc["plans"]
    )
    keep = (
        "command",
        "created",
        "python",
        "torch",
        "device",
        "seconds",
        "evaluations",
        "hypervolume",
        "best",
    )
    return ReferenceFront(
        menu=doc["menu"],
        model=doc["model"],
        split=doc["split"],
        penalty=float(doc["penalty"]),
        baseline_perplexity=float(doc["baseline"]["perplexity"]),
        baseline_size_bytes=int(doc["baseline"]["size_bytes"]),
        n_evaluations=int(doc["evaluations"]["total"]),
        plans=plans,
        front_ids={m: tuple(doc["front"][m]) for m in SIZE_METRICS},
        top_ids={m: tuple(doc["top"][m]) for m in SIZE_METRICS},
        best_fitness={m: float(doc["best"][m]["fitness"]) for m in SIZE_METRICS},
        protocol=doc["protocol"],
        meta={k: doc[k] for k in keep},
    )


@one_line_errors("qsweep.bench.reference")
def main(argv: Sequence[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from qsweep.config import compose_config
    from qsweep.paths import config_dir
    from qsweep.session import EvalSession

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m qsweep.bench.reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--menu", required=True, help="precision menu (conf/precision/NAME.yaml): lowbit or seed")
    ap.add_argument("--evals", type=int, default=3000, help="plans to measure (the budget)")
    ap.add_argument("--seconds", type=float, default=None, help="time limit; phases shrink in proportion")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random phase")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--top", type=int, default=20, help="plans stored per fitness besides the fronts")
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--archive", default=None, help="also write every measured plan here (JSON lines)")
    ap.add_argument(
        "overrides", nargs="*", help="Hydra overrides (key=value) after the defaults " + " ".join(DEFAULTS)
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    start = time.perf_counter()
    menus = sorted(f.stem for f in (config_dir() / "precision").glob("*.yaml"))
    if args.menu not in menus:
        raise ConfigError(f"unknown --menu {args.menu!r}; valid: {', '.join(menus)} (conf/precision/)")
    cfg = compose_config([*DEFAULTS, f"precision={args.menu}", *args.overrides])
    session = EvalSession(cfg)
    menu = OmegaConf.to_container(cfg.precision.menu, resolve=True)
    command = shlex.join(["python", "-m", "qsweep.bench.reference", *argv])
    doc = build_reference(session, menu, args.menu, evals=args.evals, seconds=args.seconds, seed=args.seed,
                          split=args.split, top=args.top, command=command, archive=args.archive)  # fmt: skip
    write_reference(doc, args.out)
    b = doc["best"]
    print(f"{args.menu}: {doc['evaluations']['total']} evaluations in {time.perf_counter() - start:.0f} s on "
          f"{doc['device']}; best fitness packed {b['packed']['fitness']:.4f} (evaluation {b['packed']['found_at']}), "
          f"seed {b['seed']['fitness']:.4f} (evaluation {b['seed']['found_at']}); {len(doc['plans'])} plans stored "
          f"in {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
