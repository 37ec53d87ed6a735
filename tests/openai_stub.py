"""A small OpenAI-compatible chat-completions server for the assistant's tests.

It is a real HTTP server (an ASGI app on Hypercorn, port 0 on 127.0.0.1) run
inside the test's task group by ``open_openai_stub``. ``POST
/v1/chat/completions`` answers a ``stream: true`` request with the pieces of its
``Script`` as server-sent events in OpenAI's chunk format, and any other
request with the script's follow-up reply as one JSON completion. Every request
is recorded with its body and headers, and a client that leaves mid-stream sets
``disconnected``, which is how the tests see a cancelled turn close its
upstream connection.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio

from kdcube.asgi import Message, Receive, Send, serve_lifespan
from kdcube.runtime.http import hypercorn_config, serve_http

KEEPALIVE = ": keep-alive\n\n"
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


@dataclass
class Script:
    """What the stub answers; tests change it before the turn they drive."""

    pieces: Sequence[str] = ("Hello", ", ", "world.")
    thinking: Sequence[str] = ()
    delay_s: float = 0.0
    """A pause before each SSE frame."""
    hold_after: int | None = None
    """After this many chunks (thinking, then answer pieces) the stream stalls
    until the client leaves."""
    status: int = 200
    error_message: str = "The server had an error while processing your request."
    followups_reply: str = '["Why?", "How so?", "What next?"]'
    slice_bytes: int | None = 5
    """Write the stream in slices this small, cutting lines and characters."""


@dataclass(frozen=True)
class Request:
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def streamed(self) -> bool:
        return self.body.get("stream") is True


@dataclass
class OpenAIStub:
    script: Script = field(default_factory=Script)
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    disconnected: anyio.Event = field(default_factory=anyio.Event)
    """Set when a client left before its stream was finished."""
    disconnected_at: float | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return

        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if (scope["method"], scope["path"]) != ("POST", "/v1/chat/completions"):
            await respond_json(send, 404, {"error": {"message": "no such route"}})
            return

        request = Request(json.loads(body), headers)
        self.requests.append(request)
        if self.script.status >= 400:
            error = {"error": {"message": self.script.error_message, "type": "x"}}
            await respond_json(send, self.script.status, error)
        elif request.streamed:
            await self._stream(receive, send)
        else:
            await respond_json(send, 200, completion(self.script.followups_reply))

    async def _stream(self, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        finished = False
        async with anyio.create_task_group() as tasks:

            async def watch() -> None:
                await wait_disconnect(receive)
                if not finished:
                    self.disconnected_at = anyio.current_time()
                    self.disconnected.set()
                tasks.cancel_scope.cancel()

            tasks.start_soon(watch)
            await self._send_frames(send)
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            tasks.cancel_scope.cancel()

    async def _send_frames(self, send: Send) -> None:
        script = self.script
        await send_body(send, KEEPALIVE.encode())
        for index, frame in enumerate(frames(script)):
            if index == script.hold_after:
                await anyio.sleep_forever()
            if script.delay_s:
                await anyio.sleep(script.delay_s)
            for part in slices(frame.encode(), script.slice_bytes):
                await send_body(send, part)


async def send_body(send: Send, part: bytes) -> None:
    await send({"type": "http.response.body", "body": part, "more_body": True})


def frames(script: Script) -> list[str]:
    """The SSE frames of a script: one chunk per piece (thinking first), the
    finish, the usage, then ``[DONE]``."""
    deltas = [{"reasoning_content": text} for text in script.thinking]
    deltas += [{"content": text} for text in script.pieces]
    chunks = [chunk({"role": "assistant", **delta}) for delta in deltas]
    chunks.append(chunk({}, finish_reason="stop"))
    chunks.append({**chunk({}), "choices": [], "usage": USAGE})
    return [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "model": "stub-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def completion(content: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": content}
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "model": "stub-model",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": USAGE,
    }


def slices(data: bytes, size: int | None) -> list[bytes]:
    if not size:
        return [data]
    return [data[start : start + size] for start in range(0, len(data), size)]


async def read_body(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body)


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def respond_json(send: Send, status: int, body: Any) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


@asynccontextmanager
async def open_openai_stub(script: Script | None = None) -> AsyncIterator[OpenAIStub]:
    """Serve a stub until the block ends; its ``base_url`` goes into config."""
    stub = OpenAIStub(script or Script())
    shutdown = anyio.Event()
    config = hypercorn_config("127.0.0.1", 0)
    async with anyio.create_task_group() as tasks:
        urls = await tasks.start(partial(serve_http, stub, config, shutdown=shutdown))
        stub.url = urls[0]
        try:
            yield stub
        finally:
            shutdown.set()
