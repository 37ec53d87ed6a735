"""The State contract: sessions, windowed counters, heartbeats and locks."""

from __future__ import annotations

import anyio
import pytest

from kdcube.bus.ports import State

pytestmark = pytest.mark.anyio

TTL = 0.1
"""A time to live that tests outlive by waiting on the adapter's clock."""
LONG = 3600.0
"""A time to live or window no test outlives."""


async def test_a_session_is_stable_per_user(state: State) -> None:
    first = await state.session_for("alice", ttl_s=LONG)
    again = await state.session_for("alice", ttl_s=LONG)
    other = await state.session_for("bob", ttl_s=LONG)

    assert first == again
    assert other != first
    assert first and other


async def test_using_a_session_renews_it(state: State) -> None:
    # Wider margins than TTL: on asyncio a late wake-up must not end the session.
    ttl_s = TTL * 3
    first = await state.session_for("alice", ttl_s=ttl_s)
    for _ in range(3):
        await anyio.sleep(ttl_s / 3)
        assert await state.session_for("alice", ttl_s=ttl_s) == first


async def test_an_expired_session_is_replaced(state: State) -> None:
    first = await state.session_for("alice", ttl_s=TTL)
    kept = await state.session_for("bob", ttl_s=LONG)
    await anyio.sleep(TTL * 1.5)

    assert await state.session_for("alice", ttl_s=TTL) != first
    assert await state.session_for("bob", ttl_s=LONG) == kept


async def test_incr_counts_within_a_window(state: State) -> None:
    counts = [await state.incr("k", window_s=LONG) for _ in range(3)]
    other = await state.incr("other", window_s=LONG)

    assert counts == [1, 2, 3]
    assert other == 1


async def test_incr_starts_over_in_the_next_window(state: State) -> None:
    await state.incr("k", window_s=TTL)
    await state.incr("k", window_s=TTL)
    await anyio.sleep(TTL * 1.2)

    assert await state.incr("k", window_s=TTL) == 1


async def test_counters_of_different_windows_do_not_interfere(state: State) -> None:
    await anyio.sleep(TTL)
    assert await state.incr("per-hour", window_s=LONG) == 1
    assert await state.incr("per-tick", window_s=TTL / 10) == 1
    assert await state.incr("per-hour", window_s=LONG) == 2


async def test_alive_lists_instances_with_their_info(state: State) -> None:
    await state.beat("proc", "p1", {"turns": 1, "host": "a"}, ttl_s=LONG)
    await state.beat("proc", "p2", {"turns": 0}, ttl_s=LONG)
    await state.beat("ingress", "i1", {}, ttl_s=LONG)
    await state.beat("proc", "p1", {"turns": 2, "host": "a"}, ttl_s=LONG)

    assert await state.alive("proc") == {
        "p1": {"turns": 2, "host": "a"},
        "p2": {"turns": 0},
    }
    assert await state.alive("ingress") == {"i1": {}}
    assert await state.alive("nobody") == {}


async def test_a_beat_expires(state: State) -> None:
    await state.beat("proc", "quiet", {}, ttl_s=TTL)
    await state.beat("proc", "steady", {}, ttl_s=LONG)
    await anyio.sleep(TTL * 1.5)

    assert await state.alive("proc") == {"steady": {}}


async def test_a_lock_is_exclusive_until_unlocked(state: State) -> None:
    token = await state.lock("job", ttl_s=LONG)
    assert token is not None
    assert await state.lock("job", ttl_s=LONG) is None
    assert await state.lock("other", ttl_s=LONG) is not None

    assert await state.unlock("job", token) is True
    again = await state.lock("job", ttl_s=LONG)
    assert again is not None
    assert again > token


async def test_unlock_needs_the_holders_token(state: State) -> None:
    token = await state.lock("job", ttl_s=LONG)
    assert token is not None

    assert await state.unlock("job", token + 1000) is False
    assert await state.lock("job", ttl_s=LONG) is None
    assert await state.unlock("never-locked", token) is False
    assert await state.unlock("job", token) is True
    assert await state.unlock("job", token) is False


async def test_an_expired_lock_can_be_taken_and_fences_its_old_holder(
    state: State,
) -> None:
    stale = await state.lock("job", ttl_s=TTL)
    assert stale is not None
    await anyio.sleep(TTL * 1.5)

    assert await state.unlock("job", stale) is False
    fresh = await state.lock("job", ttl_s=LONG)
    assert fresh is not None
    assert fresh > stale
    assert await state.unlock("job", stale) is False
    assert await state.unlock("job", fresh) is True


async def test_a_tally_adds_up_per_field(state: State) -> None:
    assert await state.totals("turns") == {}

    await state.add("turns", {"completed": 1})
    await state.add("turns", {"completed": 1, "failed": 1})
    await state.add("turns", {"failed": 2.5, "completed": 0})
    await state.add("other", {"completed": 7})
    await state.add("turns", {})

    assert await state.totals("turns") == {"completed": 2.0, "failed": 3.5}
    assert await state.totals("other") == {"completed": 7.0}


async def test_a_tally_does_not_expire(state: State) -> None:
    await state.add("waits", {"sum": 0.25})
    await anyio.sleep(TTL * 1.5)

    assert await state.totals("waits") == {"sum": 0.25}


async def test_concurrent_additions_all_count(state: State) -> None:
    async with anyio.create_task_group() as tasks:
        for _ in range(20):
            tasks.start_soon(state.add, "turns", {"completed": 1, "sum": 0.5})

    assert await state.totals("turns") == {"completed": 20.0, "sum": 10.0}
