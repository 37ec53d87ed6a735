"""In-memory relay: a bounded, time-limited event log per session."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import anyio

from kdcube.bus.ports import RelayEvent, RelayRead, format_event_id, parse_event_id

EventKey = tuple[int, int]


@dataclass(slots=True)
class _SessionLog:
    floor: EventKey
    keys: list[EventKey] = field(default_factory=list)
    events: list[RelayEvent] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)
    readers: int = 0

    def drop_oldest(self, count: int) -> None:
        if count <= 0:
            return
        self.floor = self.keys[count - 1]
        del self.keys[:count], self.events[:count], self.times[:count]


class MemoryRelay:
    def __init__(self, *, retention_s: float, max_events: int) -> None:
        self._retention_s = retention_s
        self._max_events = max_events
        self._sessions: dict[str, _SessionLog] = {}
        self._published_once: dict[str, float] = {}
        self._last: EventKey = (time.time_ns() // 1_000_000, 0)
        # Nothing before this process started is kept, so older cursors see a gap.
        self._floor: EventKey = self._last

    async def publish(
        self,
        session_id: str,
        route: str,
        data_json: str,
        *,
        stream_id: str | None,
        once: str | None = None,
    ) -> str | None:
        await anyio.lowlevel.checkpoint()
        if once is not None:
            if once in self._published_once:
                return None
            self._published_once[once] = anyio.current_time()

        key = self._next_key()
        event = RelayEvent(format_event_id(*key), route, data_json, stream_id)
        log = self._log(session_id)
        log.keys.append(key)
        log.events.append(event)
        log.times.append(anyio.current_time())
        self._enforce_cap(log)

        log.changed.set()
        log.changed = anyio.Event()
        return event.id

    async def position(self, session_id: str) -> str:
        await anyio.lowlevel.checkpoint()
        log = self._sessions.get(session_id)
        if log is not None and log.keys:
            return format_event_id(*log.keys[-1])
        return format_event_id(*self._last)

    async def read(
        self, session_id: str, after: str, *, stream_id: str, timeout_s: float
    ) -> RelayRead:
        after_key = parse_event_id(after)
        log = self._log(session_id)
        floor = max(self._floor, log.floor)
        gap = after_key < floor
        after_key = max(after_key, floor)
        log.readers += 1
        try:
            with anyio.move_on_after(timeout_s):
                while True:
                    read = self._collect(log, after_key, stream_id, gap)
                    if read.events:
                        await anyio.lowlevel.checkpoint()
                        return read
                    after_key = parse_event_id(read.cursor)
                    await log.changed.wait()
        finally:
            log.readers -= 1

        return self._collect(log, after_key, stream_id, gap)

    async def sweep_forever(self) -> None:
        """Drop events older than the retention period, then idle sessions."""
        interval = max(1.0, self._retention_s / 20)
        while True:
            await anyio.sleep(interval)
            self.sweep(anyio.current_time() - self._retention_s)

    def sweep(self, cutoff: float) -> None:
        self._published_once = {
            key: at for key, at in self._published_once.items() if at >= cutoff
        }
        for session_id, log in list(self._sessions.items()):
            log.drop_oldest(bisect.bisect_left(log.times, cutoff))
            if not log.events and log.readers == 0:
                self._floor = max(self._floor, log.floor)
                del self._sessions[session_id]

    def _collect(
        self, log: _SessionLog, after: EventKey, stream_id: str, gap: bool
    ) -> RelayRead:
        start = bisect.bisect_right(log.keys, after)
        visible = [
            event
            for event in log.events[start:]
            if event.stream_id is None or event.stream_id == stream_id
        ]
        cursor = log.keys[-1] if start < len(log.keys) else after
        return RelayRead(visible, format_event_id(*cursor), gap)

    def _log(self, session_id: str) -> _SessionLog:
        log = self._sessions.get(session_id)
        if log is None:
            log = self._sessions[session_id] = _SessionLog(floor=self._floor)
        return log

    def _next_key(self) -> EventKey:
        now = time.time_ns() // 1_000_000
        last_ms, last_seq = self._last
        self._last = (now, 0) if now > last_ms else (last_ms, last_seq + 1)
        return self._last

    def _enforce_cap(self, log: _SessionLog) -> None:
        # Trim in batches of a tenth so a full log does not shift on every event.
        if len(log.events) > self._max_events + self._max_events // 10:
            log.drop_oldest(len(log.events) - self._max_events)
