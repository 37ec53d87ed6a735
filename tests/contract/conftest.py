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
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    nullcontext,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.lowlevel
import httpx
import pytest
import trio.testing
from botocore.credentials import Credentials

from kdcube.aws import Retry
from kdcube.bus.memory import open_memory_bus
from kdcube.bus.memory.relay import MemoryRelay
from kdcube.bus.ports import Queue, Relay, State
from kdcube.storage.local import LocalStorage
from kdcube.storage.ports import Storage
from kdcube.storage.s3 import MIN_PART_SIZE, S3Storage
from kdcube.store.ports import Store
from kdcube.store.sqlite import connect, open_sqlite_store
from tests.s3_server import S3Server

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
        _on_asyncio_driver(request) or wants_real_clock(request) or _on_storage(request)
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
    anonymous_reads: Callable[[], AbstractContextManager[None]] = nullcontext
    """Around a plain GET of a download URL (moto needs its checks off for it)."""


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


def _on_storage(request: pytest.FixtureRequest) -> bool:
    """Whether the test runs a storage adapter: S3's HTTP timeouts need real
    time, and the local adapter waits on worker threads, which an autojump
    clock turns into a busy loop that starves those very threads."""
    params = getattr(request.node, "callspec", None)
    return params is not None and "storage_backend" in params.params


@asynccontextmanager
async def _s3_backend(server: S3Server) -> AsyncIterator[StorageBackend]:
    """The S3 adapter on a fresh prefix of the shared bucket, emptied afterwards.

    Parts are as small as S3 allows and list pages hold three keys, so the
    contract's objects and listings span several of each.
    """
    sandbox = f"kdcube-test-{uuid.uuid4().hex[:12]}/"
    admin = server.client()
    async with httpx.AsyncClient() as client:
        storage = S3Storage(
            client,
            bucket=server.bucket,
            credentials=Credentials(server.access_key, server.secret_key),
            region=server.region,
            prefix=f"{sandbox}root/",
            endpoint_url=server.endpoint,
            part_size=MIN_PART_SIZE,
            list_page_size=3,
            retry=Retry(attempts=3, base_s=0.01),
        )
        try:
            yield StorageBackend(
                storage=storage,
                raw_files=lambda: _raw_s3_files(admin, server.bucket, sandbox),
                anonymous_reads=server.anonymous_reads,
            )
        finally:
            _empty_s3_prefix(admin, server.bucket, sandbox)


def _raw_s3_files(admin: Any, bucket: str, sandbox: str) -> list[str]:
    """Objects under the sandbox, and multipart uploads never completed."""
    found = []
    for page in admin.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=sandbox
    ):
        found += [
            item["Key"].removeprefix(sandbox) for item in page.get("Contents", [])
        ]
    uploads = admin.list_multipart_uploads(Bucket=bucket, Prefix=sandbox)
    found += [
        f"{upload['Key'].removeprefix(sandbox)} (upload {upload['UploadId']})"
        for upload in uploads.get("Uploads", [])
    ]
    return sorted(found)


def _empty_s3_prefix(admin: Any, bucket: str, sandbox: str) -> None:
    uploads = admin.list_multipart_uploads(Bucket=bucket, Prefix=sandbox)
    for upload in uploads.get("Uploads", []):
        admin.abort_multipart_upload(
            Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
        )
    for page in admin.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=sandbox
    ):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            admin.delete_objects(Bucket=bucket, Delete={"Objects": keys})


@pytest.fixture(params=["local", "s3"])
async def storage_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StorageBackend]:
    if request.param == "s3":
        async with _s3_backend(request.getfixturevalue("s3_server")) as backend:
            yield backend
        return

    yield _local_backend(tmp_path / "sandbox")


@pytest.fixture
def storage(storage_backend: StorageBackend) -> Storage:
    return storage_backend.storage


# Gateway stores: rate limiter, breaker store and config board, each opened
# twice on one shared state, as two processes of a deployment hold them.
# Redis keeps real time, and so do these tests on every adapter: their test
# modules run trio on the real clock (see their ``anyio_backend``).
# Imported here, with the block they serve.

from coredis import Redis  # noqa: E402

from kdcube.bus.redis.keys import KeyLayout  # noqa: E402
from kdcube.gateway import (  # noqa: E402
    BreakerStore,
    ConfigBoard,
    MemoryBreakerStore,
    MemoryConfigBoard,
    MemoryRateLimiter,
    RateLimiter,
    RedisBreakerStore,
    RedisConfigBoard,
    RedisRateLimiter,
    default_gateway_config,
)

from .redis_backend import REDIS_URL, delete_prefix, fresh_prefix  # noqa: E402


@dataclass(frozen=True)
class GatewayStores:
    rate_limiter: RateLimiter
    breaker_stores: tuple[BreakerStore, BreakerStore]
    boards: tuple[ConfigBoard, ConfigBoard]
    open_board: Callable[[], ConfigBoard]
    """One more board on the same state, as a process that starts later."""
    leftovers: Callable[[], Awaitable[int]]
    """How many rate-limit records are still held (Redis: keys, all with a TTL)."""
    corrupt_board: Callable[[], Awaitable[int]] | None
    """Store an invalid config document under a new version (Redis only)."""


GATEWAY_POLL_S = 0.05


def _memory_gateway() -> GatewayStores:
    limiter = MemoryRateLimiter()
    breakers = MemoryBreakerStore()
    board = MemoryConfigBoard(default_gateway_config())

    async def leftovers() -> int:
        await anyio.lowlevel.checkpoint()
        return limiter.tracked_sessions()

    return GatewayStores(
        rate_limiter=limiter,
        breaker_stores=(breakers, breakers),
        boards=(board, board),
        open_board=lambda: board,
        leftovers=leftovers,
        corrupt_board=None,
    )


@asynccontextmanager
async def _redis_gateway() -> AsyncIterator[GatewayStores]:
    prefix = fresh_prefix()
    keys = KeyLayout(prefix, "t", "p")

    def board(client: Redis[str]) -> ConfigBoard:
        return RedisConfigBoard(
            client, keys, default_gateway_config(), poll_s=GATEWAY_POLL_S
        )

    async def leftovers() -> int:
        found = [key async for key in first.scan_iter(match=f"{prefix}:*gw:rate-*")]
        for key in found:
            assert await first.pttl(key) > 0, f"{key} has no time to live"
        return len(found)

    async def corrupt_board() -> int:
        version = await first.hincrby(keys.gateway_config(), "version", 1)
        await first.hset(keys.gateway_config(), {"document": '{"profile": "nope"}'})
        return version

    try:
        async with (
            Redis.from_url(REDIS_URL, decode_responses=True) as first,
            Redis.from_url(REDIS_URL, decode_responses=True) as second,
        ):
            yield GatewayStores(
                rate_limiter=RedisRateLimiter(first, keys),
                breaker_stores=(
                    RedisBreakerStore(first, keys),
                    RedisBreakerStore(second, keys),
                ),
                boards=(board(first), board(second)),
                open_board=lambda: board(second),
                leftovers=leftovers,
                corrupt_board=corrupt_board,
            )
    finally:
        await delete_prefix(prefix)


@pytest.fixture(params=["memory", "redis"])
async def gateway_stores(
    request: pytest.FixtureRequest,
) -> AsyncIterator[GatewayStores]:
    if request.param == "redis":
        async with _redis_gateway() as stores:
            yield stores
        return

    yield _memory_gateway()


def real_clock_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """An ``anyio_backend`` on real clocks, for tests that share Redis's time."""
    if request.param == "trio":
        return "trio", {}
    return "asyncio", {"loop_factory": asyncio.SelectorEventLoop}
