"""Backpressure: whether the processors can take one more turn, per user type.

Capacity comes from the processors' heartbeats. Each live processor that is
not draining contributes what it runs at once, less a safety buffer, plus
how much may queue for it::

    int(capacity * (1 - capacity_buffer)) + int(capacity * queue_depth_multiplier)

A busy processor counts in full. Upstream leaves out processors at 80-99 %
load, so capacity shrinks just when work piles up and admission tightens on
top of the queue check; here the queue depth alone says how busy the system
is. Draining processors are left out: they take no new turns.

Each user type may fill the queue (waiting plus running turns) up to its
share of the capacity, ``floor(capacity * ratio)``; privileged users up to
the hard limit. ``max_queue_size`` caps the queue for everyone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from kdcube.bus.ports import Queue, State
from kdcube.gateway.config import BackpressureConfig

AdmissionReason = Literal[
    "no_healthy_processes",
    "queue_size_exceeded",
    "anonymous_threshold",
    "registered_threshold",
    "paid_threshold",
    "hard_limit",
]

_RETRY_AFTER_S: dict[str, int] = {
    "hard_limit": 60,
    "paid_threshold": 45,
    "registered_threshold": 45,
    "anonymous_threshold": 30,
}
_DEFAULT_RETRY_AFTER_S = 30
_EPSILON = 1e-9
"""Keeps products like 10 * 0.9 = 8.999... from flooring one short."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    anonymous: int
    registered: int
    paid: int
    hard: int


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    reason: AdmissionReason | None
    retry_after_s: int
    """Seconds the client should wait when refused; 0 when admitted."""
    queued: int
    capacity: int


def _floor(value: float) -> int:
    return math.floor(value + _EPSILON)


def process_capacity(capacity: int, config: BackpressureConfig) -> int:
    """What one processor of ``capacity`` concurrent turns contributes."""
    running = _floor(capacity * (1 - config.capacity_buffer))
    return running + _floor(capacity * config.queue_depth_multiplier)


def _reported_capacity(info: Mapping[str, Any]) -> int:
    value = info.get("capacity")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, int(value))


def total_capacity(
    heartbeats: Mapping[str, Mapping[str, Any]], config: BackpressureConfig
) -> int:
    """Capacity of every live processor that is not draining.

    ``heartbeats`` is what ``State.alive("proc")`` returns, so stale
    processors are already gone; a beat without a usable capacity counts 0.
    """
    return sum(
        process_capacity(_reported_capacity(info), config)
        for info in heartbeats.values()
        if not info.get("draining", False)
    )


def thresholds(capacity: int, config: BackpressureConfig) -> Thresholds:
    return Thresholds(
        anonymous=_floor(capacity * config.anonymous_pressure_threshold),
        registered=_floor(capacity * config.registered_pressure_threshold),
        paid=_floor(capacity * config.paid_pressure_threshold),
        hard=_floor(capacity * config.hard_limit_threshold),
    )


def _rank(user_type: str) -> int:
    """How far up the thresholds a user type may fill the queue."""
    return {"registered": 1, "paid": 2, "privileged": 3}.get(user_type, 0)


def _over_threshold(
    user_type: str, queued: int, limits: Thresholds
) -> AdmissionReason | None:
    # The reason names the highest threshold crossed, which is what the
    # Retry-After grows with: past the paid threshold only privileged users
    # get in, whatever the caller's own type is.
    rank = _rank(user_type)
    if queued >= limits.hard:
        return "hard_limit"
    if queued >= limits.paid and rank <= 2:
        return "paid_threshold"
    if queued >= limits.registered and rank <= 1:
        return "registered_threshold"
    if queued >= limits.anonymous and rank == 0:
        return "anonymous_threshold"
    return None


def admit(
    user_type: str, queued_total: int, capacity: int, config: BackpressureConfig
) -> Admission:
    """Whether a turn of ``user_type`` may join ``queued_total`` queued turns.

    User types other than registered, paid and privileged (upstream's
    ``external``) are held to the anonymous threshold.
    """
    reason: AdmissionReason | None
    if capacity <= 0:
        reason = "no_healthy_processes"
    elif config.max_queue_size > 0 and queued_total >= config.max_queue_size:
        reason = "queue_size_exceeded"
    else:
        reason = _over_threshold(user_type, queued_total, thresholds(capacity, config))

    if reason is None:
        return Admission(True, None, 0, queued_total, capacity)
    retry = _RETRY_AFTER_S.get(reason, _DEFAULT_RETRY_AFTER_S)
    return Admission(False, reason, retry, queued_total, capacity)


class Backpressure:
    """Admission against the live queue and processors, through the bus ports.

    The queue depth is read on every check; the processors' heartbeats at
    most every ``cache_s``, since they change every few seconds only.
    Bus errors (``BusUnavailable``) reach the caller, whose breaker decides.

    Known shortcoming: the check and the enqueue that follows are two steps,
    so concurrent requests may overfill a threshold by the number of
    requests racing (upstream checks and enqueues in one Lua script).
    """

    def __init__(
        self,
        queue: Queue,
        state: State,
        config: Callable[[], BackpressureConfig],
        *,
        role: str = "proc",
        cache_s: float = 1.0,
    ) -> None:
        self._queue = queue
        self._state = state
        self._config = config
        self._role = role
        self._cache_s = cache_s
        self._heartbeats: dict[str, dict[str, Any]] = {}
        self._read_at = -math.inf
        self._refresh = anyio.Lock()

    async def capacity(self) -> int:
        return total_capacity(await self._live_processors(), self._config())

    async def check(self, user_type: str) -> Admission:
        capacity = await self.capacity()
        stats = await self._queue.stats()

        return admit(user_type, stats.ready + stats.inflight, capacity, self._config())

    async def _live_processors(self) -> dict[str, dict[str, Any]]:
        # One reader refreshes; requests arriving meanwhile wait for its answer
        # rather than all scanning the heartbeats at once.
        async with self._refresh:
            if anyio.current_time() - self._read_at >= self._cache_s:
                self._heartbeats = await self._state.alive(self._role)
                self._read_at = anyio.current_time()
            return self._heartbeats
