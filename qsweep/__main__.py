"""`python -m qsweep`: the Hydra entry point. It composes the config and delegates (qsweep.app).

A :class:`~qsweep.errors.QsweepError` (bad config, plan, model, data or storage: something the user fixes) is
printed as one line ``qsweep: error: ...`` on stderr with exit status 2; any other exception is a bug and keeps its
traceback. ``python -m qsweep --help`` prints the app help of conf/hydra/help/qsweep.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qsweep.config import register_configs
from qsweep.errors import QsweepError, user_error_line
from qsweep.paths import config_dir

register_configs()

# Errors a user fixes by changing their input: reported as one line, no traceback. Only the project's own type:
# a ValueError or FileNotFoundError from a bug must keep its traceback.
USER_ERRORS = (QsweepError,)


def error_line(err: BaseException) -> str:
    """The one line printed for a user error (a message that spans lines is joined: one error, one line)."""
    return user_error_line("qsweep", err)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    from qsweep.app import evaluate_one, run_search
    from qsweep.export.cli import export_one

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.get("export") is not None:
            row = export_one(cfg, out_dir)
        else:
            row = run_search(cfg, out_dir) if cfg.search is not None else evaluate_one(cfg, out_dir)
    except USER_ERRORS as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    print(json.dumps(row))
    if row.get("error"):
        sys.exit(1)


if __name__ == "__main__":
    main()
