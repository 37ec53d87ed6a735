"""The processor's timing rules, on Trio's autojump clock (no real waiting)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio

from kdcube.bundles import BundleSpec, LoadedBundle
from kdcube.bus import TurnJob
from kdcube.bus.memory import MemoryBus, open_memory_bus
from kdcube.proc import Processor, ProcessorOptions
from kdcube.sdk import TurnContext
from kdcube.store import NewTurn, TurnOutcome, TurnState
from kdcube.store.sqlite import SqliteStore, open_sqlite_store
from kdcube.wire.events import now_ms

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    # The clock jumps only after 50 ms of real idleness: the store's worker
    # threads finish well within that, so a jump never lands while a thread
    # is busy (which would expire the short cleanup deadline around it).
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0.05)}


Run = Callable[[TurnContext], Awaitable[str | None]]


@dataclass
class Rig:
    bus: MemoryBus
    store: SqliteStore
    processor: Processor

    async def submit(self, turn_id: str, conversation_id: str = "c1") -> None:
        await self.store.submit_turn(
            NewTurn("u1", conversation_id, True, "b", turn_id, "r", "regular", "hi")
        )
        job = TurnJob(
            turn_id,
            conversation_id,
            "s1",
            None,
            "r",
            "t",
            "p",
            "u1",
            "registered",
            "b",
            "hi",
            "regular",
            now_ms(),
        )
        await self.bus.queue.enqueue(job)

    async def routes(self, turn_id: str) -> list[str]:
        """Routes of the turn's events published so far, in order."""
        read = await self.bus.relay.read("s1", "0-0", stream_id="x", timeout_s=0)
        return [
            e.route
            for e in read.events
            if json.loads(e.data_json)["conversation"]["turn_id"] == turn_id
        ]

    async def ending(self, turn_id: str) -> dict[str, object]:
        """The turn's terminal event, waited for on the relay for at most a
        simulated day (the autojump clock gets there fast when none comes)."""
        cursor = "0-0"
        with anyio.fail_after(86400):
            while True:
                read = await self.bus.relay.read(
                    "s1", cursor, stream_id="x", timeout_s=3600
                )
                cursor = read.cursor
                for event in read.events:
                    body = json.loads(event.data_json)
                    if event.route in ("chat_complete", "chat_error") and (
                        body["conversation"]["turn_id"] == turn_id
                    ):
                        data: dict[str, object] = body["data"]
                        return data


@asynccontextmanager
async def rig(
    tmp_path: Path,
    run: Run,
    *,
    rerun_safe: bool = False,
    before_start: Callable[[Rig], Awaitable[None]] | None = None,
    **options: float,
) -> AsyncIterator[Rig]:
    spec = BundleSpec(id="b", path=tmp_path, module="entrypoint")
    bundles = {"b": LoadedBundle(spec, run, "test", rerun_safe=rerun_safe)}
    async with (
        # Retention far beyond the longest simulated turn: the autojump clock
        # flies through hours, and the sweeper must not drop what the test reads.
        open_memory_bus(retention_s=1e9) as bus,
        open_sqlite_store(tmp_path / "db.sqlite3") as store,
        anyio.create_task_group() as tasks,
    ):
        # Few timers besides the ones under test, so that few jumps are needed.
        settings = {"heartbeat_s": 1e6, "lease_s": 1e5, **options}
        processor = Processor(bus, store, bundles, ProcessorOptions(**settings))  # type: ignore[arg-type]
        prepared = Rig(bus, store, processor)
        if before_start is not None:
            await before_start(prepared)
        await tasks.start(processor.serve)
        yield prepared
        processor.begin_drain()


class Timed:
    """Wraps a bundle and notes, on the event loop's clock, how long it ran.

    The test's own clock readings would include the autojumps that happen
    while the store works in a thread; the bundle's are exact.
    """

    def __init__(self, run: Run) -> None:
        self._run = run
        self.started = anyio.Event()
        self.ended_at: float | None = None
        self.ran_for: float | None = None

    async def __call__(self, ctx: TurnContext) -> str | None:
        start = trio.current_time()
        self.started.set()
        try:
            return await self._run(ctx)
        finally:
            self.ended_at = trio.current_time()
            self.ran_for = self.ended_at - start


async def _quiet(ctx: TurnContext) -> str:
    await anyio.sleep_forever()
    return "never"


async def _chatty_forever(ctx: TurnContext) -> str:
    while True:
        await ctx.delta(".")
        await anyio.sleep(500)


async def _slow_answer(ctx: TurnContext) -> str:
    for _ in range(10):
        await anyio.sleep(0.2)
        await ctx.delta(".")
    return "done after ten leases"


async def test_idle_watchdog_stops_a_quiet_bundle(tmp_path: Path) -> None:
    bundle = Timed(_quiet)
    async with rig(tmp_path, bundle, idle_timeout_s=600) as r:
        await r.submit("t1")
        ending = await r.ending("t1")

    assert (ending["error_type"], ending["reason"]) == ("timeout", "idle")
    assert bundle.ran_for is not None and 600 <= bundle.ran_for < 601


async def test_wall_time_stops_a_bundle_that_keeps_talking(tmp_path: Path) -> None:
    bundle = Timed(_chatty_forever)
    async with rig(tmp_path, bundle, idle_timeout_s=600, wall_timeout_s=2400) as r:
        await r.submit("t1")
        ending = await r.ending("t1")

    assert (ending["error_type"], ending["reason"]) == ("timeout", "wall")
    assert bundle.ran_for is not None and 2400 <= bundle.ran_for < 2401


async def test_the_lease_is_renewed_while_a_turn_runs_long(tmp_path: Path) -> None:
    async with rig(tmp_path, _slow_answer, lease_s=0.2) as r:
        await r.submit("t1")
        ending = await r.ending("t1")
        stats = await r.bus.queue.stats()
        detail = await r.store.conversation("u1", "c1")

    assert ending["final_answer"] == "done after ten leases"
    assert stats.inflight == 0 and stats.ready == 0
    assert [t.state.value for t in detail.turns] == ["completed"]


async def test_drain_deadline_interrupts_what_is_still_running(tmp_path: Path) -> None:
    bundle = Timed(_quiet)
    async with rig(tmp_path, bundle, drain_timeout_s=30) as r:
        await r.submit("t1")
        await bundle.started.wait()
        begun = trio.current_time()
        r.processor.begin_drain()
        ending = await r.ending("t1")

    assert (ending["error_type"], ending["reason"]) == (
        "turn_interrupted",
        "server_shutdown",
    )
    assert bundle.ended_at is not None and 30 <= bundle.ended_at - begun < 31


async def test_concurrency_is_bounded(tmp_path: Path) -> None:
    async with rig(tmp_path, _quiet, concurrency=3) as r:
        for n in range(5):
            await r.submit(f"t{n}", conversation_id=f"c{n}")
        await trio.testing.wait_all_tasks_blocked()
        running = r.processor.in_flight
        waiting = (await r.bus.queue.stats()).ready

    assert (running, waiting) == (3, 2)


async def _rerun_safe_echo(ctx: TurnContext) -> str:
    await ctx.delta(ctx.prompt)
    return ctx.prompt


async def _crash_while_running(
    r: Rig, *, turn_id: str, marked_in_queue: bool = True
) -> None:
    """Play a processor that claimed and started a turn, then died (before
    it could mark the turn started in the queue, unless ``marked_in_queue``)."""
    await r.submit(turn_id)
    claim = await r.bus.queue.claim("dead-processor", lease_s=1.0)
    await r.store.start_turn(turn_id)
    if marked_in_queue:
        await r.bus.queue.mark_started(claim)


@pytest.mark.parametrize("marked_in_queue", [True, False])
@pytest.mark.parametrize(("rerun_safe", "expected"), [(True, "hi"), (False, None)])
async def test_a_turn_whose_processor_died_reruns_once_only_if_safe(
    tmp_path: Path, rerun_safe: bool, expected: str | None, marked_in_queue: bool
) -> None:
    crash = partial(_crash_while_running, turn_id="t1", marked_in_queue=marked_in_queue)
    async with rig(
        tmp_path, _rerun_safe_echo, rerun_safe=rerun_safe, before_start=crash
    ) as r:
        ending = await r.ending("t1")
        routes = await r.routes("t1")

    if expected is None:
        assert (ending["error_type"], ending["reason"]) == (
            "turn_interrupted",
            "worker_lost_after_start",
        )
        assert "chat_service" not in routes
    else:
        assert ending["final_answer"] == expected
        assert routes.count("chat_service") == 1
    assert routes.count("chat_complete") + routes.count("chat_error") == 1


async def test_a_second_crash_ends_the_turn_even_if_rerun_is_safe(
    tmp_path: Path,
) -> None:
    async def crash_twice(r: Rig) -> None:
        await _crash_while_running(r, turn_id="t1")
        with anyio.fail_after(5):
            await r.bus.queue.claim("second-dead-processor", lease_s=1.0)
        # The second processor took the one rerun (its notice is the record),
        # then died as well.
        await r.bus.relay.publish(
            "s1", "chat_service", "{}", stream_id=None, once="t1:rerun"
        )

    async with rig(
        tmp_path, _rerun_safe_echo, rerun_safe=True, before_start=crash_twice
    ) as r:
        ending = await r.ending("t1")

    assert ending["error_type"] == "turn_interrupted"


async def test_an_ending_recorded_but_never_announced_is_announced_once(
    tmp_path: Path,
) -> None:
    async def die_after_recording(r: Rig) -> None:
        await _crash_while_running(r, turn_id="t1")
        outcome = TurnOutcome(TurnState.COMPLETED, final_answer="from the dead")
        await r.store.finish_turn("t1", outcome)

    async with rig(
        tmp_path, _rerun_safe_echo, rerun_safe=True, before_start=die_after_recording
    ) as r:
        ending = await r.ending("t1")
        routes = await r.routes("t1")

    assert ending["final_answer"] == "from the dead"
    assert routes.count("chat_complete") == 1
    assert "chat_service" not in routes, "a turn that had ended is not rerun"


class Stubborn:
    """A bundle that ignores cancellation for ``hold_s``, then tries to talk."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.started = anyio.Event()
        self.finished_at: float | None = None
        self.late_emit: BaseException | None = None

    async def __call__(self, ctx: TurnContext) -> str:
        await ctx.delta("working")
        self.started.set()
        with anyio.CancelScope(shield=True):
            await anyio.sleep(self.hold_s)
            try:
                await ctx.delta("too late")
            except Exception as exc:
                self.late_emit = exc
        self.finished_at = trio.current_time()
        return "never seen"


async def test_a_bundle_ignoring_cancel_loses_its_turn_after_the_grace(
    tmp_path: Path,
) -> None:
    stubborn = Stubborn(hold_s=100)
    async with rig(
        tmp_path, stubborn, concurrency=1, cancel_grace_s=5, drain_timeout_s=30
    ) as r:
        await r.submit("t1")
        await stubborn.started.wait()
        begun = trio.current_time()
        r.processor.begin_drain()
        ending = await r.ending("t1")
        ended_at = trio.current_time()
        # The turn lets go of its slot only after settling (the ending is
        # published, the queue acked); wait for that, not for the bundle. The
        # processor offers no event for it, and on the autojump clock a poll
        # costs no real time.
        while r.processor.in_flight and stubborn.finished_at is None:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        in_flight, freed_at = r.processor.in_flight, trio.current_time()
        routes = await r.routes("t1")

    assert (ending["error_type"], ending["reason"]) == (
        "turn_interrupted",
        "server_shutdown",
    )
    assert 35 <= ended_at - begun < 36, "drain deadline plus the grace, no more"
    assert in_flight == 0, "the slot is free while the bundle still runs"
    assert stubborn.finished_at is not None and stubborn.finished_at - begun >= 100
    assert freed_at - begun < 40, "freed at the deadline, not when the bundle ended"
    assert type(stubborn.late_emit).__name__ == "TurnEnded"
    assert routes.count("chat_delta") == 1 and routes[-1] == "conv_status"


async def test_a_cancelled_turn_frees_its_slot_for_the_next_one(
    tmp_path: Path,
) -> None:
    stubborn = Stubborn(hold_s=100)

    async def either(ctx: TurnContext) -> str | None:
        if ctx.turn_id == "t1":
            return await stubborn(ctx)
        return "second"

    async with rig(tmp_path, either, concurrency=1, cancel_grace_s=5) as r:
        await r.submit("t1", conversation_id="c1")
        await stubborn.started.wait()
        await r.bus.queue.cancel("t1")
        await r.submit("t2", conversation_id="c2")
        first = await r.ending("t1")
        second = await r.ending("t2")
        still_running = stubborn.finished_at is None

    assert first["error_type"] == "cancelled"
    assert second["final_answer"] == "second"
    assert still_running, "the second turn ran while the first bundle held on"
