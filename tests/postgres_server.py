"""A throwaway PostgreSQL server for tests: ``initdb`` in a temporary folder, started on loopback.

Used by the ``postgres_dsn`` fixture (``tests/conftest.py``). It needs the
server's programs (Debian's ``postgresql`` package: ``initdb`` and
``pg_ctl`` under ``/usr/lib/postgresql/<version>/bin``) and psycopg. The
server refuses to run as root, so as root it runs as the unprivileged user
``nobody`` (through ``runuser``), in a folder given to that user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["HOW_TO_ENABLE", "PostgresServer", "find_programs"]

HOW_TO_ENABLE = (
    "PostgreSQL tests need the server's programs and psycopg: apt-get install postgresql "
    "(or put initdb and pg_ctl on PATH) and pip install -e '.[test]'; set "
    "AGGREGATOR_REQUIRE_POSTGRES=1 to make their absence an error (as .ci/run does)"
)


def find_programs() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: from PATH, else the newest Debian install."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0])
    )
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One cluster: :meth:`start` it, connect with :attr:`dsn`, :meth:`stop` it (removes its folder)."""

    def __init__(self, programs: Path) -> None:
        self.programs = programs
        self.folder = Path(tempfile.mkdtemp(prefix="aggregator-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=10"
        self._as: list[str] = []
        if os.geteuid() == 0:  # the server refuses root
            shutil.chown(self.folder, "nobody")
            self.folder.chmod(0o700)
            self._as = ["runuser", "-u", "nobody", "--"]

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=120, check=False, cwd=self.folder
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        self._run(
            str(self.programs / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        )
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.programs / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
            str(self.folder / "server.log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(
                    str(self.programs / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
                )
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
