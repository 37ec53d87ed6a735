"""Streams: resume with Last-Event-ID, gaps, keepalive, dropped clients."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.helpers import auth, open_stream, serve, submit

pytestmark = pytest.mark.anyio


async def _wait_finished(
    server_client: object, user: str, conversation_id: str
) -> None:
    import httpx

    assert isinstance(server_client, httpx.AsyncClient)
    with anyio.fail_after(10):
        while True:
            detail = await server_client.get(
                f"/api/conversations/{conversation_id}", headers=auth(user)
            )
            if detail.json()["turns"][-1]["state"] != "running":
                return
            await anyio.sleep(0.05)


async def test_resume_after_a_drop_mid_turn_misses_and_repeats_nothing(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path) as server:
        async with open_stream(server.client, "alice") as first:
            ack = await submit(server.client, "alice", "abcdefghij", bundle_id="slow")
            before = await first.until("chat_delta", ack["turn_id"])
        last_id = before[-1].id
        await _wait_finished(server.client, "alice", ack["conversation_id"])

        async with open_stream(server.client, "alice", last_event_id=last_id) as second:
            after = await second.turn(ack["turn_id"])

    events = before + after
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), "no event may be delivered twice"
    assert [e.route for e in events] == ["conv_status", "chat_start"] + [
        "chat_delta"
    ] * 5 + [
        "chat_complete",
        "conv_status",
    ]
    texts = [e.data["delta"]["text"] for e in events if e.route == "chat_delta"]
    assert "".join(texts) == "abcdefghij"


async def test_resume_then_live(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        async with open_stream(server.client, "alice") as first:
            ack = await submit(server.client, "alice", "one")
            seen = await first.turn(ack["turn_id"])

        async with open_stream(
            server.client, "alice", last_event_id=seen[1].id
        ) as second:
            replayed = await second.turn(ack["turn_id"])
            live_ack = await submit(server.client, "alice", "two")
            live = await second.turn(live_ack["turn_id"])

    assert [e.id for e in replayed] == [e.id for e in seen[2:]]
    assert live[-2].data["data"]["final_answer"] == "two"


async def test_a_too_old_last_event_id_starts_with_a_gap_notice(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        async with open_stream(server.client, "alice", last_event_id="1-0") as stream:
            notice = await stream.next()
            ack = await submit(server.client, "alice", "after the gap")
            events = await stream.turn(ack["turn_id"])

    assert notice.route == "chat_service"
    assert notice.data["type"] == "stream.gap"
    assert events[-2].data["data"]["final_answer"] == "after the gap"
    assert not any(e.data.get("type") == "stream.gap" for e in events)


async def test_idle_streams_get_keepalives(tmp_path: Path) -> None:
    async with (
        serve(tmp_path, sse_keepalive_s=0.1) as server,
        open_stream(server.client, "alice") as stream,
    ):
        with anyio.move_on_after(0.5):
            await stream.next()

    assert stream.keepalives >= 2


async def test_a_dropped_client_releases_its_stream(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        hub = server.running.hub
        async with (
            open_stream(server.client, "alice"),
            open_stream(server.client, "bob"),
        ):
            assert hub.connections == 2

        with anyio.fail_after(2):
            # The hub counts streams; it has no event for "none left" to wait on.
            while hub.connections:  # noqa: ASYNC110
                await anyio.sleep(0.01)
