"""A live document shared by every process of a deployment: a versioned board.

An admin applies a validated document (the gateway config, the bundle
registry); the board stores it with a version that grows with every change,
and each process's ``watch`` loop takes the new version within about a
second. ``reset`` goes back to the baseline each process started with.

Redis keeps one hash per document: the version, the document text, who
applied it and when. Watchers poll the version every ``poll_s`` rather than
subscribe: one small read per half second per process is cheap, cannot miss a
message across a reconnect, and needs no connection held open. A document
that does not parse (written by hand, or by a newer kdcube) is logged and
never replaces the one in use.

Known shortcoming: processes started with different baselines return to
different documents on ``reset``.
"""

from __future__ import annotations

import time
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import anyio
import structlog
from anyio.abc import TaskStatus
from coredis import Redis

from kdcube.bus.ports import BusError
from kdcube.bus.redis.errors import maps_errors

log = structlog.get_logger("kdcube.board")

T = TypeVar("T")


class Codec(Protocol[T]):
    """How a document is read from its stored text and written back."""

    @property
    def topic(self) -> str:
        """What the document is, for logs (``gateway``, ``bundles``)."""

    def parse(self, text: str) -> T:
        """The document, or ValueError (or a subclass) naming what is wrong."""

    def dump(self, value: T) -> str: ...


POLL_S = 0.5
_READ_TIMEOUT_S = 5.0


class Board(Protocol[T]):
    """Where one live document is published, and read by every process."""

    @property
    def version(self) -> int:
        """The version of ``current()``; 0 until anything was applied."""

    def current(self) -> T: ...

    async def apply(self, config: T, *, actor: str | None = None) -> int:
        """Publish a validated document; returns its version, already current here."""

    async def reset(self, *, actor: str | None = None) -> int:
        """Publish the baseline again; returns its version."""

    async def wait_version(self, version: int) -> None:
        """Wait until this process runs ``version`` or a later one; the caller
        bounds the wait."""

    async def watch(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Keep ``current()`` up to date; started once the stored document is
        read (or found unreachable, in which case the baseline serves meanwhile)."""


class _Holder(Generic[T]):
    """The document a process runs, its version, and a signal for waiters."""

    def __init__(self, codec: Codec[T], baseline: T) -> None:
        self.codec = codec
        self.baseline = baseline
        self.config = baseline
        self.version = 0
        self._changed = anyio.Event()

    def take(self, version: int, config: T, *, older: bool = False) -> None:
        """Run ``config``; an older version only with ``older`` (the store's
        sequence started over, e.g. after Redis lost its data)."""
        if version == self.version or (version < self.version and not older):
            return

        self.version, self.config = version, config
        self._changed.set()
        self._changed = anyio.Event()
        log.info("board.applied", topic=self.codec.topic, version=version)

    async def wait_version(self, version: int) -> None:
        while self.version < version:
            await self._changed.wait()


class MemoryBoard(Generic[T]):
    """The embedded board: one process, so applying is taking."""

    def __init__(self, codec: Codec[T], baseline: T) -> None:
        self._holder = _Holder(codec, baseline)

    @property
    def version(self) -> int:
        return self._holder.version

    def current(self) -> T:
        return self._holder.config

    async def apply(self, config: T, *, actor: str | None = None) -> int:
        await anyio.lowlevel.checkpoint()
        self._holder.take(self._holder.version + 1, config)
        return self._holder.version

    async def reset(self, *, actor: str | None = None) -> int:
        return await self.apply(self._holder.baseline, actor=actor)

    async def wait_version(self, version: int) -> None:
        await self._holder.wait_version(version)

    async def watch(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        task_status.started()
        await anyio.sleep_forever()
        raise AssertionError("sleep_forever returned")


def _version(value: Any) -> int:
    return 0 if value is None else int(value)


class RedisBoard(Generic[T]):
    """The board of many processes: one Redis hash, polled by each."""

    def __init__(
        self,
        commands: Redis[str],
        key: str,
        codec: Codec[T],
        baseline: T,
        *,
        poll_s: float = POLL_S,
    ) -> None:
        self._redis = commands
        self._key = key
        self._codec = codec
        self._holder = _Holder(codec, baseline)
        self._poll_s = poll_s
        self._rejected = 0
        """The last stored version that failed validation, so it is logged once."""
        self._reachable = True

    @property
    def version(self) -> int:
        return self._holder.version

    def current(self) -> T:
        return self._holder.config

    @maps_errors("publish a live document")
    async def apply(self, config: T, *, actor: str | None = None) -> int:
        version = await self._publish({"document": self._codec.dump(config)}, actor)
        self._holder.take(version, config)
        return version

    @maps_errors("reset a live document")
    async def reset(self, *, actor: str | None = None) -> int:
        version = await self._publish({}, actor)
        self._holder.take(version, self._holder.baseline)
        return version

    async def wait_version(self, version: int) -> None:
        await self._holder.wait_version(version)

    @maps_errors("read a live document")
    async def refresh(self) -> None:
        """Take the stored document if it is newer than the one in use."""
        stored = await self._redis.hget(self._key, "version")
        version = _version(stored)
        if version in (self._holder.version, self._rejected):
            return

        stored_version, document = await self._redis.hmget(
            self._key, ["version", "document"]
        )
        self._take_stored(_version(stored_version), document)

    async def watch(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        await self._refresh_logged()
        task_status.started()
        while True:
            await anyio.sleep(self._poll_s)
            await self._refresh_logged()

    async def _publish(self, fields: dict[str, str], actor: str | None) -> int:
        # One transaction, so a reader never sees a new version with the old
        # document; without a document the version stands for the baseline.
        stamp = {"actor": actor or "", "applied_at": str(time.time())}
        async with self._redis.pipeline(transaction=True) as pipe:
            version = pipe.hincrby(self._key, "version", 1)
            if "document" not in fields:
                pipe.hdel(self._key, ["document"])
            pipe.hset(self._key, {**fields, **stamp})
        return await version

    def _take_stored(self, version: int, document: str | None) -> None:
        if document is None:
            self._holder.take(version, self._holder.baseline, older=True)
            return

        try:
            config = self._codec.parse(document)
        except ValueError as exc:
            self._rejected = version
            log.error(
                "board.rejected",
                topic=self._codec.topic,
                version=version,
                reason=str(exc),
            )
            return
        self._holder.take(version, config, older=True)

    async def _refresh_logged(self) -> None:
        try:
            with anyio.fail_after(_READ_TIMEOUT_S):
                await self.refresh()
        except (BusError, TimeoutError) as exc:
            if self._reachable:
                log.warning(
                    "board.unreachable", topic=self._codec.topic, error=str(exc)
                )
            self._reachable = False
            return

        if not self._reachable:
            log.info("board.reachable", topic=self._codec.topic)
        self._reachable = True
