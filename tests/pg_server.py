"""A throwaway PostgreSQL server for tests: initdb + pg_ctl on a temporary directory, a free port on 127.0.0.1.

The binaries come from PATH or the Debian ``postgresql`` package (/usr/lib/postgresql/<version>/bin; .ci/run
installs it when absent). PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user
(``runuser``), in a directory that user owns. Password authentication (scram-sha-256) is on, so a wrong password
is a real server error.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PASSWORD", "USER", "pg_bin_dir", "postgres_server"]

USER, PASSWORD = "qsweep", "s3cret-pw"


def pg_bin_dir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None where PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server with database ``qsweep`` owned by user ``qsweep``; yield its URL (with the password)."""
    bindir = pg_bin_dir()
    if bindir is None:
        raise RuntimeError("PostgreSQL binaries not found (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="qsweep-pg-"))
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    data, pwfile, port = root / "data", root / "pw", _free_port()
    pwfile.write_text(PASSWORD + "\n")
    if as_root:
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
        root.chmod(0o700)

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
            "-E", "UTF8", "--locale=C")  # fmt: skip
        opts = f"-h 127.0.0.1 -p {port} -k {root} -c max_connections=100 -c fsync=off"
        run(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(root / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        try:
            url = f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{port}/qsweep"
            _create_database(f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{port}/postgres")
            yield url
        finally:
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _create_database(admin_url: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    deadline = time.time() + 30
    while True:
        try:
            with engine.connect() as con:
                con.execute(sqlalchemy.text("CREATE DATABASE qsweep"))
            break
        except sqlalchemy.exc.OperationalError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    engine.dispose()
