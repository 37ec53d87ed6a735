"""``kdcube serve edge``: the edge alone, in front of roles on other hosts.

Plain HTTP/1.1 and h2c by default; HTTP/1.1 and HTTP/2 over TLS with
``KDCUBE_TLS_CERT``/``KDCUBE_TLS_KEY``; HTTP/3 on the same port over UDP with
``KDCUBE_HTTP3=1`` (Hypercorn then announces it in ``Alt-Svc``). The first
SIGTERM makes ``/ready`` answer 503 and lets open requests finish within
Hypercorn's graceful timeout; a second one stops at once.
"""

from __future__ import annotations

import signal
from functools import partial
from typing import Any

import anyio
import httpx
import structlog
from anyio.abc import TaskStatus
from hypercorn.config import Config, Sockets
from hypercorn.middleware import ProxyFixMiddleware

from kdcube.asgi import Asgi
from kdcube.config import ConfigError, Settings
from kdcube.edge.app import EdgeApp, EdgeOptions
from kdcube.edge.http3 import Http3Supervisor
from kdcube.edge.proxy import HttpUpstream, upstream_client
from kdcube.edge.routes import Target
from kdcube.edge.static import default_ui_dir
from kdcube.runtime.http import hypercorn_config, serve_http

__all__ = ["edge_config", "edge_options", "serve_edge"]

log = structlog.get_logger("kdcube.edge")


def edge_options(settings: Settings, *, rate_limited: bool = True) -> EdgeOptions:
    login_url = settings.ui_login_url
    if login_url is None and settings.proxylogin_url is not None:
        login_url = "/auth/login"
    return EdgeOptions(
        ui_dir=settings.ui_dir or default_ui_dir(),
        auth_mode=settings.auth or "dev",
        login_url=login_url,
        rate_per_s=settings.edge_rate_per_s if rate_limited else None,
        rate_burst=settings.edge_rate_burst,
        max_body_bytes=settings.edge_max_body_bytes,
    )


def edge_config(settings: Settings, host: str, port: int) -> Config:
    config = hypercorn_config(host, port)
    if settings.tls_cert is not None and settings.tls_key is not None:
        config.certfile = str(settings.tls_cert)
        config.keyfile = str(settings.tls_key)
        if settings.http3:
            config.quic_bind = list(config.bind)
    return config


def _upstream_urls(settings: Settings) -> dict[Target, str]:
    urls = {
        Target.INGRESS: settings.ingress_url,
        Target.PROC: settings.proc_url,
        Target.METRICS: settings.metrics_url,
        Target.AUTH: _login_proxy(settings.proxylogin_url),
    }
    if urls[Target.INGRESS] is None:
        raise ConfigError(
            "missing KDCUBE_INGRESS_URL: kdcube serve edge passes chat requests to"
            " the ingress at that URL (e.g. http://ingress:8010)"
        )
    return {target: url for target, url in urls.items() if url is not None}


def _login_proxy(url: str | None) -> str | None:
    # The login proxy serves its API under /v1/, which the edge shows as /auth/.
    return None if url is None else url.rstrip("/") + "/v1"


class EdgeServer:
    """The edge over Hypercorn, stoppable the way the supervisor is: the
    first ``request_stop`` drains, a second one stops at once."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self._settings = settings
        self._host = host
        self._port = port
        self._urls = _upstream_urls(settings)
        self._stopping = anyio.Event()
        self._root: anyio.CancelScope | None = None
        self.http3 = Http3Supervisor()

    def request_stop(self) -> None:
        if self._stopping.is_set() and self._root is not None:
            self._root.cancel()
            return
        self._stopping.set()

    async def run(
        self, *, task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until stopped; reports the URLs once listening."""
        with anyio.CancelScope() as self._root:
            async with upstream_client() as client:
                app = self._app(client)
                config = edge_config(self._settings, self._host, self._port)
                await _serve(app, config, self._stopping, self.http3, task_status)

    def _app(self, client: httpx.AsyncClient) -> Any:
        upstreams: dict[Target, Asgi] = {}
        for target, url in self._urls.items():
            upstream = HttpUpstream(target.value, url, client)
            upstreams[target] = (
                _AuthPath(upstream) if target is Target.AUTH else upstream
            )
        app: Any = EdgeApp(
            edge_options(self._settings), upstreams, draining=self._stopping.is_set
        )
        hops = self._settings.edge_trusted_hops
        if hops:
            app = ProxyFixMiddleware(app, mode="legacy", trusted_hops=hops)
        return app


async def _serve(
    app: Any,
    config: Config,
    stopping: anyio.Event,
    http3: Http3Supervisor,
    task_status: TaskStatus[list[str]],
) -> None:
    """Serve until ``stopping`` is set and Hypercorn has closed gracefully.

    TCP (HTTP/1.1, HTTP/2) and QUIC (HTTP/3) run as separate Hypercorn
    workers on sockets bound once, so a crash of the QUIC side, which takes
    its whole worker down, leaves TCP serving while QUIC restarts.
    """
    sockets = config.create_sockets()
    tcp = Sockets(sockets.secure_sockets, sockets.insecure_sockets, [])
    async with anyio.create_task_group() as server:
        listening: list[str] = await server.start(
            partial(serve_http, app, config, shutdown=stopping, sockets=tcp)
        )
        for udp in sockets.quic_sockets:
            await server.start(http3.serve, app, config, udp, stopping)
        log.info("edge.ready", urls=listening, http3=bool(sockets.quic_sockets))
        task_status.started(listening)


async def serve_edge(
    settings: Settings,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The edge with signal handling, as the CLI runs it."""
    edge = EdgeServer(settings, host, port)
    async with anyio.create_task_group() as signals:
        signals.start_soon(_stop_on_signals, edge)
        async with anyio.create_task_group() as serving:
            task_status.started(await serving.start(edge.run))
        signals.cancel_scope.cancel()


async def _stop_on_signals(edge: EdgeServer) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("edge.signal", signal=signal.Signals(signum).name)
            edge.request_stop()


class _AuthPath:
    """Strips the edge's ``/auth`` prefix before the login proxy sees the path."""

    def __init__(self, upstream: HttpUpstream) -> None:
        self._upstream = upstream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"].removeprefix("/auth")
        raw = scope.get("raw_path") or scope["path"].encode()
        scope = {**scope, "path": path, "raw_path": raw.removeprefix(b"/auth")}
        await self._upstream(scope, receive, send)
