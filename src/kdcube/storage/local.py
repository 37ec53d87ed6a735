"""Storage on the local file system, with atomic writes (temp file + rename)."""

from __future__ import annotations

import builtins
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import anyio.to_thread

from kdcube.storage.keys import check_key
from kdcube.storage.ports import ObjectInfo, ObjectNotFound, StorageError

_CHUNK = 256 * 1024


class LocalStorage:
    """Objects are files under ``root``.

    Writes go to a sibling folder ``<root>.partial`` first and are renamed
    into place, so a reader never sees half an object and no key name is
    reserved for temp files. Being a sibling keeps it on the same file system,
    where a rename is atomic.
    """

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()
        self._partial = self._root.with_name(f"{self._root.name}.partial")

    def _path(self, key: str, *, prefix: bool = False) -> Path:
        return self._root / check_key(key, prefix=prefix)

    async def put(self, key: str, body: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        target = self._path(key)
        temp = anyio.Path(self._partial / uuid.uuid4().hex)
        size = 0
        try:
            with _file_system_errors(key):
                await anyio.Path(self._partial).mkdir(parents=True, exist_ok=True)
                out = await anyio.open_file(temp, "wb")
            async with out:
                chunks = [body] if isinstance(body, bytes) else body
                async for chunk in _as_async(chunks):
                    with _file_system_errors(key):
                        await out.write(chunk)
                    size += len(chunk)
            with _file_system_errors(key):
                await anyio.Path(target.parent).mkdir(parents=True, exist_ok=True)
                await temp.rename(target)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await temp.unlink(missing_ok=True)
            raise

        return ObjectInfo(key, size)

    async def get(
        self, key: str, *, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await anyio.open_file(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

        async with handle:
            await handle.seek(start)
            remaining = None if end is None else max(0, end - start)
            while remaining is None or remaining > 0:
                size = _CHUNK if remaining is None else min(_CHUNK, remaining)
                chunk = await handle.read(size)
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    async def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            stat = await anyio.Path(path).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        if not path.is_file():
            raise ObjectNotFound(key)
        return ObjectInfo(key, stat.st_size)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        check_key(prefix, prefix=True)
        return await anyio.to_thread.run_sync(self._list, prefix)

    async def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            await anyio.Path(path).unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        return True

    async def delete_prefix(self, prefix: str) -> int:
        found = await self.list(prefix)
        for info in found:
            await self.delete(info.key)
        return len(found)

    async def download_url(self, key: str, *, expires_s: int) -> str | None:
        # A file path is no URL a browser may fetch: the caller streams it.
        self._path(key)
        return None

    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        # Walk only the deepest folder the prefix names, then filter by name.
        folder = self._root / prefix.rpartition("/")[0]
        found = []
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                path = Path(dirpath) / name
                key = path.relative_to(self._root).as_posix()
                if key.startswith(prefix):
                    found.append(ObjectInfo(key, path.stat().st_size))
        return sorted(found, key=lambda info: info.key)


@contextmanager
def _file_system_errors(key: str) -> Iterator[None]:
    """Our file system's errors become StorageError; the body's pass as they are."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot write {key!r}: {exc.strerror or exc}") from exc


async def _as_async(
    chunks: list[bytes] | AsyncIterable[bytes],
) -> AsyncIterator[bytes]:
    if isinstance(chunks, list):
        for chunk in chunks:
            yield chunk
    else:
        async for chunk in chunks:
            yield chunk
