"""The bus as Prometheus metric families, read afresh on every scrape.

``refresh`` reads the bus (bounded) and adds a sample to the windows; the
metrics app calls it before rendering, and ``sample_forever`` calls it
between scrapes so the windows fill even when nobody scrapes. ``collect``
(prometheus-client's Collector protocol) renders the latest reading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import anyio
import structlog
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kdcube.bus.ports import Bus, BusError
from kdcube.gateway.config import BackpressureConfig
from kdcube.metrics import tallies
from kdcube.metrics.snapshot import Snapshot, read_snapshot
from kdcube.metrics.windows import Sample, Windows

log = structlog.get_logger("kdcube.metrics")

_READ_TIMEOUT_S = 5.0
_SAMPLE_S = 5.0


class BusMetrics(Collector):
    def __init__(
        self,
        bus: Bus,
        backpressure: Callable[[], BackpressureConfig],
        *,
        sample_s: float = _SAMPLE_S,
        read_timeout_s: float = _READ_TIMEOUT_S,
    ) -> None:
        self._bus = bus
        self._backpressure = backpressure
        self._sample_s = sample_s
        self._read_timeout_s = read_timeout_s
        self._windows = Windows()
        self._latest: Snapshot | None = None
        self._bus_up = False
        self._reading = anyio.Lock()

    async def refresh(self) -> None:
        """Read the bus now; on failure the metrics of the bus go missing
        and ``kdcube_metrics_bus_up`` says 0."""
        async with self._reading:
            snapshot = None
            with anyio.move_on_after(self._read_timeout_s):
                try:
                    snapshot = await read_snapshot(self._bus, self._backpressure())
                except BusError as exc:
                    log.warning("metrics.bus_read_failed", error=str(exc))
            if snapshot is None:
                self._bus_up, self._latest = False, None
                return
            self._bus_up, self._latest = True, snapshot
            self._windows.add(
                Sample(anyio.current_time(), snapshot.utilization, snapshot.waits)
            )

    async def sample_forever(self) -> None:
        while True:
            await self.refresh()
            await anyio.sleep(self._sample_s)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "kdcube_metrics_bus_up", "1 when the last read of the bus succeeded."
        )
        up.add_metric([], 1.0 if self._bus_up else 0.0)
        yield up
        if self._latest is not None:
            yield from _families(self._latest, self._windows)

    def report(self) -> dict[str, Any]:
        """The latest reading with its windows, for ``/metrics.json``."""
        s, windows = self._latest, self._windows
        if s is None:
            return {"bus_up": False}
        return {
            "bus_up": True,
            "queue": {
                "ready": s.ready,
                "inflight": s.inflight,
                "queued": s.queued,
                "oldest_wait_seconds": s.oldest_wait_s,
                "admission_capacity": s.admission_capacity,
                "utilization_ratio": s.utilization,
                "utilization_ratio_avg": {
                    span: windows.utilization(span) for span in windows.spans
                },
                "wait_p95_seconds": {
                    span: windows.wait_quantile(span) for span in windows.spans
                },
                "wait_seconds": {
                    "buckets": {
                        tallies.bound_field(bound): count
                        for bound, count in s.waits.items()
                    },
                    "count": sum(s.waits.values()),
                    "sum": s.wait_sum_s,
                },
            },
            "proc": {
                "processes": s.processes,
                "draining": s.draining,
                "capacity": s.concurrency,
                "inflight": s.running,
            },
            "sse": {
                "ingresses": s.ingresses,
                "connections": s.sse_connections,
                "max_connections": s.sse_max,
                "saturation_ratio": s.sse_saturation,
            },
            "turns_total": dict(s.turns),
            "gateway_rejections_total": dict(s.rejections),
        }


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _histogram(
    name: str, doc: str, counts: Mapping[float, float], total: float
) -> HistogramMetricFamily:
    cumulative, buckets = 0.0, []
    for bound, count in sorted(counts.items()):
        cumulative += count
        buckets.append((tallies.bound_field(bound), cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


def _families(s: Snapshot, windows: Windows) -> Iterable[Metric]:
    yield _gauge("kdcube_queue_ready", "Turns waiting to be claimed.", s.ready)
    yield _gauge("kdcube_queue_inflight", "Turns claimed by a processor.", s.inflight)
    yield _gauge(
        "kdcube_queue_oldest_wait_seconds",
        "How long the longest-waiting turn has been claimable (0 when none waits).",
        s.oldest_wait_s,
    )
    yield _gauge(
        "kdcube_queue_capacity",
        "Turns the gateway admits into the queue at most (backpressure capacity).",
        s.admission_capacity,
    )
    yield _gauge(
        "kdcube_queue_utilization_ratio",
        "Queued turns (ready + inflight) over the queue capacity.",
        s.utilization,
    )
    average = GaugeMetricFamily(
        "kdcube_queue_utilization_avg_ratio",
        "Mean queue utilization over a window.",
        labels=["window"],
    )
    p95 = GaugeMetricFamily(
        "kdcube_queue_wait_p95_window_seconds",
        "95th percentile of queue waits observed over a window.",
        labels=["window"],
    )
    for span in windows.spans:
        mean, quantile = windows.utilization(span), windows.wait_quantile(span)
        if mean is not None:
            average.add_metric([span], mean)
        if quantile is not None:
            p95.add_metric([span], quantile)
    yield average
    yield p95
    yield _histogram(
        "kdcube_queue_wait_seconds",
        "Seconds from enqueue to first claim, per turn.",
        s.waits,
        s.wait_sum_s,
    )
    yield _histogram(
        "kdcube_turn_seconds",
        "Seconds a processor spent on a turn, from claim to recorded outcome.",
        s.durations,
        s.duration_sum_s,
    )
    yield _gauge(
        "kdcube_proc_capacity",
        "Turns the live processors that take work may run at once.",
        s.concurrency,
    )
    yield _gauge(
        "kdcube_proc_processes",
        "Live processors that take work (not draining).",
        s.processes,
    )
    yield _gauge(
        "kdcube_proc_draining", "Live processors that are draining.", s.draining
    )
    yield _gauge(
        "kdcube_proc_inflight", "Turns the live processors run now.", s.running
    )
    yield _gauge("kdcube_ingress_processes", "Live ingress processes.", s.ingresses)
    yield _gauge(
        "kdcube_sse_connections",
        "Open SSE streams over all ingresses.",
        s.sse_connections,
    )
    yield _gauge(
        "kdcube_sse_max_connections",
        "SSE streams the live ingresses may hold at most.",
        s.sse_max,
    )
    yield _gauge(
        "kdcube_sse_saturation_ratio",
        "Open SSE streams over the streams the ingresses may hold.",
        s.sse_saturation,
    )
    turns = CounterMetricFamily(
        "kdcube_turns", "Turns ended, by recorded outcome.", labels=["outcome"]
    )
    for outcome, count in sorted(s.turns.items()):
        turns.add_metric([outcome], count)
    yield turns
    rejections = CounterMetricFamily(
        "kdcube_gateway_rejections",
        "Requests the gateway refused, by reason.",
        labels=["reason"],
    )
    for reason, count in sorted(s.rejections.items()):
        rejections.add_metric([reason], count)
    yield rejections
