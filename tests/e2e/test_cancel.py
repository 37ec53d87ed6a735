"""Cancel: a running turn is stopped, a queued one is dropped."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.helpers import auth, open_stream, serve, submit

pytestmark = pytest.mark.anyio


async def test_cancel_stops_a_running_bundle(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack = await submit(server.client, "alice", "wait for me", bundle_id="sleeper")
        await stream.until("chat_delta", ack["turn_id"])
        response = await server.client.post(
            "/sse/cancel",
            json={"conversation_id": ack["conversation_id"], "turn_id": ack["turn_id"]},
            headers=auth("alice"),
        )
        with anyio.fail_after(2):
            events = await stream.turn(ack["turn_id"])
        detail = await server.client.get(
            f"/api/conversations/{ack['conversation_id']}", headers=auth("alice")
        )

    assert response.status_code == 202
    assert response.json() == {"status": "cancel_requested"}
    assert [e.route for e in events] == ["chat_error", "conv_status"]
    assert events[0].data["data"]["error_type"] == "cancelled"
    assert events[1].data["data"]["state"] == "idle"
    assert detail.json()["turns"][0]["state"] == "cancelled"


async def test_cancel_drops_a_queued_turn_before_it_starts(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        running = await submit(server.client, "alice", "first", bundle_id="sleeper")
        conversation_id = running["conversation_id"]
        queued = await submit(
            server.client,
            "alice",
            "second",
            bundle_id="echo",
            conversation_id=conversation_id,
        )
        await stream.until("chat_delta", running["turn_id"])
        await server.client.post(
            "/sse/cancel",
            json={"conversation_id": conversation_id, "turn_id": queued["turn_id"]},
            headers=auth("alice"),
        )
        dropped = await stream.turn(queued["turn_id"], started=False)
        await server.client.post(
            "/sse/cancel",
            json={"conversation_id": conversation_id},
            headers=auth("alice"),
        )
        await stream.turn(running["turn_id"])
        detail = await server.client.get(
            f"/api/conversations/{conversation_id}", headers=auth("alice")
        )

    assert [e.route for e in dropped] == ["chat_error"]
    assert dropped[0].data["data"]["error_type"] == "cancelled"
    assert [t["state"] for t in detail.json()["turns"]] == ["cancelled", "cancelled"]
    routes_of_queued = [e.route for e in stream.seen if e.turn_id == queued["turn_id"]]
    assert "chat_start" not in routes_of_queued


async def test_cancel_of_a_finished_turn_is_a_conflict(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack = await submit(server.client, "alice", "quick")
        await stream.turn(ack["turn_id"])
        response = await server.client.post(
            "/sse/cancel",
            json={"conversation_id": ack["conversation_id"], "turn_id": ack["turn_id"]},
            headers=auth("alice"),
        )

    assert response.status_code == 409
    assert response.json()["error"] == "turn_not_active"


async def test_steer_replaces_the_running_turn(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        running = await submit(
            server.client, "alice", "long answer", bundle_id="sleeper"
        )
        await stream.until("chat_delta", running["turn_id"])
        steer = await submit(
            server.client,
            "alice",
            "answer this instead",
            conversation_id=running["conversation_id"],
            message_kind="steer",
        )
        stopped = await stream.turn(running["turn_id"])
        answered = await stream.turn(steer["turn_id"])

    assert steer["status"] == "steer_accepted"
    assert stopped[-2].data["data"]["error_type"] == "cancelled"
    assert answered[-2].data["data"]["final_answer"] == "answer this instead"


async def test_a_turn_waiting_for_a_processor_is_announced_and_can_be_dropped(
    tmp_path: Path,
) -> None:
    async with (
        serve(tmp_path, proc_concurrency=1) as server,
        open_stream(server.client, "alice") as alice,
        open_stream(server.client, "bob") as bob,
    ):
        busy = await submit(
            server.client, "alice", "hold the only slot", bundle_id="sleeper"
        )
        await alice.until("chat_delta", busy["turn_id"])
        waiting = await submit(server.client, "bob", "my turn?")
        announced = await bob.next()
        await server.client.post(
            "/sse/cancel",
            json={"conversation_id": waiting["conversation_id"]},
            headers=auth("bob"),
        )
        rest = await bob.turn(waiting["turn_id"])
        await server.client.post(
            "/sse/cancel",
            json={"conversation_id": busy["conversation_id"]},
            headers=auth("alice"),
        )

    assert waiting["status"] == "processing_started"
    assert announced.route == "conv_status" and announced.turn_id == waiting["turn_id"]
    assert announced.data["data"]["state"] == "in_progress"
    assert [e.route for e in rest] == ["chat_error", "conv_status"]
    assert rest[1].data["data"]["state"] == "idle"
