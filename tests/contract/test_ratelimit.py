"""The RateLimiter contract: sliding burst windows and hourly budgets."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from kdcube.gateway import RateLimit

from .conftest import GatewayStores, real_clock_backend

pytestmark = pytest.mark.anyio

LONG = 60.0
"""A burst window no test outlives."""
SHORT = 0.3
"""A burst window tests outlive by sleeping on the real clock."""


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return real_clock_backend(request)


async def test_burst_admits_up_to_its_size(gateway_stores: GatewayStores) -> None:
    limits = RateLimit(hourly=-1, burst=3, burst_window=LONG)
    limiter = gateway_stores.rate_limiter

    decisions = [await limiter.hit("s1", limits) for _ in range(4)]

    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.burst_remaining for d in decisions[:3]] == [2, 1, 0]
    refused = decisions[3]
    assert refused.reason == "burst"
    assert LONG - 2 <= refused.retry_after_s <= LONG
    assert refused.hourly_remaining is None


async def test_retry_after_is_the_time_until_a_slot_frees(
    gateway_stores: GatewayStores,
) -> None:
    limits = RateLimit(hourly=-1, burst=1, burst_window=2.0)
    limiter = gateway_stores.rate_limiter
    assert (await limiter.hit("s1", limits)).allowed

    await anyio.sleep(1.1)
    refused = await limiter.hit("s1", limits)

    # Less than a second is left of the window: not the blanket 2 s.
    assert (refused.allowed, refused.reason, refused.retry_after_s) == (
        False,
        "burst",
        1,
    )


async def test_burst_slots_free_as_the_window_slides(
    gateway_stores: GatewayStores,
) -> None:
    limits = RateLimit(hourly=-1, burst=2, burst_window=SHORT)
    limiter = gateway_stores.rate_limiter
    for _ in range(2):
        assert (await limiter.hit("s1", limits)).allowed
    assert not (await limiter.hit("s1", limits)).allowed

    await anyio.sleep(SHORT * 1.3)

    assert (await limiter.hit("s1", limits)).allowed


async def test_hourly_budget_runs_out(gateway_stores: GatewayStores) -> None:
    limits = RateLimit(hourly=3, burst=100, burst_window=LONG)
    limiter = gateway_stores.rate_limiter

    decisions = [await limiter.hit("s1", limits) for _ in range(4)]

    assert [d.hourly_remaining for d in decisions[:3]] == [2, 1, 0]
    refused = decisions[3]
    assert (refused.allowed, refused.reason) == (False, "hourly")
    assert 1 <= refused.retry_after_s <= 3600


async def test_refused_requests_are_not_counted(
    gateway_stores: GatewayStores,
) -> None:
    limits = RateLimit(hourly=4, burst=2, burst_window=SHORT)
    limiter = gateway_stores.rate_limiter
    for _ in range(2):
        assert (await limiter.hit("s1", limits)).allowed
    for _ in range(5):
        assert (await limiter.hit("s1", limits)).reason == "burst"

    await anyio.sleep(SHORT * 1.3)
    again = [await limiter.hit("s1", limits) for _ in range(2)]

    assert [d.allowed for d in again] == [True, True]
    assert again[-1].hourly_remaining == 0


async def test_sessions_are_independent(gateway_stores: GatewayStores) -> None:
    limits = RateLimit(hourly=2, burst=2, burst_window=LONG)
    limiter = gateway_stores.rate_limiter
    for _ in range(2):
        await limiter.hit("s1", limits)

    assert not (await limiter.hit("s1", limits)).allowed
    other = await limiter.hit("s2", limits)
    assert (other.allowed, other.burst_remaining, other.hourly_remaining) == (
        True,
        1,
        1,
    )


async def test_records_vanish_once_the_window_passed(
    gateway_stores: GatewayStores,
) -> None:
    limits = RateLimit(hourly=-1, burst=5, burst_window=SHORT)
    limiter = gateway_stores.rate_limiter
    await limiter.hit("s1", limits)
    await limiter.hit("s2", limits)
    assert await gateway_stores.leftovers() == 2

    await anyio.sleep(SHORT * 1.5)

    assert await gateway_stores.leftovers() == 0


async def test_hourly_records_expire_too(gateway_stores: GatewayStores) -> None:
    limits = RateLimit(hourly=10, burst=5, burst_window=SHORT)
    await gateway_stores.rate_limiter.hit("s1", limits)

    # The burst record plus the hour's counter (Redis), each with a TTL.
    assert await gateway_stores.leftovers() >= 1
