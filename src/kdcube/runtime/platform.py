"""The platform's parts for one process, opened together and closed together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import unquote, urlparse

from kdcube.bundles import BundleRegistry, default_registry, read_registry
from kdcube.bus import Bus
from kdcube.bus.memory import open_memory_bus
from kdcube.config import ConfigError, Settings
from kdcube.identity import DevAuthenticator
from kdcube.identity.model import Authenticator
from kdcube.runtime.dependencies import Dependency
from kdcube.runtime.health import Health
from kdcube.storage import Storage
from kdcube.storage.local import LocalStorage
from kdcube.store import Store
from kdcube.store.sqlite import open_sqlite_store


@dataclass
class Platform:
    settings: Settings
    bus: Bus
    store: Store
    storage: Storage
    registry: BundleRegistry
    authenticator: Authenticator
    bus_name: str
    store_name: str
    health: Health = field(default_factory=Health)

    def dependencies(self) -> list[Dependency]:
        """Services this process cannot work without, probed for ``/ready``."""
        if not self.bus.durable:
            return []  # in-process backends fail only with the process
        return [
            Dependency(self.bus_name, partial(self.bus.state.alive, "proc")),
            Dependency(self.store_name, self.store.ping),
        ]


def load_registry(settings: Settings) -> BundleRegistry:
    if settings.bundles is None:
        return default_registry()
    return read_registry(settings.bundles)


def open_storage(settings: Settings) -> Storage:
    url = urlparse(settings.storage_url())
    if url.scheme == "file":
        return LocalStorage(Path(unquote(url.path)))
    raise ConfigError(
        "invalid KDCUBE_STORAGE_PATH: S3 storage is not available in this version;"
        " use a file:// URL"
    )


def choose_authenticator(settings: Settings) -> Authenticator:
    if settings.auth in (None, "dev"):
        return DevAuthenticator()
    raise ConfigError(
        "invalid KDCUBE_AUTH: oidc is not available in this version; use dev"
    )


@asynccontextmanager
async def open_platform(settings: Settings) -> AsyncIterator[Platform]:
    """Open the backends: Redis and Postgres when both are configured, else
    the embedded ones (in-memory bus, SQLite)."""
    registry = load_registry(settings)
    storage = open_storage(settings)
    authenticator = choose_authenticator(settings)
    async with AsyncExitStack() as stack:
        if settings.distributed:
            bus, store = await _open_distributed(stack, settings)
            names = ("redis", "postgres")
        else:
            _refuse_half_distributed(settings)
            bus, store = await _open_embedded(stack, settings)
            names = ("memory", "sqlite")
        yield Platform(settings, bus, store, storage, registry, authenticator, *names)


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
