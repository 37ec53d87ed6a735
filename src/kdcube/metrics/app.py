"""The metrics role over HTTP: a plain ASGI callable.

Routes: ``/metrics`` (Prometheus text: the bus, read now, plus this process),
``/metrics.json`` (the same reading with its windows), ``/health`` and
``/ready`` (left to ``fallback`` when there is one). In a process that is not
the metrics role (no ``BusMetrics``), ``/metrics`` holds this process's own
series only and there is no ``/metrics.json``. Any other request goes
to ``fallback`` (the ingress app in ``kdcube run``), or gets 404.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)

from kdcube.asgi import JSON, Asgi, Receive, Scope, Send, serve_lifespan
from kdcube.asgi import respond as _respond
from kdcube.metrics.collector import BusMetrics
from kdcube.runtime.health import Health

_JSON = JSON


def process_registry(bus_metrics: BusMetrics | None) -> CollectorRegistry:
    """This process's own metrics (CPU, memory, open files), and the bus
    metrics when given."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    if bus_metrics is not None:
        registry.register(bus_metrics)
    return registry


class MetricsApp:
    def __init__(
        self, metrics: BusMetrics | None, health: Health, *, fallback: Any = None
    ) -> None:
        """``fallback`` is an ASGI app (Quart's, typed by its own ASGI types)."""
        self._metrics = metrics
        self._health = health
        self._registry = process_registry(metrics)
        self._fallback: Asgi | None = fallback
        self._routes: dict[str, Callable[[], Awaitable[tuple[int, str, bytes]]]] = {
            "/metrics": self._prometheus
        }
        if metrics is not None:
            self._routes["/metrics.json"] = partial(self._json, metrics)
        if fallback is None:
            # Beside another app, that app answers for the process's health.
            self._routes |= {"/health": self._alive, "/ready": self._ready}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (
            self._routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        )
        if route is not None:
            if scope.get("method") not in ("GET", "HEAD"):
                await _respond(send, 405, _JSON, b'{"error":"method_not_allowed"}')
                return
            status, content_type, body = await route()
            await _respond(
                send, status, content_type, body, head=scope["method"] == "HEAD"
            )
        elif self._fallback is not None:
            await self._fallback(scope, receive, send)
        elif scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
        elif scope["type"] == "http":
            await _respond(send, 404, _JSON, b'{"error":"not_found"}')

    async def _prometheus(self) -> tuple[int, str, bytes]:
        if self._metrics is not None:
            await self._metrics.refresh()
        return 200, CONTENT_TYPE_PLAIN_0_0_4, generate_latest(self._registry)

    async def _json(self, metrics: BusMetrics) -> tuple[int, str, bytes]:
        await metrics.refresh()
        return 200, _JSON, json.dumps(metrics.report(), indent=2).encode()

    async def _alive(self) -> tuple[int, str, bytes]:
        return 200, _JSON, b'{"status":"ok"}'

    async def _ready(self) -> tuple[int, str, bytes]:
        status, body = self._health.readiness()
        return status, _JSON, json.dumps(body).encode()
