"""An HTTP upstream for the tests that answers every request with what it
received (target and headers, as JSON), to check what a proxy sends on."""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager

import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.loopback import tcp_peer


def mirror() -> AbstractAsyncContextManager[str]:
    """An upstream that answers every request with its own path and headers,
    as JSON; yields its host:port."""
    return tcp_peer(_mirror_one)


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
