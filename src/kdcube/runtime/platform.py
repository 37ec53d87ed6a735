"""The platform's parts for one process, opened together and closed together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from kdcube.bundles import BundleRegistry, default_registry, read_registry
from kdcube.bus import Bus
from kdcube.bus.memory import open_memory_bus
from kdcube.config import ConfigError, Settings
from kdcube.identity import DevAuthenticator
from kdcube.identity.model import Authenticator
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
    health: Health = field(default_factory=Health)


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
    """Open the embedded backends (the only ones this version has)."""
    if settings.redis_url is not None or settings.postgres_dsn is not None:
        raise ConfigError(
            "invalid KDCUBE_REDIS_URL/KDCUBE_POSTGRES_DSN: the Redis and Postgres"
            " backends are not available in this version; unset both"
        )

    registry = load_registry(settings)
    storage = open_storage(settings)
    authenticator = choose_authenticator(settings)
    database = settings.home / f"{settings.tenant}__{settings.project}.sqlite3"
    async with AsyncExitStack() as stack:
        bus = await stack.enter_async_context(
            open_memory_bus(
                retention_s=settings.relay_retention_s,
                max_events=settings.relay_max_events,
            )
        )
        store = await stack.enter_async_context(open_sqlite_store(database))
        await store.interrupt_unfinished()
        yield Platform(settings, bus, store, storage, registry, authenticator)
