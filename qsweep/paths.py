"""Where qsweep's Hydra configs live.

In a source checkout they are the top-level ``conf/`` directory (the user's layout); a non-editable install ships
the same files as the package data ``qsweep/conf`` (see pyproject.toml). Both are found the same way.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["config_dir"]

_PKG = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The directory holding config.yaml and the config groups (model/, data/, eval/, plan/, ...)."""
    for candidate in (_PKG / "conf", _PKG.parent / "conf"):
        if (candidate / "plan").is_dir():
            return candidate
    raise FileNotFoundError(f"qsweep's config directory was not found next to {_PKG} (reinstall qsweep)")
