"""The embedded bus, whose relay sweeper lives as long as the bus is open."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from kdcube.bus.memory.queue import MemoryQueue
from kdcube.bus.memory.relay import MemoryRelay
from kdcube.bus.memory.state import MemoryState


class MemoryBus:
    durable = False

    def __init__(self, *, retention_s: float, max_events: int) -> None:
        self.queue = MemoryQueue()
        self.relay = MemoryRelay(retention_s=retention_s, max_events=max_events)
        self.state = MemoryState()


@asynccontextmanager
async def open_memory_bus(
    *, retention_s: float = 600.0, max_events: int = 10_000
) -> AsyncIterator[MemoryBus]:
    bus = MemoryBus(retention_s=retention_s, max_events=max_events)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(bus.relay.sweep_forever)
        yield bus
        tasks.cancel_scope.cancel()
