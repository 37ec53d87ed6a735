"""A chat turn end to end through a real Hypercorn server and a real HTTP client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kdcube.bus import parse_event_id
from tests.helpers import auth, open_stream, serve, submit

pytestmark = pytest.mark.anyio


async def test_turn_events_arrive_in_order_with_the_envelope(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack = await submit(server.client, "alice", "hello brave new world")
        events = await stream.turn(ack["turn_id"])

    routes = [e.route for e in events]
    assert routes == ["conv_status", "chat_start"] + ["chat_delta"] * 4 + [
        "chat_complete",
        "conv_status",
    ]
    assert ack["status"] == "processing_started" and ack["conversation_created"] is True
    assert [e.data["data"]["state"] for e in (events[0], events[-1])] == [
        "in_progress",
        "idle",
    ]

    ids = [parse_event_id(e.id or "") for e in events]
    assert ids == sorted(set(ids)), "event ids must be strictly increasing"
    deltas = [e.data["delta"] for e in events if e.route == "chat_delta"]
    assert [d["index"] for d in deltas] == [0, 1, 2, 3]
    assert "".join(d["text"] for d in deltas) == "hello brave new world"
    assert events[-2].data["data"]["final_answer"] == "hello brave new world"

    assert len({e.data["service"]["request_id"] for e in events}) == 1
    envelope = events[2].data
    assert envelope["type"] == "chat.delta"
    assert envelope["service"]["user"] == "alice"
    assert envelope["service"]["user_type"] == "registered"
    assert envelope["conversation"] == {
        "session_id": ack["session_id"],
        "conversation_id": ack["conversation_id"],
        "turn_id": ack["turn_id"],
    }
    assert isinstance(envelope["ts"], int) and envelope["timestamp"].endswith("+00:00")


async def test_ready_frame_names_the_session_and_stream(tmp_path: Path) -> None:
    async with (
        serve(tmp_path) as server,
        open_stream(server.client, "alice", "tab-7") as stream,
    ):
        ready = stream.seen[0]

    assert ready.data["stream_id"] == "tab-7"
    assert ready.data["user_type"] == "registered"
    assert {"session_id", "tenant", "project"} <= ready.data.keys()


async def test_outcome_is_persisted_in_the_conversation(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        first = await submit(server.client, "alice", "one")
        await stream.turn(first["turn_id"])
        second = await submit(
            server.client, "alice", "two", conversation_id=first["conversation_id"]
        )
        await stream.turn(second["turn_id"])
        listing = await server.client.get("/api/conversations", headers=auth("alice"))
        detail = await server.client.get(
            f"/api/conversations/{first['conversation_id']}", headers=auth("alice")
        )

    assert second["conversation_created"] is False
    assert [c["conversation_id"] for c in listing.json()["conversations"]] == [
        first["conversation_id"]
    ]
    turns = detail.json()["turns"]
    assert [(t["prompt"], t["final_answer"], t["state"]) for t in turns] == [
        ("one", "one", "completed"),
        ("two", "two", "completed"),
    ]


async def test_followup_while_busy_waits_for_the_running_turn(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        first = await submit(server.client, "alice", "first turn", bundle_id="slow")
        second = await submit(
            server.client,
            "alice",
            "second turn",
            bundle_id="slow",
            conversation_id=first["conversation_id"],
        )
        await stream.turn(second["turn_id"])

    assert second["status"] == "followup_accepted"
    order = [(e.turn_id, e.route) for e in stream.seen if e.route != "ready"]
    first_end = order.index((first["turn_id"], "conv_status"), 2)
    second_start = order.index((second["turn_id"], "conv_status"))
    assert first_end < second_start, "turns of one conversation must not overlap"


async def test_conversations_of_different_users_run_side_by_side(
    tmp_path: Path,
) -> None:
    async with (
        serve(tmp_path) as server,
        open_stream(server.client, "alice") as alice,
        open_stream(server.client, "bob") as bob,
    ):
        a = await submit(server.client, "alice", "alice's prompt", bundle_id="sleeper")
        b = await submit(server.client, "bob", "bob's prompt", bundle_id="sleeper")
        await alice.until("chat_delta", a["turn_id"])
        await bob.until("chat_delta", b["turn_id"])
        for user, ack in (("alice", a), ("bob", b)):
            await server.client.post(
                "/sse/cancel",
                json={"conversation_id": ack["conversation_id"]},
                headers=auth(user),
            )
        await alice.until("chat_error", a["turn_id"])
        await bob.until("chat_error", b["turn_id"])


async def test_conv_status_get_answers_and_emits(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack = await submit(server.client, "alice", "hi")
        await stream.turn(ack["turn_id"])
        response = await server.client.post(
            "/sse/conv_status.get",
            params={"stream_id": "s1"},
            json={"conversation_id": ack["conversation_id"]},
            headers=auth("alice"),
        )
        event = await stream.next()

    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "idle" and body["current_turn_id"] == ack["turn_id"]
    assert event.route == "conv_status" and event.data["data"]["state"] == "idle"


async def test_deleted_conversation_is_gone(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack = await submit(server.client, "alice", "hi")
        await stream.turn(ack["turn_id"])
        path = f"/api/conversations/{ack['conversation_id']}"
        deleted = await server.client.delete(path, headers=auth("alice"))
        again = await server.client.get(path, headers=auth("alice"))

    assert deleted.status_code == 200
    assert again.status_code == 404


async def test_a_failing_bundle_ends_with_a_safe_bundle_error(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack = await submit(server.client, "alice", "boom", bundle_id="failing")
        events = await stream.turn(ack["turn_id"])

    error = events[-2]
    assert error.route == "chat_error"
    assert error.data["data"]["error_type"] == "bundle_error"
    assert "secret" not in error.data["data"]["error"]
    assert events[-1].data["data"]["state"] == "error"


async def test_a_quiet_bundle_is_stopped_by_the_idle_watchdog(tmp_path: Path) -> None:
    async with (
        serve(tmp_path, turn_idle_timeout_s=0.3) as server,
        open_stream(server.client, "alice") as stream,
    ):
        ack = await submit(server.client, "alice", "anyone?", bundle_id="quiet")
        events = await stream.turn(ack["turn_id"])

    error = events[-2].data["data"]
    assert (error["error_type"], error["reason"]) == ("timeout", "idle")


async def test_wall_time_limit_stops_a_busy_bundle(tmp_path: Path) -> None:
    async with (
        serve(tmp_path, turn_wall_timeout_s=0.3) as server,
        open_stream(server.client, "alice") as stream,
    ):
        ack = await submit(
            server.client, "alice", "take your time", bundle_id="sleeper"
        )
        events = await stream.turn(ack["turn_id"])

    error = events[-2].data["data"]
    assert (error["error_type"], error["reason"]) == ("timeout", "wall")


async def test_anonymous_callers_are_told_apart_by_fingerprint(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        async with server.client.stream(
            "GET", "/sse/stream", params={"stream_id": "s"}, headers={"User-Agent": "a"}
        ) as first:
            first_ready = await first.aiter_lines().__anext__()
        response = await server.client.post(
            "/sse/chat",
            json={
                "external_events": [
                    {"type": "event.user.prompt", "payload": {"event": {"text": "hi"}}}
                ]
            },
            headers={"User-Agent": "b"},
        )

    assert first_ready.startswith("id: ")
    assert response.status_code == 200


# Explicit loop: once trio-asyncio is imported, asyncio's default loop is its own.
@pytest.mark.parametrize(
    "anyio_backend", [("asyncio", {"loop_factory": asyncio.SelectorEventLoop})]
)
async def test_a_turn_also_runs_on_asyncio(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack = await submit(server.client, "alice", "on asyncio")
        events = await stream.turn(ack["turn_id"])

    assert events[-2].data["data"]["final_answer"] == "on asyncio"
