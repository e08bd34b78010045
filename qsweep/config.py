"""Config schemas (dataclasses registered in Hydra's ConfigStore): typed fields, unknown keys are errors.

conf/config.yaml lists ``qsweep_schema`` first in its defaults, so every group file (conf/model/*.yaml, ...) is
merged into these typed nodes and a misspelt key fails at composition with Hydra's message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from qsweep.errors import ConfigError, did_you_mean

__all__ = [
    "BaselineConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "PlanConfig",
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
