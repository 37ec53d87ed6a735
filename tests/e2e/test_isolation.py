"""No one sees another user's events or conversations."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.helpers import auth, open_stream, prompt_body, serve, submit

pytestmark = pytest.mark.anyio


async def test_two_users_are_isolated(tmp_path: Path) -> None:
    async with (
        serve(tmp_path, sse_keepalive_s=0.1) as server,
        open_stream(server.client, "alice", "same-id") as alice,
        open_stream(server.client, "bob", "same-id") as bob,
    ):
        ack = await submit(server.client, "alice", "private", stream_id="same-id")
        await alice.turn(ack["turn_id"])
        with anyio.move_on_after(0.3):
            await bob.next()

        path = f"/api/conversations/{ack['conversation_id']}"
        peek = await server.client.get(path, headers=auth("bob"))
        delete = await server.client.delete(path, headers=auth("bob"))
        cancel = await server.client.post(
            "/sse/cancel",
            json={"conversation_id": ack["conversation_id"]},
            headers=auth("bob"),
        )
        status = await server.client.post(
            "/sse/conv_status.get",
            json={"conversation_id": ack["conversation_id"]},
            headers=auth("bob"),
        )
        hijack = await server.client.post(
            "/sse/chat",
            json=prompt_body("mine now", conversation_id=ack["conversation_id"]),
            headers=auth("bob"),
        )
        listing = await server.client.get("/api/conversations", headers=auth("bob"))
        still_there = await server.client.get(path, headers=auth("alice"))

    assert len(bob.seen) == 1 and bob.keepalives >= 1, "bob only sees his ready frame"
    assert [r.status_code for r in (peek, delete, cancel, status, hijack)] == [404] * 5
    assert listing.json() == {"conversations": []}
    assert len(still_there.json()["turns"]) == 1


async def test_streams_of_one_session_see_only_their_targeted_events(
    tmp_path: Path,
) -> None:
    async with (
        serve(tmp_path, sse_keepalive_s=0.1) as server,
        open_stream(server.client, "alice", "tab-1") as tab1,
        open_stream(server.client, "alice", "tab-2") as tab2,
    ):
        ack = await submit(server.client, "alice", "for tab 1", stream_id="tab-1")
        await tab1.turn(ack["turn_id"])
        with anyio.move_on_after(0.3):
            await tab2.next()

    assert tab1.seen[0].data["session_id"] == tab2.seen[0].data["session_id"]
    assert len(tab2.seen) == 1
