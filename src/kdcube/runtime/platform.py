"""The platform's parts for one process, opened together and closed together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import structlog

from kdcube.bundles import BundleRegistry, default_registry, read_registry
from kdcube.bundles.live import RegistryCodec
from kdcube.bus import Bus
from kdcube.bus.board import Board, MemoryBoard, RedisBoard
from kdcube.bus.memory import open_memory_bus
from kdcube.bus.redis import RedisBus
from kdcube.config import ConfigError, Settings
from kdcube.exec import Executors, open_executors
from kdcube.gateway import (
    GatewayBackends,
    GatewayConfig,
    InvalidGatewayConfig,
    default_gateway_config,
    load_gateway_config,
    open_gateway_backends,
)
from kdcube.identity.factory import open_authenticator
from kdcube.identity.model import Authenticator
from kdcube.runtime.dependencies import Dependency
from kdcube.runtime.health import Health
from kdcube.storage import Storage, StorageError
from kdcube.storage.open import open_storage
from kdcube.store import Store
from kdcube.store.sqlite import open_sqlite_store
from kdcube.uploads import Scanner, ScannerConfigError, scanner_from

log = structlog.get_logger("kdcube.runtime")


@dataclass
class Platform:
    settings: Settings
    bus: Bus
    store: Store
    storage: Storage
    scanner: Scanner
    bundles: Board[BundleRegistry]
    """The live bundle registry; ``registry`` is what it says now."""
    authenticator: Authenticator
    gateway: GatewayBackends
    bus_name: str
    store_name: str
    executors: Executors
    """Where bundles run code (``KDCUBE_EXEC``, or the bundle's own choice)."""
    health: Health = field(default_factory=Health)

    @property
    def registry(self) -> BundleRegistry:
        return self.bundles.current()

    def dependencies(self) -> list[Dependency]:
        """Services this process cannot work without, probed for ``/ready``."""
        if not self.bus.durable:
            return []  # in-process backends fail only with the process
        return [
            Dependency(self.bus_name, partial(self.bus.state.alive, "proc")),
            Dependency(self.store_name, self.store.ping),
        ]


def registry_base(settings: Settings) -> Path:
    """Where relative bundle paths of an applied registry resolve from."""
    if settings.bundles is not None:
        return settings.bundles.resolve().parent
    return Path.cwd()


def registry_board(
    bus: Bus, baseline: BundleRegistry, base: Path
) -> Board[BundleRegistry]:
    codec = RegistryCodec(base)
    if isinstance(bus, RedisBus):
        return RedisBoard(bus.commands, bus.keys.bundle_registry(), codec, baseline)
    return MemoryBoard(codec, baseline)


def load_registry(settings: Settings) -> BundleRegistry:
    if settings.bundles is None:
        return default_registry()
    return read_registry(settings.bundles)


async def _open_storage(stack: AsyncExitStack, settings: Settings) -> Storage:
    try:
        return await stack.enter_async_context(
            open_storage(settings.storage_url(), endpoint_url=settings.s3_endpoint_url)
        )
    except StorageError as exc:
        raise ConfigError(f"invalid KDCUBE_STORAGE_PATH: {exc}") from None


def load_gateway_baseline(settings: Settings) -> GatewayConfig:
    """The gateway config this process starts from (``KDCUBE_GATEWAY_CONFIG``);
    a config applied live over the bus replaces it once read."""
    if settings.gateway_config is None:
        return default_gateway_config()
    try:
        return load_gateway_config(settings.gateway_config)
    except InvalidGatewayConfig as exc:
        raise ConfigError(f"invalid KDCUBE_GATEWAY_CONFIG: {exc}") from None


def choose_scanner(settings: Settings) -> Scanner:
    try:
        scanner = scanner_from(
            settings.clamd,
            policy=settings.clamd_policy,
            timeout_s=settings.clamd_timeout_s,
        )
    except ScannerConfigError as exc:
        raise ConfigError(
            f"invalid KDCUBE_CLAMD or KDCUBE_CLAMD_POLICY: {exc}"
        ) from None
    if scanner.policy == "off":
        log.warning("uploads.scanning_off", reason="no KDCUBE_CLAMD configured")
    else:
        log.info("uploads.scanning", clamd=settings.clamd, policy=scanner.policy)
    return scanner


@asynccontextmanager
async def open_platform(settings: Settings) -> AsyncIterator[Platform]:
    """Open the backends: Redis and Postgres when both are configured, else
    the embedded ones (in-memory bus, SQLite)."""
    registry = load_registry(settings)
    scanner = choose_scanner(settings)
    baseline = load_gateway_baseline(settings)
    async with AsyncExitStack() as stack:
        storage = await _open_storage(stack, settings)
        authenticator = await stack.enter_async_context(open_authenticator(settings))
        if settings.distributed:
            bus, store = await _open_distributed(stack, settings)
            names = ("redis", "postgres")
        else:
            _refuse_half_distributed(settings)
            bus, store = await _open_embedded(stack, settings)
            names = ("memory", "sqlite")
        gateway = await stack.enter_async_context(
            open_gateway_backends(bus, baseline, redis_url=settings.redis_url)
        )
        bundles = registry_board(bus, registry, registry_base(settings))
        executors = await stack.enter_async_context(open_executors(settings, storage))
        yield Platform(
            settings,
            bus,
            store,
            storage,
            scanner,
            bundles,
            authenticator,
            gateway,
            *names,
            executors=executors,
        )


async def _open_embedded(
    stack: AsyncExitStack, settings: Settings
) -> tuple[Bus, Store]:
    bus = await stack.enter_async_context(
        open_memory_bus(
            retention_s=settings.relay_retention_s,
            max_events=settings.relay_max_events,
        )
    )
    database = settings.home / f"{settings.tenant}__{settings.project}.sqlite3"
    store = await stack.enter_async_context(open_sqlite_store(database))
    # Alone on this database: whatever a previous process left unfinished
    # will never finish, and its queue died with it.
    await store.interrupt_unfinished()
    return bus, store


async def _open_distributed(
    stack: AsyncExitStack, settings: Settings
) -> tuple[Bus, Store]:
    # Imported here so the embedded mode never loads the asyncio bridge.
    from kdcube.bus.redis import open_redis_bus
    from kdcube.store.postgres import open_postgres_store

    assert settings.redis_url is not None and settings.postgres_dsn is not None
    bus = await stack.enter_async_context(
        open_redis_bus(
            settings.redis_url,
            tenant=settings.tenant,
            project=settings.project,
            retention_s=settings.relay_retention_s,
            max_events=settings.relay_max_events,
        )
    )
    store = await stack.enter_async_context(
        open_postgres_store(settings.postgres_dsn, schema=project_schema(settings))
    )
    return bus, store


def project_schema(settings: Settings) -> str:
    """One Postgres schema per tenant and project."""
    return (
        f"kdcube_{settings.tenant}_{settings.project}".lower()
        .replace("-", "_")
        .replace(".", "_")
    )


def _refuse_half_distributed(settings: Settings) -> None:
    if settings.redis_url is not None and settings.postgres_dsn is None:
        raise ConfigError(
            "invalid KDCUBE_POSTGRES_DSN: set it too, or unset KDCUBE_REDIS_URL"
        )
    if settings.postgres_dsn is not None and settings.redis_url is None:
        raise ConfigError(
            "invalid KDCUBE_REDIS_URL: set it too, or unset KDCUBE_POSTGRES_DSN"
        )
