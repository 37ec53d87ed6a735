"""A TCP peer on a free loopback port, for tests that need one which behaves
in one particular way."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


@asynccontextmanager
async def tcp_peer(handler: Handler) -> AsyncIterator[str]:
    """Run ``handler`` on every connection to 127.0.0.1 on a free port, until
    the block ends; yields that ``host:port``."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, handler)
        yield f"127.0.0.1:{port}"
        tasks.cancel_scope.cancel()
