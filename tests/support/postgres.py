"""A private PostgreSQL cluster for tests: Debian's server, a temporary directory, a unix socket.

The Makefile installs Debian's ``postgresql`` package; this starts its server binaries
directly (no system service): ``initdb`` into a fresh directory, one ``postgres`` on a
unix socket in that directory (no TCP port to collide with), ``fsync`` off (a test
cluster is thrown away). As root, the server runs as the ``postgres`` system user, as
PostgreSQL refuses root. Each test gets a database of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

START_TIMEOUT_S = 30.0
PORT = 5439  # only names the socket file; nothing listens on TCP


class PostgresUnavailable(RuntimeError):
    """The server binaries are missing: say how to get them (tests fail, never skip)."""


def server_binary(name: str) -> Path:
    """``initdb`` or ``postgres`` of the newest installed major version."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: p.parts[-3])
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path is None:
        raise PostgresUnavailable(
            f"PostgreSQL's {name} is not installed; `make test` installs Debian's postgresql "
            "package (or run: apt-get install -y postgresql)"
        )
    return Path(on_path)


def _as_server_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PostgresCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self._server: subprocess.Popen[bytes] | None = None
        self._databases = 0

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        prefix = _as_server_user()
        subprocess.run(
            [*prefix, str(server_binary("initdb")), "-D", str(self.data), "-A", "trust",
             "-U", "postgres", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        log = (self.root / "server.log").open("wb")
        self._server = subprocess.Popen(
            [*prefix, str(server_binary("postgres")), "-D", str(self.data), "-k", str(self.root),
             "-p", str(PORT), "-c", "listen_addresses=", "-c", "fsync=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(psycopg.OperationalError):
                psycopg.connect(self._dsn("postgres"), connect_timeout=2).close()
                return
            if self._server.poll() is not None or time.monotonic() > deadline:
                raise PostgresUnavailable(
                    f"the test PostgreSQL did not start; its log: {self.root / 'server.log'}"
                )
            time.sleep(0.1)

    def _dsn(self, database: str) -> str:
        return f"host={self.root} port={PORT} user=postgres dbname={database}"

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        self._databases += 1
        name = f"t{self._databases}"
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@/{name}?host={self.root}&port={PORT}"

    def stop(self) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.terminate()  # smart shutdown: waits for clients, then exits
            try:
                self._server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
        self._server = None


@contextlib.contextmanager
def running_cluster() -> Iterator[PostgresCluster]:
    """A cluster in a directory of its own under the system temp dir (pytest's tmp dirs
    are private to root, and the server runs as ``postgres``); removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="homefleet-pg-"))
    cluster = PostgresCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
