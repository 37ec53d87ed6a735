"""Capacity and admission: upstream's worked example, and the live check."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import trio

from kdcube.bus.memory import open_memory_bus
from kdcube.bus.ports import TurnJob
from kdcube.gateway import (
    Backpressure,
    BackpressureConfig,
    Thresholds,
    admit,
    thresholds,
    total_capacity,
)

SHIPPED = BackpressureConfig()


def _proc(capacity: Any = 10, **extra: Any) -> dict[str, Any]:
    return {"capacity": capacity, "in_flight": 0, "draining": False, **extra}


def test_one_processor_of_ten_gives_39() -> None:
    capacity = total_capacity({"p1": _proc()}, SHIPPED)

    assert capacity == 39
    assert thresholds(capacity, SHIPPED) == Thresholds(23, 33, 35, 38)


def test_two_processors_give_78() -> None:
    capacity = total_capacity({"p1": _proc(), "p2": _proc()}, SHIPPED)

    assert capacity == 78
    assert thresholds(capacity, SHIPPED) == Thresholds(46, 66, 70, 76)


def test_busy_processors_count_in_full() -> None:
    busy = {"p1": _proc(in_flight=9), "p2": _proc(in_flight=10)}

    assert total_capacity(busy, SHIPPED) == 78


def test_draining_and_malformed_beats_do_not_count() -> None:
    beats = {
        "p1": _proc(),
        "p2": _proc(draining=True),
        "p3": _proc(capacity="ten"),
        "p4": _proc(capacity=True),
        "p5": {"in_flight": 0},
    }

    assert total_capacity(beats, SHIPPED) == 39


def test_flooring_does_not_lose_a_slot_to_rounding() -> None:
    config = BackpressureConfig(capacity_buffer=0.9, queue_depth_multiplier=0.3)

    # 10 * (1 - 0.9) is 0.9999999999999998 in floating point.
    assert total_capacity({"p1": _proc()}, config) == 1 + 3


@pytest.mark.parametrize(
    ("user_type", "queued", "admitted", "reason", "retry_after"),
    [
        ("anonymous", 22, True, None, 0),
        ("anonymous", 23, False, "anonymous_threshold", 30),
        ("external", 23, False, "anonymous_threshold", 30),
        ("registered", 32, True, None, 0),
        ("registered", 33, False, "registered_threshold", 45),
        ("anonymous", 33, False, "registered_threshold", 45),
        ("paid", 34, True, None, 0),
        ("paid", 35, False, "paid_threshold", 45),
        ("registered", 35, False, "paid_threshold", 45),
        ("privileged", 37, True, None, 0),
        ("privileged", 38, False, "hard_limit", 60),
        ("anonymous", 38, False, "hard_limit", 60),
    ],
)
def test_admission_by_user_type(
    user_type: str, queued: int, admitted: bool, reason: str | None, retry_after: int
) -> None:
    admission = admit(user_type, queued, 39, SHIPPED)

    assert (admission.admitted, admission.reason, admission.retry_after_s) == (
        admitted,
        reason,
        retry_after,
    )
    assert (admission.queued, admission.capacity) == (queued, 39)


def test_no_capacity_means_no_healthy_processes() -> None:
    admission = admit("privileged", 0, 0, SHIPPED)

    assert (admission.admitted, admission.reason, admission.retry_after_s) == (
        False,
        "no_healthy_processes",
        30,
    )


def test_the_absolute_queue_cap_applies_to_everyone() -> None:
    capacity = total_capacity({f"p{i}": _proc() for i in range(10)}, SHIPPED)

    refused = admit("privileged", 100, capacity, SHIPPED)
    unlimited = admit(
        "privileged", 100, capacity, SHIPPED.model_copy(update={"max_queue_size": 0})
    )

    assert (refused.reason, refused.retry_after_s) == ("queue_size_exceeded", 30)
    assert unlimited.admitted


def _job(turn_id: str) -> TurnJob:
    return TurnJob(
        turn_id,
        f"c-{turn_id}",
        "s",
        None,
        "r",
        "t",
        "p",
        "u",
        "anonymous",
        "b",
        "hi",
        "regular",
        0,
    )


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


@pytest.mark.anyio
async def test_backpressure_reads_the_queue_and_live_processors() -> None:
    config = SHIPPED.model_copy(update={"anonymous_pressure_threshold": 0.05})
    async with open_memory_bus() as bus:
        backpressure = Backpressure(bus.queue, bus.state, lambda: config)
        assert (await backpressure.check("anonymous")).reason == (
            "no_healthy_processes"
        )

        await bus.state.beat("proc", "p1", _proc(), ttl_s=30)
        await anyio.sleep(1.0)
        assert (await backpressure.check("anonymous")).admitted

        await bus.queue.enqueue(_job("t1"))
        await bus.queue.enqueue(_job("t2"))
        refused = await backpressure.check("anonymous")
        assert (refused.reason, refused.queued, refused.capacity) == (
            "anonymous_threshold",
            2,
            39,
        )
        assert (await backpressure.check("registered")).admitted


@pytest.mark.anyio
async def test_backpressure_caches_heartbeats_briefly() -> None:
    async with open_memory_bus() as bus:
        await bus.state.beat("proc", "p1", _proc(), ttl_s=30)
        backpressure = Backpressure(bus.queue, bus.state, lambda: SHIPPED, cache_s=1.0)
        assert await backpressure.capacity() == 39

        await bus.state.beat("proc", "p2", _proc(), ttl_s=30)
        assert await backpressure.capacity() == 39

        await anyio.sleep(1.0)
        assert await backpressure.capacity() == 78
