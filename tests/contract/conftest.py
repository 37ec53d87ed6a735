"""Adapters under contract, and the event loops every contract test runs on.

Each port has one fixture parametrized by adapter name. A new adapter (Redis,
Postgres, S3) joins every test of its port by adding its name to ``params`` and
a branch that opens it; the tests themselves never name an adapter.

Trio runs on an autojump MockClock, so leases, TTLs and read timeouts elapse
without real waiting; asyncio runs on the real clock, which is why the tests
keep those durations to a fraction of a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.lowlevel
import pytest
import trio.testing

from kdcube.bus.memory import open_memory_bus
from kdcube.bus.memory.relay import MemoryRelay
from kdcube.bus.ports import Queue, Relay, State
from kdcube.storage.local import LocalStorage
from kdcube.storage.ports import Storage
from kdcube.store.ports import Store
from kdcube.store.sqlite import connect, open_sqlite_store

from .postgres_backend import fresh_schema
from .redis_backend import (
    expire_every_event,
    open_redis_relay,
    redis_bus,
    wants_real_clock,
)


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    if request.param == "trio" and (
        _on_asyncio_driver(request) or wants_real_clock(request)
    ):
        return "trio", {}
    if request.param == "trio":
        return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}
    # Explicit: once trio-asyncio is imported, asyncio's default loop is its own.
    return "asyncio", {"loop_factory": asyncio.SelectorEventLoop}


def _on_asyncio_driver(request: pytest.FixtureRequest) -> bool:
    """Whether the test uses an asyncio driver behind trio-asyncio (Postgres).

    Those tests need Trio's real clock: trio-asyncio runs asyncio's timers on
    it, so an autojump clock would fire asyncpg's connect timeout while the
    server is still answering.
    """
    params = getattr(request.node, "callspec", None)
    return params is not None and params.params.get("store_backend") == "postgres"


@pytest.fixture(params=["memory", "redis"])
async def queue(request: pytest.FixtureRequest) -> AsyncIterator[Queue]:
    if request.param == "redis":
        async with redis_bus() as bus:
            yield bus.queue
        return

    async with open_memory_bus() as bus:
        yield bus.queue


@pytest.fixture(params=["memory", "redis"])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[State]:
    if request.param == "redis":
        async with redis_bus() as bus:
            yield bus.state
        return

    async with open_memory_bus() as bus:
        yield bus.state


@dataclass(frozen=True)
class RelayBackend:
    """Opens relays of one adapter and drives its retention by age."""

    open: Callable[[int], AbstractAsyncContextManager[Relay]]
    """Open a relay that keeps at least ``max_events`` events per session."""
    expire: Callable[[Relay], Awaitable[None]]
    """Let every event published so far outlive its retention period."""


async def _expire_memory(relay: Relay) -> None:
    assert isinstance(relay, MemoryRelay)
    await anyio.lowlevel.checkpoint()
    relay.sweep(cutoff=float("inf"))


@asynccontextmanager
async def _open_memory_relay(max_events: int) -> AsyncIterator[Relay]:
    async with open_memory_bus(max_events=max_events) as bus:
        yield bus.relay


@pytest.fixture(params=["memory", "redis"])
def relay_backend(request: pytest.FixtureRequest) -> RelayBackend:
    if request.param == "redis":
        return RelayBackend(open=open_redis_relay, expire=expire_every_event)
    return RelayBackend(open=_open_memory_relay, expire=_expire_memory)


@pytest.fixture
async def relay(relay_backend: RelayBackend) -> AsyncIterator[Relay]:
    async with relay_backend.open(10_000) as opened:
        yield opened


@dataclass(frozen=True)
class StoreBackend:
    """Opens one database of an adapter, as often as a test likes."""

    open: Callable[[], AbstractAsyncContextManager[Store]]
    applied_migrations: Callable[[], list[int]]
    """Versions the database records as applied, one entry per application."""


def _sqlite_backend(path: Path) -> StoreBackend:
    def applied() -> list[int]:
        connection = connect(path)
        try:
            rows = connection.execute("SELECT version FROM schema_migrations")
            return sorted(row[0] for row in rows)
        finally:
            connection.close()

    return StoreBackend(
        open=lambda: open_sqlite_store(path), applied_migrations=applied
    )


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[StoreBackend]:
    if request.param == "postgres":
        with fresh_schema() as schema:
            yield StoreBackend(
                open=schema.open, applied_migrations=schema.applied_migrations
            )
        return

    yield _sqlite_backend(tmp_path / "store" / "kdcube.db")


@pytest.fixture
async def store(store_backend: StoreBackend) -> AsyncIterator[Store]:
    async with store_backend.open() as opened:
        yield opened


@dataclass(frozen=True)
class StorageBackend:
    storage: Storage
    raw_files: Callable[[], list[str]]
    """Everything the adapter wrote, in and around its root, temp files too."""


def _local_backend(sandbox: Path) -> StorageBackend:
    root = sandbox / "root"
    root.mkdir(parents=True)

    def raw_files() -> list[str]:
        return sorted(
            path.relative_to(sandbox).as_posix()
            for path in _walk(sandbox)
            if not path.is_dir()
        )

    return StorageBackend(storage=LocalStorage(root), raw_files=raw_files)


def _walk(folder: Path) -> Iterator[Path]:
    for path in folder.iterdir():
        yield path
        if path.is_dir() and not path.is_symlink():
            yield from _walk(path)


# Storage: add "s3" here, with a StorageBackend on a fresh bucket prefix.
@pytest.fixture(params=["local"])
def storage_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StorageBackend:
    return _local_backend(tmp_path / "sandbox")


@pytest.fixture
def storage(storage_backend: StorageBackend) -> Storage:
    return storage_backend.storage
