"""The device a session evaluates on: ``eval.device`` resolved and checked (one line naming the setting when this
machine lacks it)."""

from __future__ import annotations

import re

import torch

from qsweep.errors import ConfigError

__all__ = ["DEVICES", "resolve_device"]

DEVICES = "auto, cpu, cuda, cuda:N, mps"
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto`` (or None): CUDA when available, else CPU; else one of :data:`DEVICES`, which must exist here.

    Raises :class:`ConfigError` naming ``eval.device`` for an unknown name or a device this machine lacks.
    """
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(name)
    if not _DEVICE_RE.fullmatch(text):
        raise ConfigError(f"unknown eval.device {text!r}; valid: {DEVICES}")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only PyTorch build" if torch.version.cuda is None else "no usable GPU or driver"
            raise ConfigError(
                f"eval.device={text} but CUDA is not available here ({build}, torch {torch.__version__}); "
                f"use eval.device=auto or eval.device=cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"eval.device={text} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"eval.device={text} but MPS is not available here; use eval.device=auto or cpu")
    return device
