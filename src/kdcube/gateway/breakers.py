"""Circuit breakers whose state every process shares.

A breaker starts CLOSED and lets calls through, noting the failures. When
``failure_threshold`` failures fall within ``window_s`` it turns OPEN and
refuses calls with ``CircuitOpen`` until ``recovery_timeout_s`` has passed.
Then it is HALF_OPEN: up to ``half_open_max_calls`` trial calls go through;
one trial failure opens it again, ``success_threshold`` trial successes close
it. Trials whose outcome never comes back (a cancelled call, a dead process)
would hold the half-open slots for ever, so after another recovery period a
new round of trials begins.

The state lives behind a ``BreakerStore``: in memory for the embedded mode,
in Redis (one Lua script per transition, on the server's clock) for many
processes. Each process caches a CLOSED or OPEN answer for ``cache_s``, so
a healthy breaker costs no round trip per call; failures and trial outcomes
are always written through. Settings are read from the live config on every
call, so a config change applies to the next call.

When the store itself cannot be reached (the Redis breaker's own state is in
Redis) the breaker falls back to a private in-memory store, so it still
opens. Known shortcoming: that fallback state is this process's alone and is
not merged back when the store returns.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import anyio
import anyio.lowlevel
import structlog
from coredis import Redis

from kdcube.bus.ports import BusError
from kdcube.bus.redis.errors import maps_errors
from kdcube.bus.redis.keys import KeyLayout
from kdcube.gateway.config import BreakerSettings, GatewayConfig

log = structlog.get_logger("kdcube.gateway")

T = TypeVar("T")
Failures = tuple[type[BaseException], ...]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpen(Exception):
    """The breaker refuses calls for now; retry after ``retry_after_s``."""

    def __init__(self, name: str, retry_after_s: int) -> None:
        super().__init__(
            f"circuit breaker {name!r} is open; retry in {retry_after_s} s"
        )
        self.name = name
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    trial: bool
    """Whether the call is a half-open trial, whose outcome must be reported."""
    state: BreakerState
    retry_after_s: float
    """Seconds until a refused call may be tried again; 0 when allowed."""


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    name: str
    state: BreakerState
    retry_after_s: float
    failures: int
    """Failures within the window (counted while closed)."""


class BreakerStore(Protocol):
    """Where breakers keep their state; one store serves every breaker."""

    async def acquire(self, name: str, settings: BreakerSettings) -> Verdict:
        """Decide on one call, taking a half-open trial slot if it is one."""

    async def failed(
        self, name: str, settings: BreakerSettings, *, trial: bool
    ) -> BreakerState:
        """Record a failed call. Only a trial's failure reopens a half-open
        breaker: other failures come from calls admitted before it opened."""

    async def succeeded(self, name: str, settings: BreakerSettings) -> BreakerState:
        """Record a successful trial call."""

    async def status(self, name: str, settings: BreakerSettings) -> BreakerStatus: ...

    async def reset(self, name: str) -> None:
        """Close the breaker and forget its failures."""


@dataclass(slots=True)
class _Record:
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    round_started: float = 0.0
    trials: int = 0
    successes: int = 0
    failures: deque[float] = field(default_factory=deque)


class MemoryBreakerStore:
    """Breaker state of one process, on the event loop's clock."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}

    async def acquire(self, name: str, settings: BreakerSettings) -> Verdict:
        await anyio.lowlevel.checkpoint()
        now = anyio.current_time()
        record = self._records.setdefault(name, _Record())
        if record.state is BreakerState.OPEN:
            wait = record.opened_at + settings.recovery_timeout_s - now
            if wait > 0:
                return Verdict(False, False, BreakerState.OPEN, wait)
            record.state, record.round_started = BreakerState.HALF_OPEN, now
            record.trials = record.successes = 0

        if record.state is BreakerState.CLOSED:
            return Verdict(True, False, BreakerState.CLOSED, 0.0)

        if record.trials >= settings.half_open_max_calls:
            wait = record.round_started + settings.recovery_timeout_s - now
            if wait > 0:
                return Verdict(False, False, BreakerState.HALF_OPEN, wait)
            record.round_started, record.trials = now, 0
        record.trials += 1
        return Verdict(True, True, BreakerState.HALF_OPEN, 0.0)

    async def failed(
        self, name: str, settings: BreakerSettings, *, trial: bool
    ) -> BreakerState:
        await anyio.lowlevel.checkpoint()
        now = anyio.current_time()
        record = self._records.setdefault(name, _Record())
        if record.state is BreakerState.HALF_OPEN and trial:
            self._records[name] = _Record(BreakerState.OPEN, opened_at=now)
            return BreakerState.OPEN
        if record.state is not BreakerState.CLOSED:
            return record.state

        record.failures.append(now)
        _drop_older(record.failures, now - settings.window_s)
        if len(record.failures) >= settings.failure_threshold:
            self._records[name] = _Record(BreakerState.OPEN, opened_at=now)
        return self._records[name].state

    async def succeeded(self, name: str, settings: BreakerSettings) -> BreakerState:
        await anyio.lowlevel.checkpoint()
        record = self._records.setdefault(name, _Record())
        if record.state is not BreakerState.HALF_OPEN:
            return record.state

        record.successes += 1
        if record.successes >= settings.success_threshold:
            del self._records[name]
            return BreakerState.CLOSED
        return record.state

    async def status(self, name: str, settings: BreakerSettings) -> BreakerStatus:
        await anyio.lowlevel.checkpoint()
        now = anyio.current_time()
        record = self._records.get(name, _Record())
        _drop_older(record.failures, now - settings.window_s)
        wait = 0.0
        if record.state is BreakerState.OPEN:
            wait = max(0.0, record.opened_at + settings.recovery_timeout_s - now)
        return BreakerStatus(name, record.state, wait, len(record.failures))

    async def reset(self, name: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._records.pop(name, None)


def _drop_older(times: deque[float], cutoff: float) -> None:
    while times and times[0] <= cutoff:
        times.popleft()


_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key, fails = KEYS[1], KEYS[2]
"""

# ARGV: recovery ms, half-open max calls, state ttl ms.
_ACQUIRE = (
    _NOW
    + """
local recovery, max_calls, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local h = redis.call('HMGET', key, 'state', 'opened_at', 'round_started', 'trials')
local state = h[1] or 'closed'
if state == 'closed' then return {1, 0, 'closed', 0} end
local round_started, trials = tonumber(h[3]) or 0, tonumber(h[4]) or 0
if state == 'open' then
  local wait = (tonumber(h[2]) or 0) + recovery - now
  if wait > 0 then return {0, 0, 'open', wait} end
  state, round_started, trials = 'half_open', now, 0
  redis.call('HSET', key, 'state', state, 'round_started', now, 'trials', 0,
             'successes', 0)
end
if trials >= max_calls then
  local wait = round_started + recovery - now
  if wait > 0 then return {0, 0, 'half_open', wait} end
  trials = 0
  redis.call('HSET', key, 'round_started', now)
end
redis.call('HSET', key, 'trials', trials + 1)
redis.call('PEXPIRE', key, ttl)
return {1, 1, 'half_open', 0}
"""
)

# ARGV: failure threshold, window ms, state ttl ms, trial (0/1), member.
_FAILED = (
    _NOW
    + """
local threshold, window, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local trial, member = ARGV[4] == '1', ARGV[5]
local function open()
  redis.call('DEL', key, fails)
  redis.call('HSET', key, 'state', 'open', 'opened_at', now)
  redis.call('PEXPIRE', key, ttl)
  return 'open'
end
local state = redis.call('HGET', key, 'state') or 'closed'
if state == 'half_open' and trial then return open() end
if state ~= 'closed' then return state end
redis.call('ZADD', fails, now, member)
redis.call('ZREMRANGEBYSCORE', fails, '-inf', now - window)
redis.call('PEXPIRE', fails, window)
if redis.call('ZCARD', fails) >= threshold then return open() end
return 'closed'
"""
)

# ARGV: success threshold.
_SUCCEEDED = (
    _NOW
    + """
local state = redis.call('HGET', key, 'state') or 'closed'
if state ~= 'half_open' then return state end
if redis.call('HINCRBY', key, 'successes', 1) < tonumber(ARGV[1]) then
  return state
end
redis.call('DEL', key, fails)
return 'closed'
"""
)

# ARGV: recovery ms, window ms.
_STATUS = (
    _NOW
    + """
local h = redis.call('HMGET', key, 'state', 'opened_at')
local state, wait = h[1] or 'closed', 0
if state == 'open' then
  wait = math.max(0, (tonumber(h[2]) or 0) + tonumber(ARGV[1]) - now)
end
local failures = redis.call('ZCOUNT', fails, '(' .. (now - tonumber(ARGV[2])), '+inf')
return {state, wait, failures}
"""
)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _state_ttl_ms(settings: BreakerSettings) -> int:
    # Long enough to outlive an open period and a half-open round; a breaker
    # left half-open with no traffic for that long is forgotten, i.e. closed.
    return 2 * _ms(settings.window_s + settings.recovery_timeout_s)


def _fields(reply: Any, count: int, action: str) -> list[Any]:
    if not isinstance(reply, list) or len(reply) != count:
        raise BusError(f"Redis answered {reply!r} to {action}; expected {count} items")
    return reply


def _state(value: Any) -> BreakerState:
    try:
        return BreakerState(str(value))
    except ValueError:
        raise BusError(f"Redis holds unknown breaker state {value!r}") from None


class RedisBreakerStore:
    """Breaker state shared by every process of a deployment."""

    def __init__(self, commands: Redis[str], keys: KeyLayout) -> None:
        self._redis = commands
        self._keys = keys
        self._acquire = commands.register_script(_ACQUIRE)
        self._failed = commands.register_script(_FAILED)
        self._succeeded = commands.register_script(_SUCCEEDED)
        self._status = commands.register_script(_STATUS)

    def _pair(self, name: str) -> list[str]:
        return [self._keys.breaker(name), self._keys.breaker_failures(name)]

    @maps_errors("ask a circuit breaker")
    async def acquire(self, name: str, settings: BreakerSettings) -> Verdict:
        reply: Any = await self._acquire(
            keys=self._pair(name),
            args=[
                _ms(settings.recovery_timeout_s),
                settings.half_open_max_calls,
                _state_ttl_ms(settings),
            ],
        )
        allowed, trial, state, wait_ms = _fields(reply, 4, "a breaker's acquire")
        return Verdict(
            int(allowed) == 1, int(trial) == 1, _state(state), int(wait_ms) / 1000
        )

    @maps_errors("record a failure on a circuit breaker")
    async def failed(
        self, name: str, settings: BreakerSettings, *, trial: bool
    ) -> BreakerState:
        reply: Any = await self._failed(
            keys=self._pair(name),
            args=[
                settings.failure_threshold,
                _ms(settings.window_s),
                _state_ttl_ms(settings),
                "1" if trial else "0",
                uuid.uuid4().hex,
            ],
        )
        return _state(reply)

    @maps_errors("record a success on a circuit breaker")
    async def succeeded(self, name: str, settings: BreakerSettings) -> BreakerState:
        reply: Any = await self._succeeded(
            keys=self._pair(name), args=[settings.success_threshold]
        )
        return _state(reply)

    @maps_errors("read a circuit breaker")
    async def status(self, name: str, settings: BreakerSettings) -> BreakerStatus:
        reply: Any = await self._status(
            keys=self._pair(name),
            args=[_ms(settings.recovery_timeout_s), _ms(settings.window_s)],
        )
        state, wait_ms, failures = _fields(reply, 3, "a breaker's status")
        return BreakerStatus(name, _state(state), int(wait_ms) / 1000, int(failures))

    @maps_errors("reset a circuit breaker")
    async def reset(self, name: str) -> None:
        await self._redis.delete(self._pair(name))


@dataclass(frozen=True, slots=True)
class _Cached:
    verdict: Verdict
    until: float
    """Event-loop time after which the store must be asked again."""
    ends: float
    """Event-loop time at which an open breaker's wait is over."""


class CircuitBreaker:
    """One named breaker; ``guard()`` wraps each call it protects."""

    def __init__(
        self,
        name: str,
        store: BreakerStore,
        settings: Callable[[], BreakerSettings],
        *,
        failures: Failures = (Exception,),
        cache_s: float = 0.5,
    ) -> None:
        self.name = name
        self._store = store
        self._fallback = MemoryBreakerStore()
        self._settings = settings
        self._failures = failures
        self._cache_s = cache_s
        self._cached: _Cached | None = None
        self._degraded = False
        """Whether the last store call failed and the fallback answered."""

    @asynccontextmanager
    async def guard(self, *, failures: Failures | None = None) -> AsyncIterator[None]:
        """Run the block if the breaker allows it, else raise CircuitOpen.

        Exceptions of the ``failures`` types (the breaker's default when not
        given) count as failures; every exception is re-raised as it came.
        """
        settings = self._settings()
        verdict = await self._verdict(settings)
        if not verdict.allowed:
            raise CircuitOpen(self.name, max(1, math.ceil(verdict.retry_after_s)))

        try:
            yield
        except Exception as exc:
            if isinstance(exc, failures or self._failures):
                await self._record_failure(settings, trial=verdict.trial)
            raise

        if verdict.trial:
            await self._reliably(lambda s: s.succeeded(self.name, settings))

    async def status(self) -> BreakerStatus:
        settings = self._settings()
        return await self._reliably(lambda s: s.status(self.name, settings))

    async def reset(self) -> None:
        self._cached = None
        await self._reliably(lambda s: s.reset(self.name))
        log.info("breaker.reset", breaker=self.name)

    async def _verdict(self, settings: BreakerSettings) -> Verdict:
        now = anyio.current_time()
        cached = self._cached
        if cached is not None and now < cached.until:
            if cached.verdict.allowed:
                return cached.verdict
            return Verdict(False, False, BreakerState.OPEN, cached.ends - now)

        verdict = await self._reliably(lambda s: s.acquire(self.name, settings))
        self._remember(verdict, now)
        return verdict

    def _remember(self, verdict: Verdict, now: float) -> None:
        # Half-open answers are never cached: each trial must take a slot.
        if verdict.state is BreakerState.HALF_OPEN:
            self._cached = None
        elif verdict.allowed:
            self._cached = _Cached(verdict, now + self._cache_s, now)
        else:
            ends = now + verdict.retry_after_s
            self._cached = _Cached(verdict, min(now + self._cache_s, ends), ends)

    async def _record_failure(self, settings: BreakerSettings, *, trial: bool) -> None:
        state = await self._reliably(
            lambda s: s.failed(self.name, settings, trial=trial)
        )
        if state is not BreakerState.CLOSED:
            self._cached = None
        if state is BreakerState.OPEN:
            log.warning("breaker.open", breaker=self.name, trial=trial)

    async def _reliably(self, call: Callable[[BreakerStore], Awaitable[T]]) -> T:
        try:
            result = await call(self._store)
        except BusError as exc:
            if not self._degraded:
                log.warning(
                    "breaker.store_unreachable", breaker=self.name, error=str(exc)
                )
            self._degraded = True
            return await call(self._fallback)

        if self._degraded:
            log.info("breaker.store_reachable", breaker=self.name)
        self._degraded = False
        return result


class Breakers:
    """The deployment's breakers by name, with settings from the live config."""

    def __init__(
        self,
        store: BreakerStore,
        config: Callable[[], GatewayConfig],
        *,
        cache_s: float = 0.5,
    ) -> None:
        self._store = store
        self._config = config
        self._cache_s = cache_s
        self._breakers: dict[str, CircuitBreaker] = {}

    def __getitem__(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is not None:
            return breaker
        if name not in self._config().circuit_breakers:
            known = ", ".join(sorted(self._config().circuit_breakers))
            raise KeyError(f"no circuit breaker named {name!r}; configured: {known}")

        breaker = CircuitBreaker(
            name,
            self._store,
            lambda: self._config().breaker(name),
            cache_s=self._cache_s,
        )
        self._breakers[name] = breaker
        return breaker

    def names(self) -> list[str]:
        return sorted(self._config().circuit_breakers)

    async def statuses(self) -> list[BreakerStatus]:
        return [await self[name].status() for name in self.names()]
