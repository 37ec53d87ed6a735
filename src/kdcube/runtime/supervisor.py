"""One root task group per process: start the roles, drain them on stop.

Stop is two-staged. The first request drains: readiness turns 503, intake
stops, running turns get ``KDCUBE_DRAIN_TIMEOUT_S`` to finish and are then
cancelled with their terminal events, and only then do the SSE streams end
with ``server_shutdown`` (so they carry those terminal events out). A second
request cancels everything at once.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Any

import anyio
import sniffio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from kdcube.bundles.git import GitBundles
from kdcube.bundles.live import LoadedBundles
from kdcube.config import Settings
from kdcube.edge import EdgeApp, EdgeOptions, Target
from kdcube.ingress import StreamHub, create_ingress_app
from kdcube.ingress.heartbeat import beat_streams
from kdcube.metrics import BusMetrics, MetricsApp
from kdcube.metrics.cloudwatch import publish_forever
from kdcube.metrics.emf import export_forever
from kdcube.proc import Processor, ProcessorOptions
from kdcube.runtime.dependencies import watch_dependencies
from kdcube.runtime.http import hypercorn_config, serve_http
from kdcube.runtime.platform import Platform, open_platform
from kdcube.runtime.task_protection import AGENT_URI_VARIABLE

log = structlog.get_logger("kdcube.runtime")

_STREAMS_GOODBYE_S = 5.0


class Role(StrEnum):
    INGRESS = "ingress"
    PROC = "proc"
    METRICS = "metrics"


@dataclass(frozen=True, slots=True)
class Running:
    """What a started supervisor hands back: where it listens and its parts."""

    urls: list[str]
    platform: Platform
    processor: Processor | None
    hub: StreamHub


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        roles: set[Role],
        *,
        host: str,
        port: int,
        edge: EdgeOptions | None = None,
    ) -> None:
        """``edge`` puts the embedded edge in front of the roles (``kdcube
        run``): the web UI, security headers and limits, with requests handed
        to the roles in this process directly."""
        self._settings = settings
        self._roles = roles
        self._edge = edge
        self._host = host
        self._port = port
        self._stop_requested = anyio.Event()
        self._root: anyio.CancelScope | None = None

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    def request_stop(self) -> None:
        """First call drains; a second one stops at once."""
        if self._stop_requested.is_set() and self._root is not None:
            log.warning("runtime.stop_now")
            self._root.cancel()
            return
        log.info("runtime.drain_requested")
        self._stop_requested.set()

    async def run(
        self, *, task_status: TaskStatus[Running] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with open_platform(self._settings) as platform:
            async with anyio.create_task_group() as root:
                self._root = root.cancel_scope
                processor = await self._start_processor(root, platform)
                hub = StreamHub(platform.bus.relay, self._settings.sse_keepalive_s)
                metrics = self._bus_metrics(platform)
                app = self._app(platform, hub, metrics)
                http_closed = anyio.Event()
                config = hypercorn_config(self._host, self._port)
                async with anyio.create_task_group() as watchers:
                    # The live documents are read before the first request.
                    await watchers.start(platform.gateway.board.watch)
                    await watchers.start(platform.bundles.watch)
                    if metrics is not None:
                        watchers.start_soon(metrics.sample_forever)
                        self._export_metrics(watchers, metrics)
                    if Role.INGRESS in self._roles:
                        watchers.start_soon(self._beat_streams, platform, hub)
                    urls = await root.start(
                        partial(serve_http, app, config, shutdown=http_closed)
                    )
                    dependencies = platform.dependencies()
                    if dependencies:
                        watchers.start_soon(
                            watch_dependencies, platform.health, dependencies
                        )
                    task_status.started(Running(urls, platform, processor, hub))

                    await self._stop_requested.wait()
                    await self._drain(platform, processor, hub, http_closed)
                    watchers.cancel_scope.cancel()

    def _export_metrics(self, watchers: TaskGroup, metrics: BusMetrics) -> None:
        namespace = self._settings.metrics_cloudwatch_namespace
        if namespace is None:
            return
        settings = self._settings
        interval_s = settings.metrics_export_interval_s
        if settings.metrics_cloudwatch_export == "api":
            publish = partial(
                publish_forever,
                endpoint_url=settings.metrics_cloudwatch_endpoint_url,
                region=settings.metrics_cloudwatch_region,
            )
            watchers.start_soon(publish, metrics, namespace, interval_s)
        else:
            watchers.start_soon(export_forever, metrics, namespace, interval_s)
        log.info(
            "metrics.cloudwatch_export",
            how=settings.metrics_cloudwatch_export,
            namespace=namespace,
            interval_s=interval_s,
        )

    def _bus_metrics(self, platform: Platform) -> BusMetrics | None:
        if Role.METRICS not in self._roles:
            return None
        board = platform.gateway.board
        return BusMetrics(platform.bus, lambda: board.current().backpressure)

    def _app(
        self, platform: Platform, hub: StreamHub, metrics: BusMetrics | None
    ) -> Any:
        """The ingress app (health only for a processor), with the metrics
        routes in front: the bus's when this process is the metrics role,
        else this process's own."""
        ingress = None
        if self._roles & {Role.INGRESS, Role.PROC}:
            ingress = create_ingress_app(
                platform,
                hub,
                backend=sniffio.current_async_library(),
                chat=Role.INGRESS in self._roles,
            )
        roles = MetricsApp(metrics, platform.health, fallback=ingress)
        if self._edge is None:
            return roles
        in_process = {Target.INGRESS: roles, Target.PROC: roles, Target.METRICS: roles}
        return EdgeApp(self._edge, in_process, health=roles, lifespan=roles)

    async def _beat_streams(self, platform: Platform, hub: StreamHub) -> None:
        board = platform.gateway.board
        await beat_streams(
            platform.bus.state,
            hub,
            lambda: board.current().limits.max_sse_connections_per_instance,
            lambda: platform.health.draining,
        )

    async def _start_processor(
        self, root: anyio.abc.TaskGroup, platform: Platform
    ) -> Processor | None:
        if Role.PROC not in self._roles:
            return None

        bundles = LoadedBundles(self._git_bundles(platform))
        await bundles.reload(platform.registry, strict=True)
        options = ProcessorOptions(
            concurrency=self._settings.proc_concurrency,
            lease_s=self._settings.lease_s,
            idle_timeout_s=self._settings.turn_idle_timeout_s,
            wall_timeout_s=self._settings.turn_wall_timeout_s,
            drain_timeout_s=self._settings.drain_timeout_s,
            ecs_agent_uri=os.environ.get(AGENT_URI_VARIABLE) or None,
        )
        processor = Processor(
            platform.bus,
            platform.store,
            bundles,
            options,
            storage=platform.storage,
            registry=platform.bundles,
            executors=platform.executors,
        )
        await root.start(processor.serve)
        return processor

    def _git_bundles(self, platform: Platform) -> GitBundles:
        # Processors on other hosts may share the root (EFS): the bus lock
        # serializes their fetches too.
        state = platform.bus.state if platform.bus.durable else None
        return GitBundles(self._settings.home / "managed-bundles", state=state)

    async def _drain(
        self,
        platform: Platform,
        processor: Processor | None,
        hub: StreamHub,
        http_closed: anyio.Event,
    ) -> None:
        platform.health.begin_drain()
        if processor is not None:
            processor.begin_drain()
            await processor.finished.wait()

        hub.close_all()
        with anyio.move_on_after(_STREAMS_GOODBYE_S):
            await hub.wait_all_closed()
        http_closed.set()
        log.info("runtime.drained")


async def forward_signals(supervisor: Supervisor) -> None:
    """Turn SIGINT and SIGTERM into stop requests, for as long as it runs."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("runtime.signal", signal=signal.Signals(signum).name)
            supervisor.request_stop()


async def serve_until_stopped(
    supervisor: Supervisor,
    *,
    task_status: TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the supervisor with signal handling, as the CLI does."""
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(forward_signals, supervisor)
        await supervisor.run(task_status=task_status)
        tasks.cancel_scope.cancel()
