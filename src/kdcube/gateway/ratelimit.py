"""Per-session rate limiting: a sliding burst window and an hourly budget.

Burst: the times of the session's admitted requests within the last
``burst_window`` seconds; a request is refused while ``burst`` of them are
there, and Retry-After is the time until the oldest one leaves the window.

Hourly: a counter per fixed hour bucket, as upstream does. A sliding hour
would need every request time of the hour (up to 12,000 per paid session);
the price of the fixed bucket is that a session may spend two budgets around
the hour's edge, which its burst limit still paces. Retry-After is the time
left in the bucket, not a blanket hour.

Refused requests are not counted, unlike upstream, which records a request
before checking it: there, a client that keeps retrying keeps its own burst
window full and never gets through. Here it gets ``burst`` requests per
window however hard it hammers, and the check costs one round trip.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import anyio
import anyio.lowlevel
from coredis import Redis

from kdcube.bus.ports import BusError
from kdcube.bus.redis.errors import maps_errors
from kdcube.bus.redis.keys import KeyLayout
from kdcube.gateway.config import UNLIMITED, RateLimit

HOUR_S = 3600
_SWEEP_EVERY_S = 60.0
"""How often the memory limiter forgets sessions whose windows emptied."""

Reason = Literal["burst", "hourly"]


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    reason: Reason | None
    retry_after_s: int
    """Whole seconds until a request could pass (at least 1); 0 when allowed."""
    burst_remaining: int
    """Requests left in the burst window after this one."""
    hourly_remaining: int | None
    """Requests left this hour after this one; None when unlimited."""


class RateLimiter(Protocol):
    """Counts a session's requests against its limits."""

    async def hit(self, session_id: str, limits: RateLimit) -> RateDecision:
        """Admit and count one request, or refuse it without counting it."""


def _retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _hourly_remaining(limits: RateLimit, used: int) -> int | None:
    return None if limits.hourly == UNLIMITED else max(0, limits.hourly - used)


@dataclass(slots=True)
class _Session:
    admitted: deque[float] = field(default_factory=deque)
    window_s: float = 0.0
    hour: int = -1
    hour_count: int = 0


class MemoryRateLimiter:
    """The embedded limiter, on the event loop's clock.

    Hour buckets here are hours of that clock, which on asyncio is a
    monotonic clock: the buckets are an hour long but not aligned with the
    wall-clock hour.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}
        self._next_sweep = 0.0

    async def hit(self, session_id: str, limits: RateLimit) -> RateDecision:
        await anyio.lowlevel.checkpoint()
        now = anyio.current_time()
        self._sweep(now)
        session = self._sessions.setdefault(session_id, _Session())

        session.window_s = limits.burst_window
        window = session.admitted
        while window and window[0] <= now - limits.burst_window:
            window.popleft()
        hour = math.floor(now / HOUR_S)
        if session.hour != hour:
            session.hour, session.hour_count = hour, 0

        if limits.hourly != UNLIMITED and session.hour_count >= limits.hourly:
            return RateDecision(
                False, "hourly", _retry_after((hour + 1) * HOUR_S - now), 0, 0
            )
        if len(window) >= limits.burst:
            wait = window[0] + limits.burst_window - now
            left = _hourly_remaining(limits, session.hour_count)
            return RateDecision(False, "burst", _retry_after(wait), 0, left)

        window.append(now)
        if limits.hourly != UNLIMITED:
            session.hour_count += 1
        left = _hourly_remaining(limits, session.hour_count)
        return RateDecision(True, None, 0, limits.burst - len(window), left)

    def tracked_sessions(self) -> int:
        """Sessions still remembered once expired ones are forgotten."""
        self._next_sweep = 0.0
        self._sweep(anyio.current_time())
        return len(self._sessions)

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return

        self._next_sweep = now + _SWEEP_EVERY_S
        hour = math.floor(now / HOUR_S)
        self._sessions = {
            session_id: session
            for session_id, session in self._sessions.items()
            if (session.admitted and session.admitted[-1] > now - session.window_s)
            or (session.hour == hour and session.hour_count > 0)
        }


# Both keys belong to one session, so they share the deployment's hash slot.
# Times are the server's, so instances with skewed clocks agree. The hour
# hash expires when its hour ends and the burst set one window after its
# newest entry, so an idle session leaves nothing behind.
_HIT = """
local burst_key, hour_key = KEYS[1], KEYS[2]
local burst, window_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local hourly, member = tonumber(ARGV[3]), ARGV[4]
local hour_ms = 3600000

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hour = math.floor(now / hour_ms)
local hour_end = (hour + 1) * hour_ms

redis.call('ZREMRANGEBYSCORE', burst_key, '-inf', now - window_ms)
local in_window = redis.call('ZCARD', burst_key)
local used = 0
if hourly >= 0 then
  local stored = redis.call('HMGET', hour_key, 'hour', 'count')
  if tonumber(stored[1]) == hour then used = tonumber(stored[2]) or 0 end
end

if hourly >= 0 and used >= hourly then
  return {0, 'hourly', hour_end - now, 0, 0}
end
if in_window >= burst then
  local oldest = redis.call('ZRANGE', burst_key, 0, 0, 'WITHSCORES')[2]
  return {0, 'burst', tonumber(oldest) + window_ms - now, 0, hourly - used}
end

redis.call('ZADD', burst_key, now, member)
redis.call('PEXPIRE', burst_key, window_ms)
if hourly >= 0 then
  redis.call('HSET', hour_key, 'hour', hour, 'count', used + 1)
  redis.call('PEXPIREAT', hour_key, hour_end)
end
return {1, '', 0, burst - in_window - 1, hourly - used - 1}
"""


class RedisRateLimiter:
    """The shared limiter: one Lua script per request, on the server's clock."""

    def __init__(self, commands: Redis[str], keys: KeyLayout) -> None:
        self._keys = keys
        self._hit = commands.register_script(_HIT)

    @maps_errors("check a rate limit")
    async def hit(self, session_id: str, limits: RateLimit) -> RateDecision:
        reply: Any = await self._hit(
            keys=[self._keys.rate_burst(session_id), self._keys.rate_hour(session_id)],
            args=[
                limits.burst,
                max(1, round(limits.burst_window * 1000)),
                limits.hourly,
                uuid.uuid4().hex,
            ],
        )
        if not isinstance(reply, list) or len(reply) != 5:
            raise BusError(f"Redis answered {reply!r} to a rate check; expected 5")

        allowed, reason, wait_ms, burst_left, hourly_left = reply
        hourly = None if limits.hourly == UNLIMITED else int(hourly_left)
        if int(allowed) == 1:
            return RateDecision(True, None, 0, int(burst_left), hourly)
        refused: Reason = "hourly" if reason == "hourly" else "burst"
        return RateDecision(
            False, refused, _retry_after(int(wait_ms) / 1000), 0, hourly
        )
