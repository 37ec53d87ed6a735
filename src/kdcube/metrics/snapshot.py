"""One reading of the bus: the queue, the live processes and the tallies."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kdcube.bus.ports import Bus
from kdcube.gateway.backpressure import total_capacity
from kdcube.gateway.config import BackpressureConfig
from kdcube.metrics import tallies


@dataclass(frozen=True, slots=True)
class Snapshot:
    ready: int
    """Turns waiting to be claimed."""
    inflight: int
    """Turns claimed by a processor (running or about to)."""
    oldest_wait_s: float
    """How long the longest-waiting turn has been claimable; 0 when none waits."""
    processes: int
    """Live processors that take turns (not draining)."""
    draining: int
    """Live processors that are draining."""
    concurrency: int
    """Turns the live, non-draining processors may run at once."""
    running: int
    """Turns the live processors report running."""
    admission_capacity: int
    """What backpressure admits against (see ``gateway.backpressure``)."""
    ingresses: int
    sse_connections: int
    sse_max: int
    turns: Mapping[str, float]
    rejections: Mapping[str, float]
    waits: Mapping[float, float]
    """Queue wait bucket upper bound -> turns that waited that long, ever."""
    wait_sum_s: float
    durations: Mapping[float, float]
    """Turn duration bucket upper bound -> turns that took that long, ever."""
    duration_sum_s: float

    @property
    def queued(self) -> int:
        return self.ready + self.inflight

    @property
    def utilization(self) -> float:
        """Queued turns per unit of admission capacity; 1 when turns are
        queued and no processor lives, 0 when nothing is queued."""
        if self.admission_capacity > 0:
            return self.queued / self.admission_capacity
        return 1.0 if self.queued > 0 else 0.0

    @property
    def sse_saturation(self) -> float:
        """Open streams over the streams the live ingresses may hold."""
        return self.sse_connections / self.sse_max if self.sse_max > 0 else 0.0


async def read_snapshot(bus: Bus, backpressure: BackpressureConfig) -> Snapshot:
    stats = await bus.queue.stats()
    procs = await bus.state.alive("proc")
    ingresses = await bus.state.alive("ingress")
    taking = [info for info in procs.values() if not info.get("draining", False)]
    waits = await bus.state.totals(tallies.QUEUE_WAIT)
    durations = await bus.state.totals(tallies.TURN_DURATION)
    return Snapshot(
        ready=stats.ready,
        inflight=stats.inflight,
        oldest_wait_s=stats.oldest_wait_s,
        processes=len(taking),
        draining=len(procs) - len(taking),
        concurrency=sum(_count(info, "capacity") for info in taking),
        running=sum(_count(info, "in_flight") for info in procs.values()),
        admission_capacity=total_capacity(procs, backpressure),
        ingresses=len(ingresses),
        sse_connections=sum(_count(i, "sse_connections") for i in ingresses.values()),
        sse_max=sum(_count(i, "sse_max") for i in ingresses.values()),
        turns=await bus.state.totals(tallies.TURNS),
        rejections=await bus.state.totals(tallies.REJECTIONS),
        waits=_buckets(waits),
        wait_sum_s=waits.get(tallies.WAIT_SUM, 0.0),
        durations=_buckets(durations),
        duration_sum_s=durations.get(tallies.WAIT_SUM, 0.0),
    )


def _count(info: Mapping[str, Any], name: str) -> int:
    value = info.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, int(value))


def _buckets(fields: Mapping[str, float]) -> dict[float, float]:
    """Every bucket of the histogram, the empty ones too."""
    return {
        bound: fields.get(tallies.bound_field(bound), 0.0)
        for bound in tallies.WAIT_BUCKETS
    }
