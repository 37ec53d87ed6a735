"""An HTTP upstream for the tests that answers every request with what it
received (target and headers, as JSON), to check what a proxy sends on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream


@asynccontextmanager
async def mirror() -> AsyncIterator[str]:
    """An upstream that answers every request with its own path and headers,
    as JSON; yields its host:port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, _mirror_one)
        yield f"127.0.0.1:{port}"
        tasks.cancel_scope.cancel()


async def _mirror_one(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        reader = BufferedByteReceiveStream(stream)
        head = (await reader.receive_until(b"\r\n\r\n", 65536)).decode()
        request_line, *header_lines = head.split("\r\n")
        _, target, _ = request_line.split(" ")
        headers = dict(line.split(": ", 1) for line in header_lines)
        body = json.dumps(
            {"target": target, "headers": {k.lower(): v for k, v in headers.items()}}
        ).encode()
        await stream.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
