"""Loading a causal LM (Hugging Face hub id or local directory) and its unit table.

The model config (conf/model/*.yaml) names the model (``name``: hub id, or ``path``: local directory, which wins)
and holds the unit grouping rules per granularity (``units: {component: [...], linear: [...], block: [...]}``),
selected by ``granularity``. ``trust_remote_code`` is never passed unless the config sets it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from qsweep.errors import ConfigError, did_you_mean, first_line
from qsweep.units import UnitTable, discover_units

__all__ = [
    "ModelLoadError",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "meta_model",
    "model_source",
    "unit_rules",
    "unit_table",
]


class ModelLoadError(RuntimeError):
    """The model, its config or its tokenizer cannot be loaded; the message says what to pass instead."""


def model_source(cfg: Mapping) -> str:
    """The local directory (``path``) if set, else the hub id (``name``)."""
    path, name = cfg.get("path"), cfg.get("name")
    if path:
        p = Path(str(path)).expanduser()
        if not p.is_dir():
            raise ModelLoadError(
                f"model.path={path!r} is not a directory (expected a Hugging Face model directory)"
            )
        return str(p)
    if not name:
        raise ModelLoadError(
            "the model config sets neither model.path (local directory) nor model.name (hub id)"
        )
    return str(name)


def _load_kwargs(cfg: Mapping) -> dict:
    kwargs = {"trust_remote_code": bool(cfg.get("trust_remote_code", False))}
    if cfg.get("revision"):
        kwargs["revision"] = cfg["revision"]
    return kwargs


def _offline_hint(source: str, what: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load the {what} of {source!r} ({first_line(err)}); "
        f"if the Hugging Face hub is out of reach, pass a local copy with model.path=DIR "
        f"or use the bundled offline model (model=tiny data=tiny)"
    )


def _from_pretrained(auto_class: str, cfg: Mapping, what: str, **kwargs):
    """``transformers.<auto_class>.from_pretrained`` on the configured source; failures say what to pass instead."""
    import transformers

    source = model_source(cfg)
    try:
        return getattr(transformers, auto_class).from_pretrained(source, **_load_kwargs(cfg), **kwargs)
    except (OSError, ValueError) as e:
        raise _offline_hint(source, what, e) from None


def load_model_config(cfg: Mapping):
    return _from_pretrained("AutoConfig", cfg, "config")


def meta_model(config) -> nn.Module:
    """Build the model on the meta device from its config: shapes only, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(cfg: Mapping, device: str | torch.device = "cpu") -> nn.Module:
    """Load the weights in fp32 (the reference precision that plans are simulated from), in eval mode."""
    model = _from_pretrained("AutoModelForCausalLM", cfg, "weights", dtype=torch.float32)
    return model.to(device).eval()


def load_tokenizer(cfg: Mapping):
    return _from_pretrained("AutoTokenizer", cfg, "tokenizer")


def unit_rules(cfg: Mapping) -> Sequence[Mapping]:
    """The grouping rules of the configured granularity; unknown granularities list the valid ones."""
    units = cfg.get("units") or {}
    gran = cfg.get("granularity")
    if gran not in units:
        raise ConfigError(
            f"unknown model.granularity {gran!r}{did_you_mean(gran, units)}; valid: "
            f"{', '.join(units) or 'none defined'}"
        )
    return units[gran]


def unit_table(model: nn.Module, cfg: Mapping) -> UnitTable:
    """Discover the units of ``model`` with the rules of ``cfg`` (the model config)."""
    return discover_units(model, unit_rules(cfg))
