"""`python -m qsweep`: the Hydra entry point. It composes the config and delegates (qsweep.app)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qsweep.config import register_configs
from qsweep.data import DataLoadError
from qsweep.model import ModelLoadError
from qsweep.paths import config_dir
from qsweep.plan import PlanError

register_configs()

# Errors a user fixes by changing their input: reported as one line, no traceback.
USER_ERRORS = (PlanError, ModelLoadError, DataLoadError, ValueError, FileNotFoundError)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    from qsweep.app import evaluate_one
    from qsweep.search.study import run_search

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        row = run_search(cfg, out_dir) if cfg.search is not None else evaluate_one(cfg, out_dir)
    except USER_ERRORS as e:
        print(f"qsweep: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    print(json.dumps(row))
    if row.get("error"):
        sys.exit(1)


if __name__ == "__main__":
    main()
