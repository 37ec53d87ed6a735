"""The embedded bus: in-process queue, relay and state for ``kdcube run``."""

from kdcube.bus.memory.bus import MemoryBus, open_memory_bus
from kdcube.bus.memory.queue import MemoryQueue
from kdcube.bus.memory.relay import MemoryRelay
from kdcube.bus.memory.state import MemoryState

__all__ = ["MemoryBus", "MemoryQueue", "MemoryRelay", "MemoryState", "open_memory_bus"]
