"""A real, throwaway PostgreSQL for the tests: one cluster per test session (`initdb` + `pg_ctl` in a
temporary directory, on a free loopback port), a fresh database per test.

Debian's `postgresql` package provides the binaries (.ci/run installs it when missing); they are found
on PATH or in /usr/lib/postgresql/*/bin. Without them the tests that use these fixtures FAIL with a
message saying what to install: the PostgreSQL store is never tested against a mock.

PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user the package
creates (runuser), in a directory it owns. fsync, full-page writes and synchronous commit are off:
a test database need not survive a power cut, and they cost seconds per test on a slow disk.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

_counter = itertools.count()


def pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if cands:
        return cands[-1]
    pytest.fail(f"PostgreSQL's {name} is not installed: the PostgreSQL store's tests need a real server "
                "(`apt-get install postgresql`, as .ci/run does)", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """initdb + pg_ctl start in a temporary directory; `url(db)`, `create_db()`, `stop()`."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="muse-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = _free_port()
        self._as = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root, PostgreSQL needs an unprivileged user: the `postgres` user that "
                            "Debian's postgresql package creates is missing", pytrace=False)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--"]
        os.chmod(self.root, 0o700)
        self._run([pg_bin("initdb"), "-D", str(self.data), "-U", "muse", "-A", "trust", "-E", "UTF8",
                   "--locale=C", "--no-sync"])
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                "-c shared_buffers=32MB")
        self._run([pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start"])

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(self._as + cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://muse@127.0.0.1:{self.port}/{db}"

    def create_db(self) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run([pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster():
    cluster = PgCluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """A fresh, empty database on the session's cluster."""
    return pg_cluster.create_db()
