"""ASGI types and the few responses that plain ASGI apps here share.

The metrics app, the edge and the test stand-ins speak ASGI directly rather
than through a framework: they route a handful of paths or pass whole
requests through, where a framework's per-request work would be pure cost.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = "application/json"


async def respond(
    send: Send,
    status: int,
    content_type: str,
    body: bytes,
    *,
    head: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A whole response in one body message, never cached."""
    all_headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *(headers or []),
    ]
    await send(
        {"type": "http.response.start", "status": status, "headers": all_headers}
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


def error_body(code: str, detail: str) -> bytes:
    """PROTOCOL.md's error shape: a stable code and a sentence for people."""
    return json.dumps({"error": code, "detail": detail}).encode()


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI server's lifespan messages for an app that needs no
    start-up or shutdown of its own."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
