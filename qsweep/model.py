"""Loading a causal LM (Hugging Face hub id or local directory) and its unit table.

The model config (conf/model/*.yaml) names the model (``name``: hub id, or ``path``: local directory, which wins)
and holds the unit grouping rules per granularity (``units: {component: [...], linear: [...], block: [...]}``),
selected by ``granularity``. ``trust_remote_code`` is never passed unless the config sets it.

Loading refuses, with one line naming the key or file, what would otherwise be a traceback or a silent risk:
an empty directory or one without config.json; a truncated or corrupt ``*.safetensors`` file (its header is read
before transformers opens it); pickle weights (``pytorch_model.bin``), which can run code when unpickled, unless
``model.allow_pickle=true`` (torch's weights-only unpickler still refuses a pickle that holds code). A hub id is
loaded with ``local_files_only`` when ``HF_HUB_OFFLINE`` is set or the hub does not answer one short connection
probe, so an offline run fails at once instead of after minutes of retries.
"""

from __future__ import annotations

import functools
import os
import pickle
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from qsweep.errors import ConfigError, QsweepError, did_you_mean, first_line
from qsweep.units import UnitTable, discover_units

__all__ = [
    "HUB_PROBE_TIMEOUT",
    "ModelLoadError",
    "checkpoint_dtype",
    "hub_unreachable",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "meta_model",
    "model_source",
    "unit_rules",
    "unit_table",
]


HUB_PROBE_TIMEOUT = 3.0  # seconds: one TCP connection to the hub decides whether hub ids load offline
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class ModelLoadError(QsweepError, RuntimeError):
    """The model, its config or its tokenizer cannot be loaded; the message says what to pass instead."""


def _listing(directory: Path, limit: int = 6) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def model_source(cfg: Mapping) -> str:
    """The local directory (``path``) if set, else the hub id (``name``)."""
    path, name = cfg.get("path"), cfg.get("name")
    if path:
        p = Path(str(path)).expanduser()
        if not p.is_dir():
            raise ModelLoadError(
                f"model.path={path!r} is not a directory (expected a Hugging Face model directory)"
            )
        if not any(p.iterdir()):
            raise ModelLoadError(
                f"model.path={path!r} is an empty directory; point it at a Hugging Face model directory "
                f"(config.json, model.safetensors and tokenizer files, as save_pretrained writes them)"
            )
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"model.path={path!r} has no config.json (it holds: {_listing(p)}); point it at a Hugging Face "
                f"model directory (config.json, model.safetensors and tokenizer files)"
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


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (``HF_HUB_OFFLINE`` set, or no answer to one TCP connection
    within :data:`HUB_PROBE_TIMEOUT` seconds), or None when it can. Probed once per process; behind a proxy
    (``HTTPS_PROXY``/``ALL_PROXY``) the probe is skipped and the hub assumed reachable."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as e:
        return f"{host}:{port} does not answer: {e.strerror or type(e).__name__}"
    return None


def _local_dir(cfg: Mapping) -> Path | None:
    return Path(str(cfg["path"])).expanduser() if cfg.get("path") else None


def _load_error(source: str, what: str, err: Exception, offline: str | None) -> ModelLoadError:
    if offline:
        return ModelLoadError(
            f"cannot load the {what} of {source!r}: the Hugging Face hub is out of reach ({offline}) and no "
            f"copy is in the local cache; pass a local copy with model.path=DIR or use the bundled offline "
            f"model (model=tiny data=tiny)"
        )
    return ModelLoadError(
        f"cannot load the {what} of {source!r} ({first_line(err)}); "
        f"if the Hugging Face hub is out of reach, pass a local copy with model.path=DIR "
        f"or use the bundled offline model (model=tiny data=tiny)"
    )


def _from_pretrained(auto_class: str, cfg: Mapping, what: str, **kwargs):
    """``transformers.<auto_class>.from_pretrained`` on the configured source; failures say what to pass instead."""
    import transformers

    source = model_source(cfg)
    offline = None if _local_dir(cfg) else hub_unreachable()
    if offline:
        kwargs["local_files_only"] = True  # no retries against a hub that will not answer
    try:
        return getattr(transformers, auto_class).from_pretrained(source, **_load_kwargs(cfg), **kwargs)
    except (OSError, ValueError) as e:
        local = _local_dir(cfg)
        if local is not None:
            raise ModelLoadError(
                f"cannot load the {what} of model.path={str(local)!r} ({first_line(e)})"
            ) from None
        raise _load_error(source, what, e, offline) from None


def _check_local_weights(directory: Path, allow_pickle: bool) -> None:
    """Refuse a directory whose weights are missing, truncated/corrupt safetensors, or pickles not opted into."""
    from safetensors import SafetensorError, safe_open

    tensors = sorted(directory.glob("*.safetensors"))
    for f in tensors:  # reading the header checks that the file covers every tensor it declares
        try:
            with safe_open(f, framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(
                f"weights file {str(f)!r} is truncated or corrupt ({first_line(e)}); download or save the "
                f"model again (model.path={str(directory)!r})"
            ) from None
    if tensors:
        return
    pickles = sorted(f.name for f in directory.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    if not pickles:
        raise ModelLoadError(
            f"model.path={str(directory)!r} has no weights (no *.safetensors file; it holds: {_listing(directory)})"
        )
    if not allow_pickle:
        raise ModelLoadError(
            f"model.path={str(directory)!r} holds only pickle weights ({', '.join(pickles)}), which can run "
            f"code when loaded; convert them to safetensors (save_pretrained), or pass model.allow_pickle=true "
            f"if you trust their source"
        )


def _unpickling_refused(source: str, err: Exception) -> ModelLoadError:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
    return ModelLoadError(
        f"torch's weights-only unpickler refused the pickle weights of {source!r} ({reason}): the file holds "
        f"more than tensors and may run code; do not load it, use a safetensors copy from a trusted source"
    )


def load_model_config(cfg: Mapping):
    return _from_pretrained("AutoConfig", cfg, "config")


def meta_model(config) -> nn.Module:
    """Build the model on the meta device from its config: shapes only, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config declares (``dtype`` / ``torch_dtype``); fp32 when it declares none."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) and declared.is_floating_point else torch.float32


def _placement(device: torch.device, device_map, max_memory) -> dict:
    """from_pretrained's placement: straight onto one GPU (no host copy of the weights), or ``device_map`` as
    given (e.g. ``"auto"`` with ``max_memory``, across GPUs), or the host."""
    if device_map is not None:
        return {"device_map": device_map, **({"max_memory": max_memory} if max_memory else {})}
    if device.type == "cuda":
        import transformers
        from transformers.utils import is_accelerate_available

        if int(transformers.__version__.split(".")[0]) >= 5 or is_accelerate_available():
            return {"device_map": {"": str(device)}}
    return {}


def load_model(
    cfg: Mapping, device: str | torch.device = "cpu", *, dtype="auto", device_map=None, max_memory=None
) -> nn.Module:
    """Load the weights in eval mode, in the checkpoint's dtype (``dtype="auto"``; no fp32 copy of a bf16
    checkpoint) or ``dtype``, straight onto ``device`` where transformers can place them there (safetensors are
    memory-mapped, so the host holds no second copy); ``device_map`` (e.g. ``"auto"``) splits the model across
    GPUs (``max_memory``: bytes per GPU index). Plans are simulated from these weights (qsweep.apply keeps them pristine)."""
    from safetensors import SafetensorError

    device = torch.device(device)
    allow_pickle = bool(cfg.get("allow_pickle", False))
    local = _local_dir(cfg)
    if local is not None:
        _check_local_weights(Path(model_source(cfg)), allow_pickle)
    # use_safetensors=True: pickle weights are never read unless model.allow_pickle opts in (hub ids too)
    kwargs = {} if allow_pickle else {"use_safetensors": True}
    kwargs.update(_placement(device, device_map, max_memory))
    try:
        model = _from_pretrained("AutoModelForCausalLM", cfg, "weights", dtype=dtype, **kwargs)
    except pickle.UnpicklingError as e:
        raise _unpickling_refused(model_source(cfg), e) from None
    except SafetensorError as e:
        raise ModelLoadError(
            f"the safetensors weights of {model_source(cfg)!r} are truncated or corrupt ({first_line(e)}); "
            f"download or save the model again"
        ) from None
    if device_map is None:
        model = model.to(device)
    return model.eval()


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
