"""Two guards around Hypercorn 0.18, each wrapping one method.

``guard_tcp_send``: a race in the Trio TCP server. When a client drops a
connection in the middle of a request body after the app has answered, two
tasks of the connection write to the socket at once: the reader sends an
error response for the cut body while the app's side is closing the socket
(``send_eof``, which Hypercorn does outside its send lock). Trio refuses the
second writer with ``BusyResourceError``, which Hypercorn does not expect
there; it escapes the connection's task and stops the whole worker, every
other connection included. It was seen when the edge cut an upload that was
over its limit. The guard treats that refusal as what it means, a connection
already being closed, as Hypercorn treats a broken one.

``guard_h3_close``: an HTTP/3 client that closes its QUIC connection (rather
than resetting each stream) is never told to the app: Hypercorn drops the
connection without closing its streams, so an SSE stream, and the upstream
request the edge holds for it, would stay open until the role ended it. The
guard closes every stream of a terminated connection, which the app sees as
``http.disconnect``.

Both are installed once, from ``kdcube.runtime.http``.
"""

from __future__ import annotations

import functools
from typing import Any

import structlog

__all__ = ["guard_h3_close", "guard_tcp_send"]

log = structlog.get_logger("kdcube.http")


def guard_tcp_send() -> None:
    try:
        import trio
        from hypercorn.events import Closed
        from hypercorn.trio.tcp_server import TCPServer
    except ImportError:  # No Trio worker to guard.
        return
    original = TCPServer.protocol_send
    if getattr(original, "kdcube_guarded", False):
        return

    @functools.wraps(original)
    async def protocol_send(self: Any, event: Any) -> None:
        try:
            await original(self, event)
        except trio.BusyResourceError:
            log.info("http.send_during_close")
            await self.protocol.handle(Closed())

    protocol_send.kdcube_guarded = True  # type: ignore[attr-defined]
    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]


def guard_h3_close() -> None:
    try:
        from aioquic.quic.events import ConnectionTerminated
        from hypercorn.protocol.events import StreamClosed
        from hypercorn.protocol.h3 import H3Protocol
    except ImportError:  # No HTTP/3 support installed.
        return
    original = H3Protocol.handle
    if getattr(original, "kdcube_guarded", False):
        return

    @functools.wraps(original)
    async def handle(self: Any, quic_event: Any) -> None:
        await original(self, quic_event)
        if isinstance(quic_event, ConnectionTerminated) and self.streams:
            # This may run in the connection's timer task, which Hypercorn
            # stops on this very event, so the closing runs apart from it.
            streams = list(self.streams.items())
            self.task_group.spawn(_close_streams, streams, StreamClosed)

    handle.kdcube_guarded = True  # type: ignore[attr-defined]
    H3Protocol.handle = handle  # type: ignore[method-assign]


async def _close_streams(streams: list[tuple[int, Any]], closed: Any) -> None:
    for stream_id, stream in streams:
        await stream.handle(closed(stream_id=stream_id))
