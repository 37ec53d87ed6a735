"""Opening the gateway's stores next to a bus: in memory, or on its Redis.

The Redis stores use a client of their own on the bus's server and key
layout, because the bus keeps its clients to itself; a small pool suffices,
since every gateway command is short.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from coredis import Redis
from coredis.retry import NoRetryPolicy

from kdcube.bus.ports import Bus
from kdcube.bus.redis import RedisBus
from kdcube.bus.redis.errors import translated
from kdcube.bus.redis.keys import KeyLayout
from kdcube.gateway.breakers import BreakerStore, MemoryBreakerStore, RedisBreakerStore
from kdcube.gateway.config import GatewayConfig
from kdcube.gateway.distribution import (
    ConfigBoard,
    MemoryConfigBoard,
    RedisConfigBoard,
)
from kdcube.gateway.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from kdcube.groups import sole_exception

_MAX_CONNECTIONS = 16


@dataclass(frozen=True, slots=True)
class GatewayBackends:
    rate_limiter: RateLimiter
    breaker_store: BreakerStore
    board: ConfigBoard


def memory_backends(baseline: GatewayConfig) -> GatewayBackends:
    return GatewayBackends(
        MemoryRateLimiter(), MemoryBreakerStore(), MemoryConfigBoard(baseline)
    )


def redis_backends(
    commands: Redis[str], keys: KeyLayout, baseline: GatewayConfig
) -> GatewayBackends:
    """Stores on a client the caller owns (decode_responses=True, no retries:
    a rate check whose reply was lost must not count twice)."""
    return GatewayBackends(
        RedisRateLimiter(commands, keys),
        RedisBreakerStore(commands, keys),
        RedisConfigBoard(commands, keys, baseline),
    )


@asynccontextmanager
async def open_redis_backends(
    url: str, keys: KeyLayout, baseline: GatewayConfig
) -> AsyncIterator[GatewayBackends]:
    """Connect to the Redis at ``url`` and check that it answers."""
    client: Redis[str] = Redis.from_url(
        url,
        decode_responses=True,
        retry_policy=NoRetryPolicy(),
        max_connections=_MAX_CONNECTIONS,
    )
    try:
        async with client:
            async with translated("connect the gateway to Redis"):
                await client.ping()
            yield redis_backends(client, keys, baseline)
    except BaseExceptionGroup as group:
        # As in open_redis_bus: coredis's pool task group wraps what crosses it.
        sole = sole_exception(group)
        if sole is None:
            raise
        raise sole from sole.__cause__


@asynccontextmanager
async def open_gateway_backends(
    bus: Bus, baseline: GatewayConfig, *, redis_url: str | None = None
) -> AsyncIterator[GatewayBackends]:
    """Stores that match the bus: shared in Redis when the bus is, else in memory."""
    if not isinstance(bus, RedisBus):
        yield memory_backends(baseline)
        return

    if redis_url is None:
        raise ValueError("a Redis bus needs redis_url for the gateway's stores")
    async with open_redis_backends(redis_url, bus.keys, baseline) as backends:
        yield backends
