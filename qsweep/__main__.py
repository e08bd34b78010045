"""`python -m qsweep`: the Hydra entry point. It composes the config and delegates (qsweep.app).

A :class:`~qsweep.errors.QsweepError` (bad config, plan, model, data or storage: something the user fixes) is
printed as one line ``qsweep: error: ...`` on stderr with exit status 2; any other exception is a bug and keeps its
traceback. ``python -m qsweep --help`` prints the app help of conf/hydra/help/qsweep.yaml.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qsweep.config import check_known_keys, composition_error, register_configs
from qsweep.errors import QsweepError, user_error_line
from qsweep.paths import config_dir

register_configs()

# Errors a user fixes by changing their input: reported as one line, no traceback. Only the project's own type:
# a ValueError or FileNotFoundError from a bug must keep its traceback.
USER_ERRORS = (QsweepError,)
_STARTED = False  # whether Hydra has called the task (an OSError before it is Hydra's run directory set-up)


def error_line(err: BaseException) -> str:
    """The one line printed for a user error (a message that spans lines is joined: one error, one line)."""
    return user_error_line("qsweep", err)


def quiet_third_parties(verbose: bool = False) -> None:
    """A quiet stderr on success: transformers' "Loading weights" bar and Optuna's info lines ("A new study
    created ...") off, unless ``hydra.verbose`` is set. qsweep's own log lines and progress bars (trials, the
    sensitivity table, re-scoring) stay; warnings and errors of every library stay."""
    if verbose:
        return
    import optuna
    from transformers.utils import logging as transformers_logging

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    transformers_logging.disable_progress_bar()


def _overrides() -> list[str]:
    """The command line's overrides, as Hydra's own parser reads them (``-cn NAME``, ``--cfg job`` left out)."""
    from hydra._internal.utils import get_args_parser

    return list(get_args_parser().parse_known_args(sys.argv[1:])[0].overrides)


def _in_the_run_directory(filename) -> bool:
    """Whether ``filename`` (of an OSError during Hydra's set-up) is in, or on the way to, the run or sweep directory:
    ``hydra.run.dir`` / ``hydra.sweep.dir`` as overridden, else under conf/config.yaml's defaults (outputs/,
    multirun/). Hydra's state is already reset when its error reaches us, so the overrides are read instead."""
    if not filename:
        return False
    given = [
        o.split("=", 1)[1]
        for o in _overrides()
        if o.lstrip("+").startswith(("hydra.run.dir=", "hydra.sweep.dir="))
    ]
    path = Path(str(filename)).absolute()
    for d in [*given, "outputs", "multirun"]:
        root = Path(d).absolute()
        if path == root or root in path.parents or path in root.parents:
            return True
    return False


def _one_line_composition_errors() -> None:
    """Hydra prints its composition errors (an unknown key, an unknown option of a group, an unparsable override)
    in 6-16 lines with exit status 1, from ``hydra._internal.utils.run_and_report``, which wraps composition and
    the task alike. This wraps what it runs so that those errors are qsweep's one line (with a did-you-mean and
    the valid choices: :func:`qsweep.config.composition_error`) and exit status 2, as is an OSError before the task
    starts (an unwritable or impossible ``hydra.run.dir``); anything else is left to Hydra
    (``HYDRA_FULL_ERROR=1`` still shows Hydra's own message and traceback). Hydra is pinned to 1.3.x, where this
    function is the one place both pass through."""
    import hydra._internal.utils as hydra_utils
    from hydra.errors import HydraException

    if os.environ.get("HYDRA_FULL_ERROR") == "1" or getattr(hydra_utils.run_and_report, "_qsweep", False):
        return
    original = hydra_utils.run_and_report

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except HydraException as e:
                if _STARTED:  # raised inside the task: a bug, Hydra reports it
                    raise
                print(error_line(composition_error(e, _overrides())), file=sys.stderr)
                sys.exit(2)
            except OSError as e:
                if _STARTED:  # the task's own: not Hydra's set-up
                    raise
                where = f"{e.filename!s}: " if e.filename else ""
                if _in_the_run_directory(e.filename):
                    print(f"qsweep: error: cannot write the run directory ({where}{e.strerror or e}); set "
                          f"hydra.run.dir (hydra.sweep.dir with -m) to a writable directory", file=sys.stderr)  # fmt: skip
                else:
                    print(f"qsweep: error: Hydra's set-up failed ({where}{e.strerror or e})", file=sys.stderr)
                sys.exit(2)

        return original(guarded)

    run_and_report._qsweep = True
    hydra_utils.run_and_report = run_and_report


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    from qsweep.app import evaluate_one, run_search
    from qsweep.export.cli import export_one

    global _STARTED
    _STARTED = True
    quiet_third_parties(verbose=bool(HydraConfig.get().verbose))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_known_keys(cfg)
        if cfg.get("export") is not None:
            row = export_one(cfg, out_dir)
        else:
            row = run_search(cfg, out_dir) if cfg.search is not None else evaluate_one(cfg, out_dir)
    except USER_ERRORS as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except (RuntimeError, MemoryError) as e:  # out of memory outside the phases that name themselves
        from qsweep.memory import ResourceError, is_out_of_memory, out_of_memory_message

        if not is_out_of_memory(e):
            raise
        print(error_line(ResourceError(out_of_memory_message(e, None, "this run"))), file=sys.stderr)
        sys.exit(2)
    print(json.dumps(row))
    if row.get("error"):
        sys.exit(1)


def _refuse_passwords() -> None:
    """Before Hydra writes anything: a password in a ``storage.url=`` override is one line, exit 2."""
    from qsweep.search.storage import refuse_passwords_in_overrides

    try:
        refuse_passwords_in_overrides(sys.argv[1:])
    except USER_ERRORS as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _refuse_passwords()
    _one_line_composition_errors()
    main()
