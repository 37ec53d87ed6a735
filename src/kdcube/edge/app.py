"""The edge as one ASGI app: guard, route, pass through.

Every request is first checked against the client's token bucket and the
body size limit, then routed (``routes``): to a role (in this process, or
over HTTP through ``proxy``), to the web UI's files, or answered here
(health, readiness, the UI's configuration). Every answer gets the security
headers; the UI's pages also get a content security policy that lets them
load only their own files and talk only to their own origin.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from kdcube.asgi import (
    JSON,
    Asgi,
    Message,
    Receive,
    Scope,
    Send,
    error_body,
    respond,
    serve_lifespan,
)
from kdcube.edge.ratelimit import IpRateLimiter
from kdcube.edge.routes import Target, route
from kdcube.edge.static import StaticFiles

__all__ = ["EdgeApp", "EdgeOptions"]

log = structlog.get_logger("kdcube.edge")

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"strict-origin-when-cross-origin"),
]
_HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")
_UI_POLICY = (
    b"content-security-policy",
    b"default-src 'self'; img-src 'self' data: blob:; style-src 'self';"
    b" script-src 'self'; connect-src 'self'; frame-ancestors 'none';"
    b" base-uri 'none'; form-action 'self'",
)


@dataclass(frozen=True, slots=True)
class EdgeOptions:
    ui_dir: Path | None = None
    auth_mode: str = "dev"
    login_url: str | None = None
    rate_per_s: float | None = None
    """Requests per second per client IP; None lets every request through."""
    rate_burst: int = 100
    max_body_bytes: int = 32 * 1024 * 1024
    """The largest request body; uploads are the big ones (25 MB a message)."""


class EdgeApp:
    """``upstreams`` maps each role target to an ASGI app: the role itself in
    ``kdcube run``, an ``HttpUpstream`` in ``kdcube serve edge``. ``health``,
    when given, answers ``/health`` and ``/ready`` (the roles' own, in one
    process); else the edge answers for itself, not ready once ``draining``
    says so. ``lifespan`` receives the server's lifespan messages (the
    in-process roles' app needs its start-up)."""

    def __init__(
        self,
        options: EdgeOptions,
        upstreams: Mapping[Target, Asgi],
        *,
        health: Asgi | None = None,
        lifespan: Asgi | None = None,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self._options = options
        self._upstreams = dict(upstreams)
        self._health = health
        self._lifespan = lifespan
        self._draining = draining
        self._static = StaticFiles(options.ui_dir) if options.ui_dir else None
        self._limiter = (
            IpRateLimiter(
                options.rate_per_s, options.rate_burst, clock=anyio.current_time
            )
            if options.rate_per_s
            else None
        )
        self._config_json = json.dumps(
            {"auth": options.auth_mode, "login_url": options.login_url}
        ).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            if self._lifespan is not None:
                await self._lifespan(scope, receive, send)
            else:
                await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return

        target = route(scope["path"])
        send = self._with_headers(send, scope, target)
        if await self._refused(scope, target, send):
            return
        body = _LimitedBody(receive, self._options.max_body_bytes)
        response = _Started(send)
        await self._dispatch(scope, target, body.receive, response.send)
        if body.exceeded and not response.started:
            limit = self._options.max_body_bytes
            await respond(send, 413, JSON, _too_large(limit))

    async def _refused(self, scope: Scope, target: Target, send: Send) -> bool:
        if self._limiter is not None and target is not Target.EDGE:
            client = (scope.get("client") or ("unknown",))[0]
            wait_s = self._limiter.take(client)
            if wait_s > 0:
                retry_after = self._limiter.retry_after_s(wait_s)
                log.info("edge.rate_limited", client=client, retry_after_s=retry_after)
                body = {
                    "error": "rate_limited",
                    "detail": "too many requests from this address",
                    "retry_after": retry_after,
                }
                await respond(
                    send,
                    429,
                    JSON,
                    json.dumps(body).encode(),
                    headers=[(b"retry-after", str(retry_after).encode())],
                )
                return True
        declared = _content_length(scope)
        if declared is not None and declared > self._options.max_body_bytes:
            await respond(send, 413, JSON, _too_large(self._options.max_body_bytes))
            return True
        return False

    async def _dispatch(
        self, scope: Scope, target: Target, receive: Receive, send: Send
    ) -> None:
        if target is Target.EDGE:
            await self._answer_here(scope, receive, send)
            return
        if target is Target.UI and self._static is not None:
            await self._static(scope, send)
            return
        upstream = self._upstreams.get(target)
        if upstream is None:
            not_found = error_body("not_found", "nothing is served at this path")
            await respond(send, 404, JSON, not_found)
        else:
            await upstream(scope, receive, send)

    async def _answer_here(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/config.json":
            await respond(send, 200, JSON, self._config_json)
        elif self._health is not None:
            await self._health(scope, receive, send)
        elif path == "/ready" and self._draining():
            await respond(send, 503, JSON, b'{"status":"draining"}')
        else:
            await respond(send, 200, JSON, b'{"status":"ok"}')

    def _with_headers(self, send: Send, scope: Scope, target: Target) -> Send:
        extra = list(_SECURITY_HEADERS)
        if scope.get("scheme") == "https":
            extra.append(_HSTS)
        if target is Target.UI:
            extra.append(_UI_POLICY)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                added = [(n, v) for n, v in extra if n not in present]
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        return send_with_headers


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> bytes:
    return json.dumps(
        {
            "error": "request_entity_too_large",
            "detail": f"the body is over {limit} bytes",
        }
    ).encode()


class _LimitedBody:
    """The request's ``receive``, ended as a disconnect once a body without
    a declared length passes ``limit``: the role stops reading and drops it,
    and the edge answers 413 if the role had not answered yet."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._seen = 0
        self.exceeded = False

    async def receive(self) -> Message:
        if self.exceeded:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self._seen += len(message.get("body", b""))
            if self._seen > self._limit:
                log.info("edge.body_too_large", limit=self._limit)
                self.exceeded = True
                return {"type": "http.disconnect"}
        return message


class _Started:
    """``send`` that remembers whether the response has begun."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)
