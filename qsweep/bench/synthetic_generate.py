"""Seeded generator of synthetic allocation problems, and of problems made from a real sensitivity table.

Structure (what measured models show; ../shared/REFERENCE.md, the bundled model's README numbers):

* units: GPT-2's modules per block (``attn.c_attn [w, 3w]``, ``attn.c_proj [w, w]``, ``mlp.c_fc [w, 4w]``,
  ``mlp.c_proj [4w, w]``) and optionally the embeddings (``wte [vocab, w]``, ``wpe [ctx, w]``): 12 blocks at
  width 768 are GPT-2 small's 50 units; sizes are exact bytes of qsweep.formats (packed: codes + scales);
* one-unit degradation ``D[u, f] = scale * s_u * r_f * jitter``, non-decreasing along the menu (fewer bits never
  help), with ``s_u`` lognormal times: the first and last blocks more sensitive (``edge_boost``), embeddings
  sensitive (``sensitive_embeddings``: the bundled model's wte is by far its most sensitive unit) or not, a few
  outlier units (x5-20, GPT-2's outlier dimensions), and larger matrices somewhat more sensitive; ``r_f`` per
  format (INT8 nearly free, each bit below 4 several times dearer); ``scale`` puts the all-lowest-but-one plan
  (e.g. all INT4 on the seed's menu) at ``target`` summed one-unit log-perplexity change;
* interactions ``(i, j, c)``: ``n_interactions`` pairs, mostly neighbours (attention -> MLP of a block, the same
  module of consecutive blocks), some far apart, ``c`` uniform in ``strength`` x [0.5, 2];
* saturation: many degraded units hurt more than the sum of their parts (all-INT2 +934% vs +26% summed, measured);
* the proxy table: ``D`` times lognormal noise (``proxy_noise``), as a one-pass Taylor estimate ranks units well
  but not exactly.

Every random draw comes from ``numpy.random.default_rng(seed)``, so a spec and a seed give the same problem, and
:func:`write_sets` the same file bytes. :func:`from_sensitivity` makes a problem from a real table
(``sensitivity.json`` of a study, or ``SensitivityTable``) by adding interactions and saturation to its rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qsweep.bench.synthetic_optima import known_optimum
from qsweep.bench.synthetic_problem import Problem, ProblemError, save_problems
from qsweep.formats import get_format
from qsweep.search.sensitivity import SensitivityTable

__all__ = [
    "DEFAULT_SPECS",
    "MENUS",
    "SPLITS",
    "Spec",
    "from_sensitivity",
    "generate",
    "solved",
    "write_sets",
]

MENUS = {
    "seed": ("fp16", "int8", "int4"),
    "lowbit": ("fp16", "int8_channel", "int4_g128", "int3_g128", "int2_g32"),
}
# relative one-unit degradation per format (per-unit jitter on top): INT8 nearly free, each bit below 4 dearer
_RATIO = {"fp16": 0.0, "int8": 0.02, "int8_channel": 0.003, "int4": 1.0, "int4_g128": 1.0, "int3_g128": 5.0,
          "int2_g32": 30.0}  # fmt: skip
SPLITS = {"train": 0, "valid": 1000, "test": 2000}  # seed offsets: the same specs, other draws


@dataclass(frozen=True)
class Spec:
    """What to generate (module docstring)."""

    name: str
    n_layers: int = 12
    width: int = 768
    vocab: int = 50257
    context: int = 1024
    embeddings: bool = True
    menu: str = "seed"
    sensitive_embeddings: bool = True
    edge_boost: float = 2.0
    n_outliers: int = 2
    n_interactions: int = 0
    strength: float = 0.5
    saturation: float = 0.0
    target: float = 0.12  # sum over units of the one-unit log-perplexity change at INT4 (int4 / int4_g128)
    proxy_noise: float = 0.3
    proxy_cost_evals: float = 2.0
    base_perplexity: float = 30.0


DEFAULT_SPECS: tuple[Spec, ...] = (
    Spec("small-separable", n_layers=2, width=256, vocab=8192, context=256, saturation=1.0),
    Spec(
        "small-interacting", n_layers=2, width=256, vocab=8192, context=256, n_interactions=8, saturation=1.0
    ),
    Spec("gpt2-separable", saturation=1.0),
    Spec("gpt2-interacting", n_interactions=40, saturation=1.0),
    Spec(
        "gpt2-lowbit-interacting",
        menu="lowbit",
        n_interactions=40,
        saturation=2.0,
        target=0.03,
        sensitive_embeddings=False,
    ),
)


def _modules(spec: Spec) -> list[tuple[str, tuple[int, int], int, str, int]]:
    """(name, shape, channel dim, kind, block) of every unit; block -1 for the embeddings."""
    w = spec.width
    out = []
    if spec.embeddings:
        out += [("wte", (spec.vocab, w), 0, "wte", -1), ("wpe", (spec.context, w), 0, "wpe", -1)]
    for b in range(spec.n_layers):
        out += [(f"h.{b}.attn.c_attn", (w, 3 * w), 1, "qkv", b), (f"h.{b}.attn.c_proj", (w, w), 1, "attn_out", b),
                (f"h.{b}.mlp.c_fc", (w, 4 * w), 1, "fc", b), (f"h.{b}.mlp.c_proj", (4 * w, w), 1, "fc_out", b)]  # fmt: skip
    return out


_KIND = {"qkv": 1.0, "attn_out": 0.6, "fc": 1.2, "fc_out": 1.0}


def generate(spec: Spec, seed: int) -> Problem:
    """A problem from ``spec`` and ``seed`` (module docstring), without its optimum (see :func:`solved`)."""
    if spec.menu not in MENUS:
        raise ProblemError(f"unknown synthetic menu {spec.menu!r}; valid: {', '.join(MENUS)}")
    rng = np.random.default_rng(seed)
    formats = MENUS[spec.menu]
    mods = _modules(spec)
    U, F = len(mods), len(formats)
    fmts = [get_format(f) for f in formats]
    size = np.array([[f.packed_bytes(sh, cd) for f in fmts] for _, sh, cd, _, _ in mods], np.int64)
    model_size = np.array([[f.seed_bytes(math.prod(sh)) for f in fmts] for _, sh, _, _, _ in mods], np.int64)
    numel = np.array([math.prod(sh) for _, sh, _, _, _ in mods], float)
    s = rng.lognormal(0.0, 0.5, U) * np.sqrt(numel / numel.mean())
    L = max(1, spec.n_layers)
    for u, (_, _, _, kind, b) in enumerate(mods):
        if b >= 0:
            s[u] *= _KIND[kind] * (
                1 + spec.edge_boost * (math.exp(-b / 1.5) + 0.5 * math.exp(-(L - 1 - b) / 1.5))
            )
        else:
            s[u] *= (6.0 if kind == "wte" else 1.5) if spec.sensitive_embeddings else 0.3
    if spec.n_outliers:
        s[rng.choice(U, size=min(U, spec.n_outliers), replace=False)] *= rng.uniform(
            5, 20, min(U, spec.n_outliers)
        )
    ratio = np.array([_RATIO[f] for f in formats])
    D = s[:, None] * ratio[None, :] * rng.lognormal(0.0, 0.2, (U, F))
    D[:, 0] = 0.0
    D = np.maximum.accumulate(D, axis=1)  # fewer bits never help
    ref = formats.index("int4" if "int4" in formats else "int4_g128")
    D *= spec.target / D[:, ref].sum()
    proxy = D * rng.lognormal(0.0, spec.proxy_noise, (U, F))
    pairs = _interactions(rng, mods, spec)
    return Problem(name=spec.name, units=tuple(m[0] for m in mods), formats=formats, size=size,
                   model_size=model_size, delta=_r(D), proxy=_r(proxy), interactions=pairs,
                   saturation=spec.saturation, base_perplexity=spec.base_perplexity, penalty=10.0,
                   proxy_cost_evals=spec.proxy_cost_evals, info={"spec": asdict(spec), "seed": seed})  # fmt: skip


def _r(a: np.ndarray) -> np.ndarray:
    """Rounded to 9 significant digits: short, exact JSON that reads back to the same floats."""
    return np.array([[float(f"{v:.9g}") for v in row] for row in a])


def _interactions(rng: np.random.Generator, mods, spec: Spec) -> tuple[tuple[int, int, float], ...]:
    if not spec.n_interactions:
        return ()
    U = len(mods)
    block = {m[0]: m[4] for m in mods}
    near = [(i, j) for i in range(U) for j in range(U) if i != j and block[mods[i][0]] >= 0
            and (block[mods[j][0]] == block[mods[i][0]] or (block[mods[j][0]] == block[mods[i][0]] + 1
                                                            and mods[j][3] == mods[i][3]))]  # fmt: skip
    pairs: dict[tuple[int, int], float] = {}
    while len(pairs) < min(spec.n_interactions, U * (U - 1)):
        if near and rng.random() < 0.7:
            i, j = near[int(rng.integers(len(near)))]
        else:
            i, j = (int(v) for v in rng.choice(U, 2, replace=False))
        pairs.setdefault((i, j), float(f"{spec.strength * rng.uniform(0.5, 2.0):.6g}"))
    return tuple((i, j, c) for (i, j), c in pairs.items())


def solved(p: Problem, seed: int = 0) -> Problem:
    """``p`` with its known optimum (brute force, exact DP or a reference run: qsweep.bench.synthetic_optima);
    a problem that is not exactly solved also carries its reference front (the points inside the HV box)."""
    opt = known_optimum(p, seed)
    out = {"fitness": float(f"{opt.fitness:.12g}"), "plan": p.plan(opt.plan).formats, "how": opt.how,
           "evaluations": opt.evaluations}  # fmt: skip
    front: tuple = ()
    if opt.how.startswith("reference"):
        pts = p.ratio_points(opt.front.size, opt.front.delta)
        front = tuple((float(f"{x:.9g}"), float(f"{y:.9g}")) for x, y in pts if x < 0.5 and y < 1.2)
    return p.with_(optimum=out, reference_front=front)


def from_sensitivity(
    table: SensitivityTable,
    seed: int,
    *,
    name: str = "from-sensitivity",
    n_interactions: int | None = None,
    strength: float = 1.0,
    saturation: float = 1.0,
    proxy_noise: float = 0.0,
) -> Problem:
    """A problem with a real table's units, formats, sizes and one-unit changes, plus interactions and saturation.

    Units with one format (LayerNorms fixed in fp32, say) are left out: they are the same in every plan. The
    base format of every unit must be its first (the table's base plan); rows the table measured as failed
    (``inf``) or negative (noise below the base) are clipped to the largest finite / zero. ``D`` is chosen so
    that a one-unit change scores exactly the table's value: ``g(D) = table delta``, i.e. the inverse of the
    saturation. ``n_interactions`` defaults to the number of units.
    """
    rng = np.random.default_rng(seed)
    choices = {u: c for u, c in table.choices().items() if len(c) > 1}
    if not choices:
        raise ProblemError("the sensitivity table has no unit with more than one format")
    formats = next(iter(choices.values()))
    bad = next((u for u, c in choices.items() if c != formats or table.base_plan[u] != formats[0]), None)
    if bad is not None:
        raise ProblemError(f"sensitivity table: unit {bad!r} has formats {choices[bad]} (base "
                           f"{table.base_plan[bad]!r}); a problem needs one menu, base format first: {formats}")  # fmt: skip
    units = tuple(choices)
    raw = np.array([[table.delta(u, f) for f in formats] for u in units])
    finite = raw[np.isfinite(raw)]
    raw = np.where(np.isfinite(raw), raw, finite.max() if finite.size else 1.0)
    raw = np.maximum(raw, 0.0)
    raw[:, 0] = 0.0
    # g(D) = raw with g(t) = t + k t^2  ->  D = (sqrt(1 + 4 k raw) - 1) / (2 k)
    D = raw if saturation == 0 else (np.sqrt(1 + 4 * saturation * raw) - 1) / (2 * saturation)
    sizes = table.unit_sizes("packed")
    model = table.unit_sizes("seed")
    mods = [(u, (0, 0), 0, "", i) for i, u in enumerate(units)]  # neighbours: consecutive units
    spec = Spec(
        name, n_interactions=len(units) if n_interactions is None else n_interactions, strength=strength
    )
    pairs = _interactions(rng, [(u, s, c, "x", b) for u, s, c, _, b in mods], spec)
    proxy = D * rng.lognormal(0.0, proxy_noise, D.shape) if proxy_noise else raw
    return Problem(name=name, units=units, formats=formats,
                   size=np.array([[sizes[u][f] for f in formats] for u in units], np.int64),
                   model_size=np.array([[model[u][f] for f in formats] for u in units], np.int64),
                   delta=_r(D), proxy=_r(proxy), interactions=pairs, saturation=saturation,
                   base_perplexity=float(table.base_perplexity or 30.0), penalty=10.0,
                   proxy_cost_evals=float(table.cost_evals),
                   info={"source": f"{table.kind} sensitivity table ({table.split}, {table.n_tokens} tokens)",
                         "seed": seed})  # fmt: skip


def write_sets(
    out_dir: str | Path,
    specs: Sequence[Spec] = DEFAULT_SPECS,
    seed: int = 0,
    splits: Sequence[str] = tuple(SPLITS),
) -> list[Path]:
    """``synthetic_<split>.json`` per split: every spec generated with seed ``seed + offset + k`` and solved."""
    out = []
    for split in splits:
        problems = [solved(generate(s, seed + SPLITS[split] + k), seed) for k, s in enumerate(specs)]
        out.append(save_problems(problems, Path(out_dir) / f"synthetic_{split}.json", split))
    return out
