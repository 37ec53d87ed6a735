"""HTTP/3 for the edge, kept up across crashes of Hypercorn's QUIC server.

With Hypercorn 0.18 and aioquic 1.7 on Trio, a QUIC connection whose client
fails mid-stream can make a timer callback raise (aioquic compares the time
with a close time that is None), and the exception ends the task serving the
UDP socket, and with it, inside one Hypercorn worker, the TCP listeners too.
The edge therefore serves QUIC apart from TCP, on a UDP socket bound once,
and restarts the QUIC server when it dies, after a pause that doubles with
each crash in a row (up to ``MAX_PAUSE_S``). Connections of the crashed
server are lost; their clients reconnect, over QUIC or TCP.

On asyncio, Hypercorn serves QUIC from a datagram protocol whose callback
errors the event loop logs and survives, so there the worker runs as is.

A client that closes its whole QUIC connection mid-stream is told to the app
only through a guard in ``kdcube.runtime.hypercorn_patch``.

Known shortcoming: this leans on Hypercorn's internal UDPServer and
WorkerContext on Trio, which a Hypercorn upgrade may move.
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import sniffio
import structlog
from anyio.abc import TaskStatus
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app

from kdcube.runtime.http import run_worker

__all__ = ["Http3Supervisor"]

log = structlog.get_logger("kdcube.edge")


class Http3Supervisor:
    FIRST_PAUSE_S = 0.1
    MAX_PAUSE_S = 5.0
    HEALTHY_AFTER_S = 30.0
    """A server that ran this long before crashing resets the pause."""

    def __init__(self) -> None:
        self.restarts = 0

    async def serve(
        self,
        app: Any,
        config: Config,
        udp: socket.socket,
        stopping: anyio.Event,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve HTTP/3 on ``udp`` until ``stopping``; closes ``udp``."""
        wrapped = wrap_app(app, config.wsgi_max_body_size, None)
        pause_s = self.FIRST_PAUSE_S
        try:
            task_status.started()
            while not stopping.is_set():
                started_at = anyio.current_time()
                try:
                    await _serve_quic(wrapped, config, udp, stopping)
                except Exception as exc:
                    if anyio.current_time() - started_at > self.HEALTHY_AFTER_S:
                        pause_s = self.FIRST_PAUSE_S
                    self.restarts += 1
                    log.error(
                        "edge.http3_restarted",
                        error=repr(exc),
                        restarts=self.restarts,
                        pause_s=pause_s,
                    )
                    with anyio.move_on_after(pause_s):
                        await stopping.wait()
                    pause_s = min(pause_s * 2, self.MAX_PAUSE_S)
        finally:
            udp.close()


async def _serve_quic(
    wrapped: Any, config: Config, udp: socket.socket, stopping: anyio.Event
) -> None:
    if sniffio.current_async_library() != "trio":
        await run_worker(wrapped, config, Sockets([], [], [udp]), stopping)
        return

    # Hypercorn's Trio worker refuses to run without a TCP listener, so the
    # UDP server runs here, the way that worker would run it.
    import trio
    from hypercorn.trio.udp_server import UDPServer
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.typing import ConnectionState

    context = WorkerContext(None)
    server = UDPServer(wrapped, config, context, ConnectionState({}), udp)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await stopping.wait()
        await context.terminated.set()
        # The server notices the end only when a datagram arrives; open
        # connections get the graceful timeout, then everything is cancelled.
        nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
