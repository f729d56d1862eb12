"""A real PostgreSQL server for tests: initdb + pg_ctl into a temporary directory."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.kit import free_port

HOW_TO_ENABLE = (
    "PostgreSQL server binaries not found (initdb/pg_ctl); install them with "
    "`apt-get install -y postgresql` (CI's .ci/run does) to run the replica tests"
)


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl, or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if which := shutil.which("pg_ctl"):
        candidates.insert(0, which)
    for pg_ctl in candidates:
        real = Path(os.path.realpath(pg_ctl)).parent
        if (real / "initdb").exists() and (real / "postgres").exists():
            return real
    return None


class PgServer:
    """One throwaway cluster on 127.0.0.1; runs as `postgres` when we are root."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="enkwatch-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.user = None if os.geteuid() != 0 else self._service_user()

    @staticmethod
    def _service_user() -> str:
        for name in ("postgres", "enkwatch-pg"):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        subprocess.run(["useradd", "--system", "--no-create-home", "enkwatch-pg"], check=True)
        return "enkwatch-pg"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, cwd=self.dir)

    def start(self) -> str:
        os.chmod(self.dir, 0o755)
        if self.user is not None:
            shutil.chown(self.dir, self.user)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "enkwatch", "--no-sync")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=300"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )
        return self.dsn

    @property
    def dsn(self) -> str:
        return f"postgresql://enkwatch@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
