"""Open SSE streams: each tails its session's relay from a cursor.

A stream holds no task and no queue of its own: it is a loop inside the
request's handler that reads the relay after its cursor. Closing the client
connection cancels that handler, which frees everything at once. The hub only
keeps a handle per stream so that drain can end them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import anyio
import structlog

from kdcube.bus import BusUnavailable, Relay, RelayRead
from kdcube.wire import sse
from kdcube.wire.events import Route, iso, now_ms

log = structlog.get_logger("kdcube.ingress")


@dataclass(eq=False, slots=True)
class _OpenStream:
    closing: bool = False
    relay_lost: bool = False
    read_scope: anyio.CancelScope | None = None

    def close(self) -> None:
        self.closing = True
        if self.read_scope is not None:
            self.read_scope.cancel()


@dataclass(frozen=True, slots=True)
class StreamStart:
    session_id: str
    stream_id: str
    cursor: str
    ready: Mapping[str, object]


@dataclass
class StreamHub:
    relay: Relay
    keepalive_s: float
    _open: set[_OpenStream] = field(default_factory=set)
    _closed_one: anyio.Event = field(default_factory=anyio.Event)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def connections(self) -> int:
        return len(self._open)

    async def wait_change(self) -> None:
        """Return once a stream opened or closed after this call began."""
        await self._changed.wait()

    def _note_change(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def close_all(self) -> None:
        """Ask every stream to flush what it has, say goodbye and end."""
        for stream in self._open:
            stream.close()

    async def wait_all_closed(self) -> None:
        while self._open:
            await self._closed_one.wait()

    async def frames(self, start: StreamStart) -> AsyncIterator[bytes]:
        stream = _OpenStream()
        self._open.add(stream)
        self._note_change()
        opened_at = anyio.current_time()
        sent = 0
        try:
            yield sse.frame(Route.READY, sse.dumps(start.ready), start.cursor)
            cursor = start.cursor
            while not stream.closing:
                read = None
                with anyio.CancelScope() as stream.read_scope:
                    read = await self._read(stream, start, cursor, self.keepalive_s)
                stream.read_scope = None
                if read is None:
                    break
                cursor = read.cursor
                sent += len(read.events)
                yield _encode(read) or sse.KEEPALIVE

            if stream.relay_lost:
                # Ending the response makes the client reconnect with its
                # Last-Event-ID, here or on another replica, once the relay
                # answers again: nothing is lost, only delayed.
                return
            last = await self._read(stream, start, cursor, 0)
            if last is not None:
                yield _encode(last)
            yield sse.frame_obj(
                Route.SERVER_SHUTDOWN,
                {
                    "reason": "draining",
                    "timestamp": iso(now_ms()),
                    "session_id": start.session_id,
                    "stream_id": start.stream_id,
                },
            )
        finally:
            self._open.discard(stream)
            self._note_change()
            self._closed_one.set()
            self._closed_one = anyio.Event()
            log.info(
                "sse.closed",
                stream_id=start.stream_id,
                events=sent,
                seconds=round(anyio.current_time() - opened_at, 3),
            )

    async def _read(
        self, stream: _OpenStream, start: StreamStart, cursor: str, timeout_s: float
    ) -> RelayRead | None:
        try:
            return await self.relay.read(
                start.session_id, cursor, stream_id=start.stream_id, timeout_s=timeout_s
            )
        except BusUnavailable as exc:
            log.warning(
                "sse.relay_unavailable", stream_id=start.stream_id, error=str(exc)
            )
            stream.relay_lost = stream.closing = True
            return None


def _encode(read: RelayRead) -> bytes:
    frames = [sse.frame(e.route, e.data_json, e.id) for e in read.events]
    if read.gap:
        notice = {
            "type": "stream.gap",
            "timestamp": iso(now_ms()),
            "data": {"detail": "Some events after Last-Event-ID are no longer kept."},
        }
        frames.insert(0, sse.frame_obj(Route.CHAT_SERVICE, notice))
    return b"".join(frames)
