"""A guard around one race in Hypercorn's Trio TCP server (0.18).

When a client drops a connection in the middle of a request body after the
app has answered, two tasks of the connection write to the socket at once:
the reader sends an error response for the cut body while the app's side is
closing the socket (``send_eof``, which Hypercorn does outside its send
lock). Trio refuses the second writer with ``BusyResourceError``, which
Hypercorn does not expect there; it escapes the connection's task and stops
the whole worker, every other connection included. It was seen here when the
edge cut an upload that was over its limit.

The guard treats that refusal as what it means, a connection already being
closed, exactly as Hypercorn treats a broken one. It is installed once, from
``kdcube.runtime.http``, and only wraps the one method.
"""

from __future__ import annotations

import functools
from typing import Any

import structlog

__all__ = ["guard_tcp_send"]

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
