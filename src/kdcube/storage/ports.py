"""Contract of storage: blobs addressed by key, streamed in and out."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Protocol


class StorageError(Exception):
    """Base of every error storage raises."""


class ObjectNotFound(StorageError):
    """No object under that key."""


class StorageUnavailable(StorageError):
    """The backend could not be reached or kept failing; trying later may work."""


class AccessDenied(StorageError):
    """The backend refused the credentials or the operation; retrying won't help."""


class InvalidStorageUrl(StorageError, ValueError):
    """A storage URL with a scheme or shape no adapter opens."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int


class Storage(Protocol):
    async def put(self, key: str, body: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        """Write the whole object or nothing: readers never see a partial one."""

    def get(
        self, key: str, *, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """Stream bytes ``start`` to ``end`` (exclusive) of the object."""

    async def head(self, key: str) -> ObjectInfo:
        """Raises ObjectNotFound."""

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key."""

    async def delete(self, key: str) -> bool:
        """False when there was nothing to delete."""

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many."""

    async def download_url(self, key: str, *, expires_s: int) -> str | None:
        """A URL that serves the object's bytes to anyone for ``expires_s`` seconds.

        None means the adapter has no such URL and the caller serves the bytes
        itself. Whether the object exists is not checked.
        """
