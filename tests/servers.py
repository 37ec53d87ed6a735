"""Throwaway Redis and Postgres servers that a test may stop and start.

The shared servers of the machine must never be restarted by a test, so the
chaos tests run their own: Redis with an append-only file synced on every
write (a restart keeps everything, as a production Redis with persistence
does) and a fresh Postgres cluster owned by the ``postgres`` user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(check: list[str], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while subprocess.run(check, capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up")
        time.sleep(0.05)


@dataclass
class ThrowawayRedis:
    folder: Path
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        subprocess.run(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
                "--dir",
                str(self.folder),
                "--pidfile",
                str(self.folder / "redis.pid"),
                "--logfile",
                str(self.folder / "redis.log"),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            check=True,
        )
        _wait_until(["redis-cli", "-p", str(self.port), "ping"], "redis")

    def stop(self) -> None:
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True
        )
        deadline = time.monotonic() + 10
        while (self.folder / "redis.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)


@dataclass
class ThrowawayPostgres:
    folder: Path
    port: int

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(
            ["su", "postgres", "-c", " ".join(command)], check=True, capture_output=True
        )

    def init(self) -> None:
        shutil.chown(self.folder, "postgres", "postgres")
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.folder / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
        )

    def start(self) -> None:
        options = f"'-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1'"
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.folder / "data"),
            "-l",
            str(self.folder / "postgres.log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.folder / "data"),
            "-m",
            "fast",
            "-w",
            "stop",
        )


def can_run_postgres() -> bool:
    return (PG_BIN / "initdb").exists() and os.geteuid() == 0


@contextmanager
def throwaway_redis(folder: Path) -> Iterator[ThrowawayRedis]:
    folder.mkdir(parents=True, exist_ok=True)
    server = ThrowawayRedis(folder, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    # Not under pytest's tmp_path: its parents are private to root, and the
    # server runs as the postgres user.
    folder = Path(tempfile.mkdtemp(prefix="kdcube-pg-"))
    server = ThrowawayPostgres(folder, free_port())
    try:
        server.init()
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
