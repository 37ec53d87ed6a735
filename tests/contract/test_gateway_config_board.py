"""The ConfigBoard contract: a config applied anywhere runs everywhere soon."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from kdcube.bus.board import MemoryBoard, RedisBoard
from kdcube.bus.memory import open_memory_bus
from kdcube.gateway import (
    ConfigBoard,
    GatewayConfig,
    open_gateway_backends,
    parse_gateway_config,
)

from .conftest import GATEWAY_POLL_S, GatewayStores, real_clock_backend
from .redis_backend import REDIS_URL, redis_bus

pytestmark = pytest.mark.anyio

SEEN_WITHIN_S = 2.0
"""How soon every watcher must run a new version (the promise is ~1 s)."""
TIGHT = parse_gateway_config(
    """
    gateway:
      profile: production
      rate_limits: {anonymous: {hourly: 5, burst: 2}}
      backpressure: {max_queue_size: 7}
    """
)


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return real_clock_backend(request)


async def _watching(tasks: anyio.abc.TaskGroup, board: ConfigBoard) -> ConfigBoard:
    await tasks.start(board.watch)
    return board


async def _seen(board: ConfigBoard, version: int) -> GatewayConfig:
    with anyio.fail_after(SEEN_WITHIN_S):
        await board.wait_version(version)
    return board.current()


async def test_an_applied_config_reaches_another_watcher(
    gateway_stores: GatewayStores,
) -> None:
    applier, watcher = gateway_stores.boards
    async with anyio.create_task_group() as tasks:
        await _watching(tasks, watcher)
        assert watcher.current() == GatewayConfig()

        version = await applier.apply(TIGHT, actor="admin")

        assert applier.current() == TIGHT
        assert applier.version == version
        assert await _seen(watcher, version) == TIGHT
        tasks.cancel_scope.cancel()


async def test_versions_grow_and_reset_returns_to_the_baseline(
    gateway_stores: GatewayStores,
) -> None:
    applier, watcher = gateway_stores.boards
    async with anyio.create_task_group() as tasks:
        await _watching(tasks, watcher)
        first = await applier.apply(TIGHT)

        second = await applier.reset(actor="admin")

        assert second > first
        assert applier.current() == GatewayConfig()
        assert await _seen(watcher, second) == GatewayConfig()
        tasks.cancel_scope.cancel()


async def test_a_process_starting_later_runs_the_applied_config(
    gateway_stores: GatewayStores,
) -> None:
    applier, _ = gateway_stores.boards
    version = await applier.apply(TIGHT)

    async with anyio.create_task_group() as tasks:
        late = await _watching(tasks, gateway_stores.open_board())

        assert (late.version, late.current()) == (version, TIGHT)
        tasks.cancel_scope.cancel()


async def test_an_invalid_document_never_replaces_the_config(
    gateway_stores: GatewayStores,
) -> None:
    if gateway_stores.corrupt_board is None:
        pytest.skip("only a shared store can hold a document nobody validated")
    applier, watcher = gateway_stores.boards
    async with anyio.create_task_group() as tasks:
        await _watching(tasks, watcher)
        good = await applier.apply(TIGHT)
        await _seen(watcher, good)

        await gateway_stores.corrupt_board()
        # Several polls, so the watcher has read the bad document.
        await anyio.sleep(GATEWAY_POLL_S * 4)

        assert (watcher.version, watcher.current()) == (good, TIGHT)
        fixed = await applier.apply(GatewayConfig(profile="testing"))
        assert (await _seen(watcher, fixed)).profile == "testing"
        tasks.cancel_scope.cancel()


async def test_backends_open_in_memory_next_to_an_embedded_bus() -> None:
    async with open_memory_bus() as bus:
        async with open_gateway_backends(bus, TIGHT) as backends:
            assert isinstance(backends.board, MemoryBoard)
            assert backends.board.current() == TIGHT


@pytest.mark.parametrize("bus_kind", ["redis"])
async def test_backends_open_on_the_redis_of_a_redis_bus(bus_kind: str) -> None:
    async with redis_bus() as bus:
        async with open_gateway_backends(bus, TIGHT, redis_url=REDIS_URL) as backends:
            assert isinstance(backends.board, RedisBoard)
            limits = TIGHT.rate_limits.anonymous
            assert (await backends.rate_limiter.hit("s1", limits)).allowed
