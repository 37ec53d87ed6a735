"""In-memory shared state: sessions, counters, heartbeats and locks."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio


@dataclass(slots=True)
class _Expiring:
    value: Any
    expires_at: float


class MemoryState:
    def __init__(self) -> None:
        self._sessions: dict[str, _Expiring] = {}
        # Keyed by window length too: window numbers of different lengths
        # cannot be compared, so each is pruned against its own current one.
        self._counters: dict[tuple[str, float, int], int] = {}
        self._beats: dict[str, dict[str, _Expiring]] = {}
        self._locks: dict[str, _Expiring] = {}
        self._tallies: dict[str, dict[str, float]] = {}
        self._last_token = 0

    async def session_for(self, user_key: str, *, ttl_s: float) -> str:
        await anyio.lowlevel.checkpoint()
        now = anyio.current_time()
        entry = self._sessions.get(user_key)
        if entry is None or entry.expires_at <= now:
            entry = self._sessions[user_key] = _Expiring(uuid.uuid4().hex, 0.0)
        entry.expires_at = now + ttl_s
        return str(entry.value)

    async def incr(self, key: str, *, window_s: float) -> int:
        await anyio.lowlevel.checkpoint()
        now = anyio.current_time()
        self._counters = {
            k: v for k, v in self._counters.items() if k[2] >= math.floor(now / k[1])
        }
        counter = (key, window_s, math.floor(now / window_s))
        self._counters[counter] = count = self._counters.get(counter, 0) + 1
        return count

    async def beat(
        self, role: str, instance: str, info: dict[str, Any], *, ttl_s: float
    ) -> None:
        await anyio.lowlevel.checkpoint()
        expires_at = anyio.current_time() + ttl_s
        self._beats.setdefault(role, {})[instance] = _Expiring(dict(info), expires_at)

    async def alive(self, role: str) -> dict[str, dict[str, Any]]:
        await anyio.lowlevel.checkpoint()
        now = anyio.current_time()
        beats = self._beats.get(role, {})
        for instance in [i for i, beat in beats.items() if beat.expires_at <= now]:
            del beats[instance]
        return {instance: dict(beat.value) for instance, beat in beats.items()}

    async def add(self, tally: str, amounts: Mapping[str, float]) -> None:
        await anyio.lowlevel.checkpoint()
        totals = self._tallies.setdefault(tally, {})
        for field, amount in amounts.items():
            totals[field] = totals.get(field, 0.0) + float(amount)

    async def totals(self, tally: str) -> dict[str, float]:
        await anyio.lowlevel.checkpoint()
        return dict(self._tallies.get(tally, {}))

    async def lock(self, name: str, *, ttl_s: float) -> int | None:
        await anyio.lowlevel.checkpoint()
        now = anyio.current_time()
        held = self._locks.get(name)
        if held is not None and held.expires_at > now:
            return None

        self._last_token += 1
        self._locks[name] = _Expiring(self._last_token, now + ttl_s)
        return self._last_token

    async def unlock(self, name: str, token: int) -> bool:
        await anyio.lowlevel.checkpoint()
        held = self._locks.get(name)
        if (
            held is None
            or held.value != token
            or held.expires_at <= anyio.current_time()
        ):
            return False

        del self._locks[name]
        return True
