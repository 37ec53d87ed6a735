"""The Redis adapters under contract, each test on its own key prefix.

The server is shared, so every test opens the bus under a fresh prefix and
deletes every key under it afterwards. Redis keeps real time, so tests that
use it run trio on the real clock (see ``wants_real_clock``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from coredis import PureToken, Redis

from kdcube.bus.ports import Relay
from kdcube.bus.redis import RedisBus, RedisRelay, open_redis_bus

REDIS_URL = os.environ.get("KDCUBE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_FIXTURES = ("queue", "state", "relay_backend")


def wants_real_clock(request: pytest.FixtureRequest) -> bool:
    """Whether the test runs a Redis adapter, whose TTLs no mock clock drives."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None:
        return False
    return any(callspec.params.get(name) == "redis" for name in _FIXTURES)


def fresh_prefix() -> str:
    return f"kdcube-test-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def redis_bus(
    prefix: str | None = None, *, max_events: int = 10_000
) -> AsyncIterator[RedisBus]:
    """A bus on its own prefix whose keys are all gone once it closes."""
    prefix = prefix or fresh_prefix()
    try:
        async with open_redis_bus(
            REDIS_URL, tenant="t", project="p", prefix=prefix, max_events=max_events
        ) as bus:
            yield bus
    finally:
        await delete_prefix(prefix)


async def delete_prefix(prefix: str) -> None:
    async with Redis.from_url(REDIS_URL, decode_responses=True) as client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.unlink(keys)


async def expire_every_event(relay: Relay) -> None:
    """Trim every session stream to nothing, as if all its events had aged out.

    The streams stay, as they would if their sessions lived on, so the relay
    sees that entries were removed and owns up to the gap.
    """
    assert isinstance(relay, RedisRelay)
    async with Redis.from_url(REDIS_URL, decode_responses=True) as client:
        async for key in client.scan_iter(match=relay.keys.stream_pattern()):
            await client.xtrim(key, trim_strategy=PureToken.MAXLEN, threshold=0)


@asynccontextmanager
async def open_redis_relay(max_events: int) -> AsyncIterator[Relay]:
    async with redis_bus(max_events=max_events) as bus:
        yield bus.relay
