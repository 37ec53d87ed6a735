"""The ingress heartbeat: how many SSE streams this process holds, of how many.

The metrics role sums these over the live ingresses. A beat goes out every
``interval_s``, and soon after streams open or close (at most one per
``min_gap_s``, so a reconnect storm does not become a beat storm).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import anyio
import structlog

from kdcube.bus.ports import BusError, State
from kdcube.ingress.streams import StreamHub
from kdcube.wire.ids import new_id

log = structlog.get_logger("kdcube.ingress")

ROLE = "ingress"


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{new_id()[:8]}"


async def beat_streams(
    state: State,
    hub: StreamHub,
    max_streams: Callable[[], int],
    draining: Callable[[], bool],
    *,
    interval_s: float = 5.0,
    min_gap_s: float = 0.5,
) -> None:
    instance = instance_name()
    while True:
        info = {
            "sse_connections": hub.connections,
            "sse_max": max_streams(),
            "draining": draining(),
        }
        with anyio.move_on_after(interval_s):
            try:
                await state.beat(ROLE, instance, info, ttl_s=interval_s * 3)
            except BusError as exc:
                log.warning("ingress.heartbeat_failed", error=str(exc))
        await anyio.sleep(min_gap_s)
        if hub.connections == info["sse_connections"]:
            with anyio.move_on_after(max(0.0, interval_s - min_gap_s)):
                await hub.wait_change()
