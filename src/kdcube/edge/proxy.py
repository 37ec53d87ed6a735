"""Passing a request through to a role over HTTP, streaming both ways.

The request body goes upstream as it arrives and the answer comes back chunk
by chunk, so uploads are never held whole and SSE events are not delayed.
The upstream leg is HTTP/1.1 on purpose: closing an HTTP/1.1 response closes
its connection, which the role sees at once, while httpx's HTTP/2 client
leaves an abandoned stream open upstream.

A plain ASGI app is not cancelled when its client goes away; it is told with
``http.disconnect``. One task therefore reads the client's side for the whole
exchange: it feeds the body upstream, then waits for that message and cancels
the exchange, so a dropped browser closes the upstream request within
milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import httpx
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from kdcube.asgi import JSON, Receive, Scope, Send, respond

__all__ = ["HttpUpstream", "upstream_client"]

log = structlog.get_logger("kdcube.edge")

# Connection-level headers belong to one hop (RFC 9110, section 7.6.1).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
# SSE streams stay open for minutes between events only when keepalives
# flow; ten silent minutes mean the role is gone.
UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=10.0)


def upstream_client() -> httpx.AsyncClient:
    """The client every HTTP upstream shares; the caller closes it."""
    return httpx.AsyncClient(
        http1=True,
        http2=False,
        timeout=UPSTREAM_TIMEOUT,
        # Every open SSE stream holds a connection for its whole life.
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
        follow_redirects=False,
        trust_env=False,
    )


class HttpUpstream:
    """An ASGI app that forwards each request to ``base_url``."""

    def __init__(self, name: str, base_url: str, client: httpx.AsyncClient) -> None:
        self._name = name
        self._base = base_url.rstrip("/")
        self._client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks_in, chunks_out = anyio.create_memory_object_stream[bytes](1)
        async with anyio.create_task_group() as exchange:
            exchange.start_soon(_read_client, receive, chunks_in, exchange.cancel_scope)
            await self._forward(scope, chunks_out, send)
            exchange.cancel_scope.cancel()

    async def _forward(
        self, scope: Scope, body: MemoryObjectReceiveStream[bytes], send: Send
    ) -> None:
        request = self._client.build_request(
            scope["method"],
            self._url(scope),
            headers=_request_headers(scope),
            content=_body(body) if _has_body(scope) else None,
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            await self._refuse(send, 504, "upstream_timeout", exc)
            return
        except httpx.HTTPError as exc:
            await self._refuse(send, 502, "upstream_unavailable", exc)
            return

        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": _response_headers(response),
                }
            )
            async for chunk in response.aiter_raw():
                await send(
                    {"type": "http.response.body", "body": chunk, "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
        except httpx.HTTPError as exc:
            # Too late for a status: ending without the last body message makes
            # the server drop the connection, which the client sees as a cut.
            log.warning("edge.upstream_broke", upstream=self._name, error=str(exc))
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    def _url(self, scope: Scope) -> str:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        url = self._base + raw_path.decode("latin-1")
        return f"{url}?{query.decode('latin-1')}" if query else url

    async def _refuse(self, send: Send, status: int, code: str, exc: Exception) -> None:
        log.warning(
            "edge.upstream_failed", upstream=self._name, code=code, error=str(exc)
        )
        body = {"error": code, "detail": f"the {self._name} service did not answer"}
        await respond(
            send,
            status,
            JSON,
            json.dumps(body).encode(),
            headers=[(b"retry-after", b"1")],
        )


async def _read_client(
    receive: Receive, body: MemoryObjectSendStream[bytes], exchange: anyio.CancelScope
) -> None:
    """Feed the request body upstream, then wait for the client to leave."""
    async with body:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                exchange.cancel()
                return
            chunk = message.get("body", b"")
            if chunk:
                try:
                    await body.send(chunk)
                except anyio.BrokenResourceError:
                    pass  # The upstream answered without reading the rest.
            if not message.get("more_body", False):
                break
    while (await receive())["type"] != "http.disconnect":
        pass
    exchange.cancel()


async def _body(chunks: MemoryObjectReceiveStream[bytes]) -> AsyncIterator[bytes]:
    async with chunks:
        async for chunk in chunks:
            yield chunk


def _has_body(scope: Scope) -> bool:
    names = {name.lower() for name, _ in scope["headers"]}
    return b"content-length" in names or b"transfer-encoding" in names


def _request_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    headers = [
        (name, value)
        for name, value in scope["headers"]
        if name.lower().decode("latin-1") not in _HOP_BY_HOP
        and not name.lower().startswith(b"x-forwarded-")
    ]
    host = dict((n.lower(), v) for n, v in scope["headers"]).get(b"host")
    client = scope.get("client")
    if client:
        headers.append((b"x-forwarded-for", client[0].encode()))
    if host:
        headers.append((b"x-forwarded-host", host))
    headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
    return headers


def _response_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [
        (name, value)
        for name, value in response.headers.raw
        if name.lower().decode("latin-1") not in _HOP_BY_HOP
    ]
