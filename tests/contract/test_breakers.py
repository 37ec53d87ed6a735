"""The BreakerStore contract, through CircuitBreaker, over two shared handles.

Each test drives one breaker from two processes' handles (``a`` and ``b``)
on one store, so every transition must be visible across them.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from kdcube.bus.ports import BusUnavailable
from kdcube.gateway import (
    BreakerSettings,
    BreakerState,
    BreakerStore,
    CircuitBreaker,
    CircuitOpen,
    MemoryBreakerStore,
)
from kdcube.gateway.breakers import Verdict

from .conftest import GatewayStores, real_clock_backend

pytestmark = pytest.mark.anyio

RECOVERY = 0.3
SETTINGS = BreakerSettings(
    failure_threshold=3,
    window_s=30,
    recovery_timeout_s=RECOVERY,
    success_threshold=2,
    half_open_max_calls=2,
)


class Boom(Exception):
    """The failure the breakers under test count."""


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return real_clock_backend(request)


def _breaker(
    store: BreakerStore, settings: BreakerSettings = SETTINGS
) -> CircuitBreaker:
    return CircuitBreaker(
        "redis", store, lambda: settings, failures=(Boom,), cache_s=0.0
    )


@pytest.fixture
def pair(gateway_stores: GatewayStores) -> tuple[CircuitBreaker, CircuitBreaker]:
    first, second = gateway_stores.breaker_stores
    return _breaker(first), _breaker(second)


async def _fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            async with breaker.guard():
                raise Boom


async def _succeed(breaker: CircuitBreaker) -> None:
    async with breaker.guard():
        pass


async def _open(breaker: CircuitBreaker) -> None:
    await _fail(breaker, SETTINGS.failure_threshold)
    assert (await breaker.status()).state is BreakerState.OPEN


async def test_failures_open_the_breaker_for_every_process(
    pair: tuple[CircuitBreaker, CircuitBreaker],
) -> None:
    a, b = pair
    await _fail(a, 2)
    assert (await b.status()).failures == 2
    await _succeed(b)

    await _fail(a)

    with pytest.raises(CircuitOpen) as refused:
        async with b.guard():
            pytest.fail("an open breaker ran the block")
    assert refused.value.name == "redis"
    assert refused.value.retry_after_s == 1


async def test_only_the_chosen_exceptions_count(
    pair: tuple[CircuitBreaker, CircuitBreaker],
) -> None:
    a, b = pair
    for _ in range(5):
        with pytest.raises(KeyError):
            async with a.guard():
                raise KeyError("not a failure of the dependency")
    with pytest.raises(KeyError):
        async with b.guard(failures=(KeyError,)):
            raise KeyError("counted this time")

    status = await b.status()
    assert (status.state, status.failures) == (BreakerState.CLOSED, 1)


async def test_failures_outside_the_window_do_not_count(
    gateway_stores: GatewayStores,
) -> None:
    settings = SETTINGS.model_copy(update={"window_s": 0.3})
    a, b = (_breaker(store, settings) for store in gateway_stores.breaker_stores)
    await _fail(a, 2)

    await anyio.sleep(0.4)
    await _fail(b)

    status = await a.status()
    assert (status.state, status.failures) == (BreakerState.CLOSED, 1)


async def test_half_open_admits_a_bounded_number_of_trials(
    pair: tuple[CircuitBreaker, CircuitBreaker],
) -> None:
    a, b = pair
    await _open(a)
    await anyio.sleep(RECOVERY * 1.2)

    async with a.guard(), b.guard():
        assert (await a.status()).state is BreakerState.HALF_OPEN
        with pytest.raises(CircuitOpen):
            async with a.guard():
                pytest.fail("a third trial ran")

    assert (await b.status()).state is BreakerState.CLOSED
    await _succeed(a)


async def test_a_failed_trial_opens_the_breaker_again(
    pair: tuple[CircuitBreaker, CircuitBreaker],
) -> None:
    a, b = pair
    await _open(a)
    await anyio.sleep(RECOVERY * 1.2)

    await _fail(b)

    with pytest.raises(CircuitOpen):
        await _succeed(a)
    assert (await a.status()).state is BreakerState.OPEN


async def test_a_late_failure_from_before_opening_does_not_reopen(
    pair: tuple[CircuitBreaker, CircuitBreaker],
) -> None:
    a, b = pair
    with pytest.raises(Boom):
        async with a.guard():
            await _open(b)
            await anyio.sleep(RECOVERY * 1.2)
            await _succeed(b)
            raise Boom

    assert (await a.status()).state is BreakerState.HALF_OPEN
    await _succeed(a)
    assert (await b.status()).state is BreakerState.CLOSED


async def test_trials_lost_in_flight_free_their_slots_after_recovery(
    pair: tuple[CircuitBreaker, CircuitBreaker],
) -> None:
    a, b = pair
    await _open(a)
    await anyio.sleep(RECOVERY * 1.2)
    for _ in range(SETTINGS.half_open_max_calls):
        with anyio.CancelScope() as scope:
            async with a.guard():
                scope.cancel()
                await anyio.sleep_forever()
    with pytest.raises(CircuitOpen):
        await _succeed(b)

    await anyio.sleep(RECOVERY * 1.2)

    await _succeed(b)
    await _succeed(b)
    assert (await a.status()).state is BreakerState.CLOSED


async def test_reset_closes_the_breaker(
    pair: tuple[CircuitBreaker, CircuitBreaker],
) -> None:
    a, b = pair
    await _open(a)

    await b.reset()

    await _succeed(a)
    status = await a.status()
    assert (status.state, status.failures) == (BreakerState.CLOSED, 0)


class _Unreachable:
    """A store whose backing service is down."""

    async def acquire(self, name: str, settings: BreakerSettings) -> Verdict:
        raise BusUnavailable("down")

    async def failed(
        self, name: str, settings: BreakerSettings, *, trial: bool
    ) -> BreakerState:
        raise BusUnavailable("down")

    async def succeeded(self, name: str, settings: BreakerSettings) -> BreakerState:
        raise BusUnavailable("down")

    async def status(self, name: str, settings: BreakerSettings) -> Any:
        raise BusUnavailable("down")

    async def reset(self, name: str) -> None:
        raise BusUnavailable("down")


async def test_a_breaker_still_opens_when_its_store_is_down() -> None:
    breaker = CircuitBreaker(
        "redis", _Unreachable(), lambda: SETTINGS, failures=(BusUnavailable,)
    )
    for _ in range(SETTINGS.failure_threshold):
        with pytest.raises(BusUnavailable):
            async with breaker.guard():
                raise BusUnavailable("the dependency is down too")

    with pytest.raises(CircuitOpen):
        await _succeed(breaker)


async def test_a_cached_closed_answer_still_records_failures() -> None:
    store = MemoryBreakerStore()
    breaker = CircuitBreaker("redis", store, lambda: SETTINGS, failures=(Boom,))
    await _open(breaker)

    with pytest.raises(CircuitOpen):
        await _succeed(breaker)
