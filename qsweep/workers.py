"""`python -m qsweep.workers -n 4 OVERRIDES...`: several workers of one study on this host.

Each worker is a plain ``python -m qsweep OVERRIDES worker=I hydra.run.dir=DIR/workerI`` process (so anything a
single run accepts works here), with its own sampler seed (search.seed + I) and, where GPUs are visible, its own
GPU (``CUDA_VISIBLE_DEVICES``, round robin). They share the study through ``storage=journal`` (the default here:
DIR/study.journal) or ``storage=postgres``; the study's shared steps are atomic (qsweep.search.storage), so they
may all start at once. Output lines are prefixed ``[wI]`` and also written to DIR/workerI/worker.log.

Ctrl-C or SIGTERM is passed on to every worker once (each fails its running trial cleanly and prints the resume
command). The exit status is 0 when every worker succeeded, else the first non-zero status (2: a user error).
On several hosts, run it on each with ``--first`` so worker indices (and seeds) stay distinct.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from qsweep.config import compose_config
from qsweep.errors import ConfigError, one_line_errors
from qsweep.search.storage import refuse_passwords_in_overrides

__all__ = ["gpu_ids", "main", "worker_commands", "worker_environments"]


def gpu_ids() -> list[str]:
    """The GPUs a worker may be given: CUDA_VISIBLE_DEVICES's entries, else every CUDA device torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def worker_environments(n: int, gpus: list[str], base: dict | None = None) -> list[dict[str, str]]:
    """The environment of each of ``n`` workers: with GPUs, one GPU each (``CUDA_VISIBLE_DEVICES``, round robin:
    one model replica per GPU, data-parallel search); without, a share of the CPU cores each (``OMP_NUM_THREADS``,
    unless set), since several processes each using every core run about 10x slower."""
    base = dict(os.environ if base is None else base)
    threads_each = max(1, (os.cpu_count() or 1) // n)
    envs = []
    for k in range(n):
        env = dict(base)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
        else:
            env.setdefault("OMP_NUM_THREADS", str(threads_each))
        envs.append(env)
    return envs


def _storage_overrides(overrides: list[str], run_dir: Path) -> list[str]:
    """The overrides that pick the shared storage: journal in ``run_dir`` unless the user named one; SQLite is
    refused (one process per file)."""
    storage = [o for o in overrides if o.lstrip("+").startswith(("storage=", "storage.url="))]
    if any(o.lstrip("+") == "storage=sqlite" or "storage.url=sqlite" in o for o in storage):
        raise ConfigError(
            "storage=sqlite is one process's storage; use storage=journal (this host) or storage=postgres"
        )
    if not any(o.lstrip("+").startswith("storage=") for o in storage):
        extra = ["storage=journal"]
        if not any(o.lstrip("+").startswith("storage.url=") for o in storage):
            extra.append(f"storage.url={run_dir / 'study.journal'}")
        return extra
    return []


def worker_commands(overrides: list[str], n: int, first: int, run_dir: Path) -> list[list[str]]:
    """The command line of each worker (index ``first`` .. ``first + n - 1``)."""
    if any(o.lstrip("+").startswith(("worker=", "hydra.run.dir=")) for o in overrides):
        raise ConfigError("worker= and hydra.run.dir= are set per worker; use -n/--first/--dir")
    shared = [*overrides, *_storage_overrides(overrides, run_dir)]
    return [
        [sys.executable, "-m", "qsweep", *shared, f"worker={i}", f"hydra.run.dir={run_dir / f'worker{i}'}"]
        for i in range(first, first + n)
    ]


def _pump(stream, prefix: str, log: Path) -> None:
    with log.open("w") as f:
        for line in stream:
            f.write(line)
            f.flush()
            sys.stdout.write(prefix + line)
            sys.stdout.flush()


@one_line_errors("qsweep.workers")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qsweep.workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--workers", type=int, default=None,
                        help="how many workers (default: one per visible GPU; required without GPUs)")  # fmt: skip
    parser.add_argument(
        "--first", type=int, default=0, help="index of the first worker (other hosts: 4, 8, ...)"
    )
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory of the workers' run dirs (default: multirun/DATE/TIME)")  # fmt: skip
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="overrides passed to every worker")
    args = parser.parse_args(argv)
    refuse_passwords_in_overrides(args.overrides)
    stray = [o for o in args.overrides if o.startswith("-")]
    if stray:
        raise ConfigError(f"option {stray[0]!r} after the overrides: put -n/--first/--dir before them")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"-n/--workers must be at least 1, got {args.workers}")
    if args.first < 0:
        raise ConfigError(f"--first must be at least 0, got {args.first}")
    gpus = gpu_ids()
    n = args.workers if args.workers is not None else len(gpus)
    if n < 1:
        raise ConfigError("no GPU visible: say how many workers with -n N")
    run_dir = (args.dir or Path("multirun") / time.strftime("%Y-%m-%d/%H-%M-%S")).resolve()
    commands = worker_commands(list(args.overrides), n, args.first, run_dir)
    # one line now for a bad override, not the same error from every worker (each still composes its own)
    compose_config([o for o in commands[0][3:] if not o.startswith("hydra.")])
    procs, pumps = [], []
    for k, (cmd, env) in enumerate(zip(commands, worker_environments(n, gpus), strict=True)):
        i = args.first + k
        (run_dir / f"worker{i}").mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        log = run_dir / f"worker{i}" / "worker.log"
        print(f"qsweep.workers: worker {i} pid {proc.pid} GPU {env.get('CUDA_VISIBLE_DEVICES', '-') if gpus else '-'}"
              f" log {log}", flush=True)  # fmt: skip
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[w{i}] ", log), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)

    told: set[int] = set()

    def forward(signum, frame) -> None:  # once per worker: they stop cleanly and print their resume command
        for p in procs:
            if p.poll() is None and p.pid not in told:
                told.add(p.pid)
                p.send_signal(signal.SIGINT)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, forward)
    codes = [p.wait() for p in procs]
    for pump in pumps:
        pump.join(timeout=5)
    for i, code in enumerate(codes, start=args.first):
        if code:
            print(f"qsweep.workers: worker {i} exited with status {code}", file=sys.stderr, flush=True)
    return next((c if c > 0 else 1 for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
