"""The Relay contract: ordered ids, replay after a cursor, targeting, gaps."""

from __future__ import annotations

import anyio
import pytest

from kdcube.bus.ports import Relay, RelayEvent, RelayRead, parse_event_id

from .conftest import RelayBackend

pytestmark = pytest.mark.anyio

WAIT = 0.05
"""A read timeout for reads that should come back empty."""
OLDEST_CURSOR = "0-0"


async def publish(
    relay: Relay, count: int, *, session: str = "s1", stream: str | None = None
) -> list[str]:
    ids = []
    for n in range(count):
        published = await relay.publish(
            session, "chat_delta", f'{{"n": {n}}}', stream_id=stream
        )
        assert published is not None
        ids.append(published)
    return ids


async def read(relay: Relay, after: str, *, stream: str = "st1") -> RelayRead:
    return await relay.read("s1", after, stream_id=stream, timeout_s=WAIT)


def ids(read: RelayRead) -> list[str]:
    return [event.id for event in read.events]


async def test_ids_grow_strictly_and_share_one_shape(relay: Relay) -> None:
    published = await publish(relay, 50)
    published += await publish(relay, 5, session="s2")

    keys = [parse_event_id(event_id) for event_id in published]
    assert keys == sorted(set(keys))
    assert published == sorted(published)
    assert len({len(event_id) for event_id in published}) == 1


async def test_position_sorts_before_every_future_event(relay: Relay) -> None:
    empty = await relay.position("s1")
    first = await publish(relay, 1)
    after_one = await relay.position("s1")
    second = await publish(relay, 1)

    assert parse_event_id(empty) < parse_event_id(first[0])
    assert parse_event_id(first[0]) <= parse_event_id(after_one)
    assert parse_event_id(after_one) < parse_event_id(second[0])
    assert ids(await read(relay, after_one)) == second


async def test_read_replays_events_after_the_cursor_in_order(relay: Relay) -> None:
    start = await relay.position("s1")
    published = await publish(relay, 5)

    everything = await read(relay, start)
    tail = await read(relay, published[1])

    assert everything.events == [
        RelayEvent(event_id, "chat_delta", f'{{"n": {n}}}', None)
        for n, event_id in enumerate(published)
    ]
    assert not everything.gap
    assert ids(tail) == published[2:]


async def test_reading_from_the_returned_cursor_yields_each_event_once(
    relay: Relay,
) -> None:
    cursor = await relay.position("s1")
    seen: list[str] = []
    published: list[str] = []
    for batch in (3, 1, 4):
        published += await publish(relay, batch)
        result = await read(relay, cursor)
        seen += ids(result)
        cursor = result.cursor

    final = await read(relay, cursor)

    assert seen == published
    assert final.events == []
    assert not final.gap


async def test_sessions_are_separate(relay: Relay) -> None:
    start = await relay.position("s1")
    await publish(relay, 3, session="s2")

    assert ids(await read(relay, start)) == []


async def test_targeted_events_reach_only_their_stream(relay: Relay) -> None:
    start = await relay.position("s1")
    mine = await publish(relay, 1, stream="st1")
    everyone = await publish(relay, 1)
    theirs = await publish(relay, 1, stream="st2")
    later = await publish(relay, 1)

    assert ids(await read(relay, start, stream="st1")) == mine + everyone + later
    assert ids(await read(relay, start, stream="st2")) == everyone + theirs + later
    assert ids(await read(relay, start, stream="st3")) == everyone + later


async def test_a_waiting_read_wakes_on_publish(relay: Relay) -> None:
    start = await relay.position("s1")
    results: list[RelayRead] = []

    async def tail() -> None:
        results.append(await relay.read("s1", start, stream_id="st1", timeout_s=60))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(tail)
            await anyio.wait_all_tasks_blocked()
            assert results == []
            published = await publish(relay, 1)

    assert ids(results[0]) == published
    assert not results[0].gap


async def test_a_waiting_read_ignores_events_for_other_streams(relay: Relay) -> None:
    start = await relay.position("s1")
    results: list[RelayRead] = []

    async def tail() -> None:
        results.append(await relay.read("s1", start, stream_id="st1", timeout_s=60))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(tail)
            await anyio.wait_all_tasks_blocked()
            await publish(relay, 2, stream="st2")
            await anyio.wait_all_tasks_blocked()
            assert results == []
            wanted = await publish(relay, 1, stream="st1")

    assert ids(results[0]) == wanted


async def test_a_read_times_out_empty(relay: Relay) -> None:
    await publish(relay, 2)
    cursor = await relay.position("s1")

    with anyio.fail_after(10):
        result = await read(relay, cursor)

    assert result.events == []
    assert not result.gap
    assert parse_event_id(result.cursor) >= parse_event_id(cursor)
    later = await publish(relay, 1)
    assert ids(await read(relay, result.cursor)) == later


async def test_a_cursor_from_before_the_relay_started_is_a_gap(relay: Relay) -> None:
    # The relay cannot tell what it never held, so it owns up to a gap.
    published = await publish(relay, 2)

    first = await read(relay, OLDEST_CURSOR)
    second = await read(relay, first.cursor)

    assert first.gap
    assert ids(first) == published
    assert not second.gap
    assert second.events == []


async def test_trimming_by_count_is_a_gap_once(relay_backend: RelayBackend) -> None:
    async with relay_backend.open(10) as relay:
        start = await relay.position("s1")
        published = await publish(relay, 30)

        first = await read(relay, start)
        second = await read(relay, first.cursor)

    assert first.gap
    kept = ids(first)
    assert 10 <= len(kept) < 30
    assert kept == published[-len(kept) :]
    assert not second.gap
    assert second.events == []


async def test_a_cursor_within_the_kept_events_is_no_gap(
    relay_backend: RelayBackend,
) -> None:
    async with relay_backend.open(10) as relay:
        published = await publish(relay, 30)

        result = await read(relay, published[-3])

    assert not result.gap
    assert ids(result) == published[-2:]


async def test_trimming_by_age_is_a_gap_once(relay_backend: RelayBackend) -> None:
    async with relay_backend.open(10_000) as relay:
        start = await relay.position("s1")
        await publish(relay, 3)
        await relay_backend.expire(relay)
        later = await publish(relay, 2)

        first = await read(relay, start)
        second = await read(relay, first.cursor)

    assert first.gap
    assert ids(first) == later
    assert not second.gap
    assert second.events == []


async def test_an_event_published_once_is_not_published_again(relay: Relay) -> None:
    first = await relay.publish(
        "s1", "chat_complete", "{}", stream_id=None, once="t1:end"
    )
    again = await relay.publish(
        "s1", "chat_complete", "{}", stream_id=None, once="t1:end"
    )
    other = await relay.publish(
        "s1", "chat_complete", "{}", stream_id=None, once="t2:end"
    )

    got = await read(relay, OLDEST_CURSOR)

    assert first is not None and other is not None
    assert again is None
    assert [event.id for event in got.events] == [first, other]
