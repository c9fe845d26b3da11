"""A throwaway PostgreSQL server for the central role's tests and ``edgeprune bench collect``.

Debian's server binaries (``initdb``, ``pg_ctl``, ``postgres``) live in ``/usr/lib/postgresql/<version>/bin``, off
PATH. The cluster is made in a temporary directory, listens on one loopback port (trust login, no Unix socket) and
is run as an unprivileged user: PostgreSQL refuses to run as root, so as root it runs as ``nobody``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgeprune.broker import free_port


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine (``apt-get install postgresql``; install.sh --dev does)."""


def server_bindir() -> Path:
    """The newest installed server's bin directory; PostgresUnavailable when there is none."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")


class PostgresServer:
    """initdb + pg_ctl in a temp dir; :meth:`stop` and :meth:`start` again keep the data (a database restart)."""

    def __init__(self, durable: bool = True):
        """``durable=False`` turns fsync off (tests: the data dies with the temp dir anyway)."""
        self.bindir = server_bindir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="edgeprune-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        if self._user:
            shutil.chown(self.root, "nobody")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        self._options = options if durable else options + " -c fsync=off -c synchronous_commit=off"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-locale", "-E", "UTF8",
                  "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._user, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=120, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-o", self._options, "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        """A fast shutdown: clients are disconnected, committed data stays."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
