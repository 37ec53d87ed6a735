"""Flow control for request bodies that are streamed, not buffered.

Quart reads a request body as fast as the client sends it and keeps what its
handler has not consumed yet in memory. For a chat upload of many megabytes
whose consumer (storage and the virus scanner) is slower than the network,
that would hold most of the file. This ASGI middleware hands Quart the body
only as fast as the handler consumes it: once ``window`` bytes are waiting,
it stops receiving, and Hypercorn in turn stops reading the socket, so the
client is slowed down by TCP itself.

Only the requests ``applies_to`` selects are throttled; their handler must
report what it consumed through the ``BodyGate`` found in the ASGI scope.
Their ``Content-Length`` header is moved into the gate too, so that Quart does
not refuse a large upload against the limit meant for JSON bodies; the
handler checks the declared length against the upload limits itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

# ASGI's own types vary by server; these are as loose as the spec itself.
Scope = Any
Message = Any
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
AsgiApp = Callable[[Any, Any, Any], Awaitable[None]]

SCOPE_KEY = "kdcube.body_gate"
DEFAULT_WINDOW = 256 * 1024


class BodyGate:
    """Bytes received from the client but not yet consumed by the handler."""

    def __init__(self, window: int, declared_length: int | None) -> None:
        self.window = window
        self.declared_length = declared_length
        self._waiting = 0
        self._room = anyio.Event()

    def received(self, size: int) -> None:
        self._waiting += size

    def consumed(self, size: int) -> None:
        self._waiting = max(0, self._waiting - size)
        if self._waiting < self.window:
            self._room.set()

    async def wait_for_room(self) -> None:
        while self._waiting >= self.window:
            self._room = anyio.Event()
            await self._room.wait()


def gate_of(scope: Scope) -> BodyGate | None:
    gate = scope.get(SCOPE_KEY)
    return gate if isinstance(gate, BodyGate) else None


class StreamedBodies:
    """Wraps an ASGI app so that selected request bodies are flow-controlled."""

    def __init__(
        self,
        app: AsgiApp,
        applies_to: Callable[[Scope], bool],
        *,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self._app = app
        self._applies_to = applies_to
        self._window = window

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or not self._applies_to(scope):
            await self._app(scope, receive, send)
            return

        declared = _pop_content_length(scope)
        gate = BodyGate(self._window, declared)
        scope[SCOPE_KEY] = gate

        async def gated_receive() -> Message:
            await gate.wait_for_room()
            message = await receive()
            if message.get("type") == "http.request":
                gate.received(len(message.get("body", b"")))
            return message

        await self._app(scope, gated_receive, send)


def _pop_content_length(scope: Scope) -> int | None:
    headers: list[tuple[bytes, bytes]] = list(scope.get("headers", []))
    declared: int | None = None
    kept = []
    for name, value in headers:
        if name.lower() == b"content-length":
            declared = _as_length(value)
            continue
        kept.append((name, value))
    scope["headers"] = kept
    return declared


def _as_length(value: bytes) -> int | None:
    text = value.decode("latin-1").strip()
    return int(text) if text.isdigit() else None


def is_multipart_post(path: str) -> Callable[[Scope], bool]:
    """Select POSTs to ``path`` whose body is multipart/form-data."""

    def applies(scope: Scope) -> bool:
        if scope.get("method") != "POST" or scope.get("path") != path:
            return False
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-type":
                return bool(value.lower().startswith(b"multipart/form-data"))
        return False

    return applies
