"""Test-wide settings, and the Redis and Postgres servers the tests talk to.

Rules for this suite: servers bind port 0 on 127.0.0.1; no sleep orders tasks
(tests wait for the event they expect); every test has a global timeout
(pytest-timeout, see pyproject.toml); warnings are errors.

Servers: ``KDCUBE_TEST_REDIS_URL`` and ``KDCUBE_TEST_POSTGRES_DSN`` name them.
Unset, the local servers on the standard ports are used when they answer;
otherwise a throwaway server is started when its binaries are installed.
When none can be had, the tests that need it are skipped and the summary
says so, except under CI (``CI`` set), where that is an error.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.servers import can_run_postgres, throwaway_postgres, throwaway_redis

pytest_plugins = ["tests.s3_server", "tests.clamd_server", "tests.docker_server"]

_DEFAULTS = {
    "KDCUBE_TEST_REDIS_URL": ("redis://127.0.0.1:6379/0", 6379),
    "KDCUBE_TEST_POSTGRES_DSN": ("postgresql://postgres@127.0.0.1:5432/test", 5432),
}
_servers = ExitStack()
_missing: list[str] = []


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _provide(variable: str) -> None:
    if variable in os.environ:
        return
    default, port = _DEFAULTS[variable]
    if _answers(port):
        os.environ[variable] = default
        return

    if variable == "KDCUBE_TEST_REDIS_URL" and shutil.which("redis-server"):
        folder = Path(tempfile.mkdtemp(prefix="kdcube-redis-"))
        os.environ[variable] = _servers.enter_context(throwaway_redis(folder)).url
    elif variable == "KDCUBE_TEST_POSTGRES_DSN" and can_run_postgres():
        os.environ[variable] = _servers.enter_context(throwaway_postgres()).dsn
    elif os.environ.get("CI"):
        raise pytest.UsageError(
            f"{variable} is unset, nothing answers on 127.0.0.1:{port} and no"
            " server could be started; CI must provide it"
        )
    else:
        _missing.append(variable)


def pytest_configure(config: pytest.Config) -> None:
    for variable in _DEFAULTS:
        _provide(variable)


def pytest_unconfigure(config: pytest.Config) -> None:
    _servers.close()


def _needs(item: pytest.Item) -> set[str]:
    params = getattr(item, "callspec", None)
    values = set(params.params.values()) if params is not None else set()
    needed = set()
    if "redis" in values or os.environ.get("KDCUBE_TEST_BACKEND") == "redis-postgres":
        needed.add("KDCUBE_TEST_REDIS_URL")
    if (
        "postgres" in values
        or os.environ.get("KDCUBE_TEST_BACKEND") == "redis-postgres"
    ):
        needed.add("KDCUBE_TEST_POSTGRES_DSN")
    return needed


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not _missing:
        return
    for item in items:
        missing = _needs(item) & set(_missing)
        if missing:
            reason = f"no server for {', '.join(sorted(missing))}"
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _missing:
        terminalreporter.write_line(
            f"kdcube: skipped the tests that need {', '.join(_missing)}: no server"
            " answered and none could be started",
            yellow=True,
        )


@pytest.fixture
def anyio_backend() -> str:
    """Trio by default; a test that must also hold on asyncio parametrizes this."""
    return "trio"
