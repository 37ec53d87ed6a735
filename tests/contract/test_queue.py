"""The Queue contract: order, exclusivity per conversation, leases, cancels."""

from __future__ import annotations

from collections import defaultdict

import anyio
import pytest

from kdcube.bus.ports import CancelOutcome, Claim, LeaseLost, Queue, TurnJob

pytestmark = pytest.mark.anyio

HOLD = 30.0
"""A lease no test outlives, for claims whose expiry is not under test."""
SHORT = 0.1
"""A lease a test does outlive, by waiting on the adapter's clock."""
PROBE = 0.02
"""How long a probe waits to show that nothing is claimable."""


def job(turn_id: str, conversation_id: str = "c1") -> TurnJob:
    return TurnJob(
        turn_id=turn_id,
        conversation_id=conversation_id,
        session_id="s1",
        stream_id=None,
        request_id=f"r-{turn_id}",
        tenant="t",
        project="p",
        user_id="u1",
        user_type="registered",
        bundle_id="echo",
        prompt=f"prompt of {turn_id}",
        message_kind="chat",
        enqueued_at_ms=0,
    )


async def probe(queue: Queue) -> Claim | None:
    """Claim what is claimable within PROBE seconds, if anything."""
    with anyio.move_on_after(PROBE):
        return await queue.claim("probe", lease_s=HOLD)
    return None


async def drain(queue: Queue, count: int) -> list[str]:
    """Claim and ack ``count`` turns one after another; their ids in order."""
    taken = []
    for _ in range(count):
        claim = await queue.claim("c", lease_s=HOLD)
        taken.append(claim.job.turn_id)
        await queue.ack(claim)
    return taken


async def test_turns_of_different_conversations_come_out_in_enqueue_order(
    queue: Queue,
) -> None:
    for turn_id, conversation_id in [("t1", "b"), ("t2", "a"), ("t3", "c")]:
        await queue.enqueue(job(turn_id, conversation_id))

    claims = [await queue.claim("c", lease_s=HOLD) for _ in range(3)]

    assert [claim.job.turn_id for claim in claims] == ["t1", "t2", "t3"]
    assert [claim.deliveries for claim in claims] == [1, 1, 1]
    assert not any(claim.started for claim in claims)
    assert all(claim.consumer == "c" for claim in claims)


async def test_claim_returns_the_job_as_enqueued(queue: Queue) -> None:
    original = job("t1")

    await queue.enqueue(original)
    claim = await queue.claim("c", lease_s=HOLD)

    assert claim.job == original


async def test_a_conversation_has_at_most_one_claimed_turn(queue: Queue) -> None:
    await queue.enqueue(job("a1", "a"))
    await queue.enqueue(job("a2", "a"))
    await queue.enqueue(job("b1", "b"))

    first = await queue.claim("c", lease_s=HOLD)
    second = await queue.claim("c", lease_s=HOLD)
    assert (first.job.turn_id, second.job.turn_id) == ("a1", "b1")
    assert await probe(queue) is None

    await queue.ack(first)
    third = await queue.claim("c", lease_s=HOLD)
    assert third.job.turn_id == "a2"


async def test_turns_of_a_conversation_come_out_in_enqueue_order(
    queue: Queue,
) -> None:
    for index in range(5):
        await queue.enqueue(job(f"t{index}"))

    assert await drain(queue, 5) == ["t0", "t1", "t2", "t3", "t4"]


async def test_concurrent_consumers_keep_order_and_exclusivity(queue: Queue) -> None:
    conversations = ["a", "b", "c"]
    expected: dict[str, list[str]] = defaultdict(list)
    for index in range(15):
        conversation_id = conversations[index % 3]
        await queue.enqueue(job(f"t{index:02d}", conversation_id))
        expected[conversation_id].append(f"t{index:02d}")

    held: set[str] = set()
    seen: dict[str, list[str]] = defaultdict(list)
    overlaps: list[str] = []
    finished = anyio.Event()

    async def consume(name: str) -> None:
        while True:
            claim = await queue.claim(name, lease_s=HOLD)
            conversation_id = claim.job.conversation_id
            if conversation_id in held:
                overlaps.append(claim.job.turn_id)
            held.add(conversation_id)
            seen[conversation_id].append(claim.job.turn_id)
            await anyio.lowlevel.checkpoint()
            held.discard(conversation_id)
            await queue.ack(claim)
            if sum(map(len, seen.values())) == 15:
                finished.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            for name in ("w1", "w2", "w3", "w4"):
                tasks.start_soon(consume, name)
            await finished.wait()
            tasks.cancel_scope.cancel()

    assert overlaps == []
    assert seen == expected


async def test_first_puts_a_turn_ahead_of_its_conversation(queue: Queue) -> None:
    await queue.enqueue(job("t1"))
    await queue.enqueue(job("t2"))
    await queue.enqueue(job("t0"), first=True)

    assert await drain(queue, 3) == ["t0", "t1", "t2"]


async def test_first_waits_for_the_claimed_turn_of_its_conversation(
    queue: Queue,
) -> None:
    await queue.enqueue(job("t1"))
    claim = await queue.claim("c", lease_s=HOLD)
    await queue.enqueue(job("t3"))
    await queue.enqueue(job("t2"), first=True)

    assert await probe(queue) is None
    await queue.ack(claim)
    assert await drain(queue, 2) == ["t2", "t3"]


async def test_a_waiting_claim_wakes_on_enqueue(queue: Queue) -> None:
    claims: list[Claim] = []

    async def claim_one(name: str) -> None:
        claims.append(await queue.claim(name, lease_s=HOLD))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(claim_one, "w1")
            tasks.start_soon(claim_one, "w2")
            await anyio.wait_all_tasks_blocked()
            assert claims == []

            await queue.enqueue(job("t1", "a"))
            await anyio.wait_all_tasks_blocked()
            assert [claim.job.turn_id for claim in claims] == ["t1"]

            await queue.enqueue(job("t2", "b"))

    assert sorted(claim.job.turn_id for claim in claims) == ["t1", "t2"]
    assert {claim.consumer for claim in claims} == {"w1", "w2"}


async def test_a_cancelled_wait_takes_nothing(queue: Queue) -> None:
    assert await probe(queue) is None
    await queue.enqueue(job("t1"))

    stats = await queue.stats()
    assert (stats.ready, stats.inflight) == (1, 0)
    claim = await queue.claim("c", lease_s=HOLD)
    assert (claim.job.turn_id, claim.deliveries) == ("t1", 1)


async def test_a_claim_cancelled_before_it_runs_takes_nothing(queue: Queue) -> None:
    await queue.enqueue(job("t1"))

    with anyio.CancelScope() as scope:
        scope.cancel()
        await queue.claim("c", lease_s=HOLD)

    assert scope.cancelled_caught
    stats = await queue.stats()
    assert (stats.ready, stats.inflight) == (1, 0)


async def test_an_expired_lease_redelivers_the_turn(queue: Queue) -> None:
    await queue.enqueue(job("t1"))
    await queue.enqueue(job("t2"))
    lapsed = await queue.claim("w1", lease_s=SHORT)

    with anyio.fail_after(10):
        again = await queue.claim("w2", lease_s=HOLD)

    assert again.job == lapsed.job
    assert (again.consumer, again.deliveries, again.started) == ("w2", 2, False)
    assert again.token > lapsed.token


async def test_redelivery_keeps_the_started_flag(queue: Queue) -> None:
    await queue.enqueue(job("t1"))
    first = await queue.claim("w1", lease_s=SHORT)
    await queue.mark_started(first)

    with anyio.fail_after(10):
        second = await queue.claim("w2", lease_s=SHORT)
        third = await queue.claim("w3", lease_s=HOLD)

    assert (second.deliveries, second.started) == (2, True)
    assert (third.deliveries, third.started) == (3, True)


async def test_renew_keeps_the_turn(queue: Queue) -> None:
    await queue.enqueue(job("t1"))
    # Wider margins than SHORT: on asyncio a late wake-up must not lose the lease.
    lease_s = SHORT * 3
    claim = await queue.claim("w1", lease_s=lease_s)

    for _ in range(3):
        await anyio.sleep(lease_s / 3)
        await queue.renew(claim, lease_s=lease_s)

    await queue.ack(claim)
    assert await probe(queue) is None


async def test_a_stale_claim_is_fenced_off(queue: Queue) -> None:
    await queue.enqueue(job("t1"))
    stale = await queue.claim("w1", lease_s=SHORT)
    with anyio.fail_after(10):
        fresh = await queue.claim("w2", lease_s=HOLD)

    with pytest.raises(LeaseLost):
        await queue.renew(stale, lease_s=HOLD)
    with pytest.raises(LeaseLost):
        await queue.mark_started(stale)
    with pytest.raises(LeaseLost):
        await queue.ack(stale)

    await queue.renew(fresh, lease_s=HOLD)
    await queue.mark_started(fresh)
    await queue.ack(fresh)
    stats = await queue.stats()
    assert (stats.ready, stats.inflight) == (0, 0)


async def test_an_acked_claim_cannot_be_used_again(queue: Queue) -> None:
    await queue.enqueue(job("t1"))
    claim = await queue.claim("w1", lease_s=HOLD)
    await queue.ack(claim)

    with pytest.raises(LeaseLost):
        await queue.ack(claim)
    with pytest.raises(LeaseLost):
        await queue.renew(claim, lease_s=HOLD)


async def test_tokens_grow_with_every_claim(queue: Queue) -> None:
    for index in range(3):
        await queue.enqueue(job(f"t{index}", f"c{index}"))

    tokens = [(await queue.claim("c", lease_s=HOLD)).token for _ in range(3)]

    assert tokens == sorted(set(tokens))


async def test_cancel_drops_a_waiting_turn(queue: Queue) -> None:
    await queue.enqueue(job("t1"))
    await queue.enqueue(job("t2"))

    result = await queue.cancel("t1")

    assert result.outcome is CancelOutcome.DROPPED
    assert result.job == job("t1")
    stats = await queue.stats()
    assert (stats.ready, stats.inflight) == (1, 0)
    assert await drain(queue, 1) == ["t2"]
    assert await probe(queue) is None


async def test_cancel_drops_a_turn_waiting_behind_a_claimed_one(queue: Queue) -> None:
    await queue.enqueue(job("t1"))
    await queue.enqueue(job("t2"))
    claim = await queue.claim("c", lease_s=HOLD)

    result = await queue.cancel("t2")

    assert (result.outcome, result.job) == (CancelOutcome.DROPPED, job("t2"))
    await queue.ack(claim)
    assert await probe(queue) is None


async def test_a_cancelled_turn_leaves_no_trace_in_the_order(queue: Queue) -> None:
    await queue.enqueue(job("a1", "a"))
    await queue.enqueue(job("b1", "b"))
    await queue.cancel("a1")
    await queue.enqueue(job("a2", "a"))

    assert await drain(queue, 2) == ["b1", "a2"]


async def test_cancel_signals_a_claimed_turn(queue: Queue) -> None:
    await queue.enqueue(job("t1"))
    claim = await queue.claim("c", lease_s=HOLD)
    assert await queue.cancel_requested(claim) is False

    with anyio.fail_after(10):
        async with queue.watch_cancels() as cancels:
            result = await queue.cancel("t1")
            assert await anext(cancels) == "t1"

    assert (result.outcome, result.job) == (CancelOutcome.SIGNALLED, None)
    assert await queue.cancel_requested(claim) is True
    stats = await queue.stats()
    assert (stats.ready, stats.inflight) == (0, 1)


async def test_watch_cancels_sees_only_cancels_after_it_opened(queue: Queue) -> None:
    await queue.enqueue(job("t1", "a"))
    await queue.enqueue(job("t2", "b"))
    await queue.claim("c", lease_s=HOLD)
    await queue.claim("c", lease_s=HOLD)
    await queue.cancel("t1")

    with anyio.fail_after(10):
        async with queue.watch_cancels() as cancels:
            await queue.cancel("t2")
            assert await anext(cancels) == "t2"


async def test_every_watcher_sees_a_cancel(queue: Queue) -> None:
    await queue.enqueue(job("t1"))
    await queue.claim("c", lease_s=HOLD)

    with anyio.fail_after(10):
        async with queue.watch_cancels() as one, queue.watch_cancels() as two:
            await queue.cancel("t1")
            assert (await anext(one), await anext(two)) == ("t1", "t1")


async def test_cancel_of_an_unknown_or_finished_turn(queue: Queue) -> None:
    await queue.enqueue(job("t1"))
    await queue.ack(await queue.claim("c", lease_s=HOLD))

    for turn_id in ("t1", "never-enqueued"):
        result = await queue.cancel(turn_id)
        assert (result.outcome, result.job) == (CancelOutcome.NOT_FOUND, None)


async def test_take_waiting_removes_every_unclaimed_turn(queue: Queue) -> None:
    await queue.enqueue(job("a1", "a"))
    await queue.enqueue(job("a2", "a"))
    await queue.enqueue(job("b1", "b"))
    claim = await queue.claim("c", lease_s=HOLD)

    taken = await queue.take_waiting()

    assert claim.job.turn_id == "a1"
    assert sorted(taken, key=lambda waiting: waiting.turn_id) == [
        job("a2", "a"),
        job("b1", "b"),
    ]
    stats = await queue.stats()
    assert (stats.ready, stats.inflight) == (0, 1)
    await queue.ack(claim)
    assert await probe(queue) is None
    assert await queue.take_waiting() == []


async def test_stats_count_waiting_and_claimed_turns(queue: Queue) -> None:
    stats = await queue.stats()
    assert (stats.ready, stats.inflight) == (0, 0)

    await queue.enqueue(job("a1", "a"))
    await queue.enqueue(job("a2", "a"))
    await queue.enqueue(job("b1", "b"))
    stats = await queue.stats()
    assert (stats.ready, stats.inflight) == (3, 0)

    claim = await queue.claim("c", lease_s=HOLD)
    stats = await queue.stats()
    assert (stats.ready, stats.inflight) == (2, 1)

    await queue.ack(claim)
    stats = await queue.stats()
    assert (stats.ready, stats.inflight) == (2, 0)


async def test_stats_age_the_longest_waiting_turn(queue: Queue) -> None:
    assert (await queue.stats()).oldest_wait_s == 0.0

    await queue.enqueue(job("a1", "a"))
    await anyio.sleep(SHORT * 3)
    await queue.enqueue(job("b1", "b"))
    first_age = (await queue.stats()).oldest_wait_s
    assert SHORT * 2 <= first_age < HOLD

    claim = await queue.claim("c", lease_s=HOLD)
    assert claim.job.turn_id == "a1"
    assert (await queue.stats()).oldest_wait_s < first_age - SHORT

    await queue.cancel("b1")
    assert (await queue.stats()).oldest_wait_s == 0.0
