"""Taking in a message's files: typed, size-capped, scanned and stored as they stream.

Each file goes to storage and to the virus scanner at the same time, chunk by
chunk, so no file is ever held whole in memory. A file that turns out too
large, of a type not allowed, or infected is refused, and every file stored
for the turn so far is deleted: a message is accepted with all its files or
not at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from kdcube.gateway import CircuitBreaker, CircuitOpen
from kdcube.groups import sole_exception
from kdcube.storage import Storage
from kdcube.storage.layout import safe_file_name, unique_name
from kdcube.uploads.filetypes import HEAD_BYTES, FileType, Rejected, classify
from kdcube.uploads.scanner import NoScanner, Scanner, Verdict
from kdcube.wire.errors import ApiError

log = structlog.get_logger("kdcube.uploads")

_PIPE_CHUNKS = 4
_CLEANUP_S = 10.0


@dataclass(frozen=True, slots=True)
class StoredFile:
    name: str
    mime: str
    size: int
    scan: str

    def record(self) -> dict[str, Any]:
        """The file as listed on its turn."""
        return {
            "name": self.name,
            "mime": self.mime,
            "size": self.size,
            "scan": self.scan,
        }


def too_large(detail: str) -> ApiError:
    return ApiError(413, "request_entity_too_large", detail)


def rejected(name: str, reason: str) -> ApiError:
    return ApiError(400, "attachment_rejected", f"{name}: {reason}")


class Intake:
    """The files of one message, stored under the turn's folder ``prefix``."""

    def __init__(
        self,
        storage: Storage,
        scanner: Scanner,
        prefix: str,
        *,
        budget: int,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._storage = storage
        self._scanner = scanner
        self._breaker = breaker
        self._prefix = prefix
        self._budget = budget
        self._names: set[str] = set()
        self.files: list[StoredFile] = []

    @property
    def budget_left(self) -> int:
        return self._budget

    def charge(self, size: int, what: str) -> None:
        """Spend ``size`` bytes of the message's budget, or refuse with 413."""
        self._budget -= size
        if self._budget < 0:
            raise too_large(f"{what} makes the message larger than allowed.")

    async def take(
        self, client_name: str | None, chunks: AsyncIterator[bytes]
    ) -> StoredFile:
        """Store one file, or raise the ApiError that refuses the message."""
        name = unique_name(safe_file_name(client_name), self._names)
        head, more = await _read_head(chunks)
        if not head:
            raise rejected(name, "the file is empty")
        try:
            file_type = classify(head, client_name or name, complete=not more)
        except Rejected as exc:
            raise rejected(name, str(exc)) from None

        self._names.add(name)
        size, verdict = await self._store(name, file_type, head, chunks, more)
        if not verdict.passed:
            await self._delete(self._prefix + name)
            raise rejected(name, verdict.reason)

        scan = verdict.label
        stored = StoredFile(name, file_type.mime, size, scan)
        self.files.append(stored)
        log.info("upload.stored", name=name, mime=file_type.mime, size=size, scan=scan)
        return stored

    async def _store(
        self,
        name: str,
        file_type: FileType,
        head: bytes,
        chunks: AsyncIterator[bytes],
        more: bool,
    ) -> tuple[int, Verdict]:
        """Store and scan under the clamd breaker: failures of clamd itself
        open it, and while it is open a ``required`` scan is refused at once
        (CircuitOpen, a 503) and a ``best_effort`` one is skipped."""
        file = _Upload(name, file_type, head, chunks, more)
        if self._breaker is None or self._scanner.policy == "off":
            return await self._store_and_scan(file, self._scanner)

        try:
            async with self._breaker.guard(failures=(_ScannerFault,)):
                size, verdict = await self._store_and_scan(file, self._scanner)
                if verdict.scanner_fault:
                    raise _ScannerFault(size, verdict)
                return size, verdict
        except _ScannerFault as fault:
            return fault.size, fault.verdict
        except CircuitOpen:
            if self._scanner.policy != "best_effort":
                raise
            log.warning("upload.scan_skipped", name=name, reason="clamd breaker open")
            size, _ = await self._store_and_scan(file, NoScanner())
            return size, Verdict(
                "failed", passed=True, detail="clamd is failing", scanner_fault=True
            )

    async def _store_and_scan(
        self, file: _Upload, scanner: Scanner
    ) -> tuple[int, Verdict]:
        key = self._prefix + file.name
        send, receive = anyio.create_memory_object_stream[bytes](_PIPE_CHUNKS)
        size = 0

        async def body() -> AsyncIterator[bytes]:
            async with receive:
                async for chunk in receive:
                    yield chunk

        try:
            async with (
                scanner.scan(file.name) as scan,
                anyio.create_task_group() as tasks,
            ):
                tasks.start_soon(self._storage.put, key, body())
                async with send:
                    async for chunk in file.chunks():
                        size += len(chunk)
                        self._check_size(file.name, file.file_type, size)
                        self.charge(len(chunk), file.name)
                        await scan.feed(chunk)
                        await send.send(chunk)
                verdict = await scan.verdict()
        except BaseExceptionGroup as group:
            sole = sole_exception(group)
            raise (sole or group) from None

        return size, verdict

    def _check_size(self, name: str, file_type: FileType, size: int) -> None:
        if size > file_type.max_bytes:
            raise too_large(
                f"{name} is larger than {file_type.max_bytes // (1024 * 1024)} MB,"
                f" the limit for {file_type.mime}."
            )

    async def _delete(self, key: str) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_S):
            await self._storage.delete(key)

    async def discard(self) -> None:
        """Delete every file stored for this message (a refused message)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_S) as scope:
            removed = await self._storage.delete_prefix(self._prefix)
            log.info("upload.discarded", prefix=self._prefix, removed=removed)
        if scope.cancelled_caught:
            # The files stay until the next cleanup of this prefix; the turn
            # that would have listed them was never recorded.
            log.warning("upload.discard_timed_out", prefix=self._prefix)


@dataclass(slots=True)
class _Upload:
    """One file part: its first bytes, already read, and the rest to come."""

    name: str
    file_type: FileType
    head: bytes
    rest: AsyncIterator[bytes]
    more: bool

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.head
        if self.more:
            async for chunk in self.rest:
                yield chunk


class _ScannerFault(Exception):
    """clamd failed on a file; counted by the breaker, not raised further."""

    def __init__(self, size: int, verdict: Verdict) -> None:
        super().__init__(verdict.detail)
        self.size = size
        self.verdict = verdict


async def _read_head(chunks: AsyncIterator[bytes]) -> tuple[bytes, bool]:
    """The first bytes of a file, enough to tell its type; and whether more follow."""
    head = bytearray()
    async for chunk in chunks:
        head += chunk
        if len(head) >= HEAD_BYTES:
            return bytes(head), True
    return bytes(head), False
