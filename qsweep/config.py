"""Config schemas (dataclasses registered in Hydra's ConfigStore): typed fields, unknown keys are errors.

conf/config.yaml lists ``qsweep_schema`` first in its defaults, so every group file (conf/model/*.yaml, ...) is
merged into these typed nodes and a misspelt key fails at composition with Hydra's message naming it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf, open_dict

from qsweep.errors import ConfigError, did_you_mean

__all__ = [
    "BaselineConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "PlanConfig",
    "check_known_keys",
    "compose_config",
    "composition_error",
    "group_options",
    "register_configs",
]


@dataclass
class ModelConfig:
    name: str | None = None  # hub id
    path: str | None = None  # local directory (wins over name)
    revision: str | None = None
    trust_remote_code: bool = False
    # Pickle weights (pytorch_model.bin) can run code when loaded: refused unless set (safetensors is the default).
    allow_pickle: bool = False
    granularity: str = "component"
    units: dict[str, list[dict[str, str]]] = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = "hf"  # hf | text | bundled
    path: str | None = None  # a local UTF-8 file or a directory of <split>.txt files (wins over source)
    dataset: str | None = None
    subset: str | None = None
    text_field: str = "text"
    joiner: str = "\n\n"
    cache_dir: str = "~/.cache/qsweep"


@dataclass
class EvalConfig:
    name: str = MISSING
    context: int | None = None  # null: the model's maximum (n_positions / max_position_embeddings)
    stride: int | None = None  # null: = context (non-overlapping windows)
    max_tokens: int | None = None  # null: the whole split
    search_split: str = "validation"
    report_split: str = "test"
    batch_size: int = 8
    logits_chunk: int | None = None  # rows of logits at a time; null: 512 on CPU, 4096 on GPU
    kld: bool = (
        True  # KL divergence to the baseline in every record (qsweep.heads: its hidden states are kept)
    )
    dtype: str = "auto"  # auto (the checkpoint's on a GPU, fp32 on CPU) | fp32 (exact) | bf16 | fp16
    device: str = "auto"
    compile: bool = False
    pristine: str = "device"  # where the one pristine copy of the weights lives: device | cpu (host memory)
    # MiB of quantized tensors kept for plan switches (LRU); null: a quarter of the weights, at most 512; 0: none
    cache_mb: int | None = None
    device_map: str | None = None  # null: one device | auto: split the model across the visible GPUs


@dataclass
class PlanConfig:
    version: int = 1
    default: str | None = None
    rules: list[dict[str, str]] = field(default_factory=list)
    units: dict[str, str] = field(default_factory=dict)


@dataclass
class BaselineConfig:
    plan: str = "fp16"  # a plan name from conf/plan/
    perplexity: float | None = None  # pin it (the seed: 28.4805); null: measured on the same protocol
    size_bytes: int | None = None  # pin it (the seed: 248900000); null: computed from the plan


@dataclass
class PrecisionConfig:
    name: str = MISSING
    menu: list[dict[str, Any]] = (
        MISSING  # [{pattern: regex over unit names, formats: [names]}], first match wins
    )


@dataclass
class StorageConfig:
    url: str | None = None  # null: SQLite file study.db in the run directory
    # RDB storages (SQLite included): a running trial's heartbeat period in seconds; null turns heartbeats off.
    # A trial whose heartbeat is grace_period seconds old (null: 2 x heartbeat_interval) is failed and retried.
    heartbeat_interval: int | None = 10
    grace_period: int | None = None


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = MISSING
    plan: PlanConfig = MISSING
    plan_file: str | None = None
    precision: PrecisionConfig = MISSING
    storage: StorageConfig = field(default_factory=StorageConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    penalty: float = 10.0
    split: str | None = None  # the split a single-plan evaluation uses; null: eval.report_split
    search: Any = None  # set by +search=NAME (conf/search/); validated by qsweep.search.config.search_config
    export: Any = None  # set by +export=NAME (conf/export/); validated by qsweep.export.cli
    worker: int = 0  # index of this worker of a shared study: sampler seed = search.seed + worker


def _asset_dir(name: str) -> str:
    """``${qsweep_asset:tiny}``: the directory of a model bundled with the package (qsweep/assets/NAME)."""
    path = Path(__file__).resolve().parent / "assets" / name
    if not path.is_dir():
        have = sorted(p.name for p in path.parent.iterdir() if p.is_dir()) if path.parent.is_dir() else []
        raise ConfigError(
            f"no bundled asset {name!r}{did_you_mean(name, have)}; bundled: {', '.join(have) or 'none'}"
        )
    return str(path)


def register_configs() -> None:
    """Register the schema and the ``qsweep_asset`` resolver (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="qsweep_schema", node=Config)
    if not OmegaConf.has_resolver("qsweep_asset"):
        OmegaConf.register_new_resolver("qsweep_asset", _asset_dir)


def _groups() -> list[str]:
    from qsweep.paths import config_dir

    return sorted(p.name for p in Path(config_dir()).iterdir() if p.is_dir() and p.name != "hydra")


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` (conf/GROUP/*.yaml), sorted."""
    from qsweep.paths import config_dir

    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def _first_of_sweep(override: str) -> str | None:
    """A multirun override as the first job sees it (``k=a,b`` -> ``k=a``); None for sweeps written as functions
    (``choice(...)``, ``range(...)``), which are left out of a suggestion's composition."""
    key, sep, value = override.partition("=")
    if not sep or not any(c in value for c in ",("):
        return override
    if "(" in value or "[" in value or "{" in value or "'" in value or '"' in value:
        return None
    return f"{key}={value.split(',')[0]}"


def _keys_beside(key: str, overrides: Sequence[str]) -> tuple[list[str], bool]:
    """The full keys next to ``key`` (its parent node's) in the config composed with the other ``overrides`` (a
    sweep's first value; if they fail too, their group selections only, or none), and whether the parent node
    exists there; ([], False) when that fails as well. Only for suggesting a misspelt key."""
    from omegaconf import DictConfig

    parent, _, _ = key.rpartition(".")
    name = lambda o: o.lstrip("+~").split("=", 1)[0]  # noqa: E731
    firsts = [_first_of_sweep(o) for o in overrides]
    others = [o for o in firsts if o and name(o) != key and not name(o).startswith("hydra.")]
    groups = [o for o in others if "." not in name(o) and name(o) in _groups()]
    for attempt in (others, groups, []):
        try:
            cfg = compose_config(attempt, convert=False)
        except Exception:
            continue
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig):
            return [f"{parent}.{k}" if parent else str(k) for k in node], True
        return [], False
    return [], False


def composition_error(exc: BaseException, overrides: Sequence[str] = ()) -> ConfigError:
    """Hydra's composition error (6-16 lines: an unknown key, an unknown option of a config group, a group not in
    the defaults list, an unparsable override) as one line naming the bad value, what was meant and the valid
    choices. ``overrides`` (the command line's) lets a misspelt key be matched against its neighbours."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(exc).strip()
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        if exc.options:
            return ConfigError(
                f"unknown option {option!r} of config group {group!r}{did_you_mean(option, exc.options)}; "
                f"valid: {', '.join(exc.options)}"
            )
        groups = _groups()
        if group and group not in groups:
            return ConfigError(
                f"unknown config group {group!r}{did_you_mean(group, groups)}; groups: {', '.join(groups)}"
            )
    if isinstance(exc, OverrideParseException):
        return ConfigError(f"cannot parse the override: {text.splitlines()[0]}")
    m = re.match(r"Could not override '([^']+)'", text)
    cause = str(exc.__cause__ or "").strip().splitlines()
    if m and "No match in the defaults list" in text:
        group = m.group(1)
        return ConfigError(
            f"config group {group!r} is not in the defaults list: add it with +{group}=OPTION (e.g. "
            f"python -m qsweep +search=nsga2)"
        )
    if m and cause and ("not in struct" in cause[0] or "Key" in cause[0]):
        key = m.group(1)
        beside, parent_exists = _keys_beside(key, overrides)
        valid = f"; valid keys there: {', '.join(k.rpartition('.')[2] for k in beside)}" if beside else ""
        group = key.partition(".")[0]
        if parent_exists and not beside:  # an empty mapping (plan.units): keys are added with +
            valid = f"; to add it there, use +{key}=VALUE"
        elif parent_exists and group == "search" and "search.name" not in beside:  # +search.X= alone made it
            valid = f"; no search is selected: choose one with +search=OPTION ({', '.join(group_options('search'))}) first"
        elif not parent_exists and "." in key and group in _groups():
            options = group_options(group)
            valid = f"; no {group} is selected: choose one with +{group}=OPTION ({', '.join(options)}) first"
        return ConfigError(f"unknown config key {key!r}{did_you_mean(key, beside)}{valid}")
    if m and cause:
        return ConfigError(f"cannot override {m.group(1)!r}: {cause[0]}")
    m = re.match(r"Error merging override (\S+)", text)
    if m and cause:
        return ConfigError(f"{m.group(1)}: {cause[0]}")
    return ConfigError(" ".join(line.strip() for line in text.splitlines() if line.strip()))


def compose_config(overrides: Sequence[str] = (), *, convert: bool = True):
    """The config ``python -m qsweep OVERRIDES`` runs with, through Hydra's compose API (the benchmarks and
    ``qsweep.workers`` use it); a composition error, or a key the schema does not know (:func:`check_known_keys`),
    is a one-line :class:`ConfigError` (:func:`composition_error`) unless ``convert`` is false."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from qsweep.paths import config_dir

    register_configs()
    error, outer = None, None
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (its error path): set its state aside
        outer = get_gh_backup()
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            try:
                cfg = compose("config", overrides=list(overrides))
            except HydraException as e:
                if not convert:
                    raise
                error = e
    finally:
        if outer is not None:
            restore_gh_from_backup(outer)
    if error is not None:  # converted outside the context: suggesting a key composes the config again
        raise composition_error(error, overrides) from None
    if convert:
        check_known_keys(cfg)
    return cfg


def _unknown_keys(node, cls, prefix: str = ""):
    """Keys of ``node`` that dataclass ``cls`` has no field for (recursively into dataclass-typed fields)."""
    import dataclasses
    import typing

    from omegaconf import DictConfig

    hints = typing.get_type_hints(cls)
    for key in node:
        if key not in hints:
            yield f"{prefix}{key}", [f"{prefix}{k}" for k in hints]
            continue
        child = node._get_node(key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(child, DictConfig) and not child._is_missing():
            yield from _unknown_keys(child, hints[key], f"{prefix}{key}.")


def check_known_keys(cfg) -> None:
    """Refuse a key the schema does not know. Hydra's struct mode refuses a misspelt key without ``+``, but
    ``+model.nmae=x`` or ``+serch=nsga2`` would be added and silently ignored. The ``hydra`` node, ``search``
    and ``export`` (validated by their own builders) are not checked here."""
    node = cfg.copy()
    with open_dict(node):
        node.pop("hydra", None)
    for key, beside in _unknown_keys(node, Config):
        raise ConfigError(
            f"unknown config key {key!r}{did_you_mean(key, beside)}; valid keys there: "
            f"{', '.join(k.rpartition('.')[2] for k in beside)}"
        )
