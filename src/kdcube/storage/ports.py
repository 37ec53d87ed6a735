"""Contract of storage: blobs addressed by key, streamed in and out."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Protocol


class StorageError(Exception):
    """Base of every error storage raises."""


class ObjectNotFound(StorageError):
    """No object under that key."""


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
