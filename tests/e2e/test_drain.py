"""Drain: in-flight turns finish, new work is refused, streams say goodbye."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest

from tests.helpers import (
    EventStream,
    Server,
    auth,
    backend,
    backend_settings,
    open_stream,
    prompt_body,
    serve,
    submit,
)

pytestmark = pytest.mark.anyio


async def _wait_draining(client: httpx.AsyncClient) -> httpx.Response:
    with anyio.fail_after(5):
        while True:
            response = await client.get("/ready")
            if response.status_code == 503:
                return response
            await anyio.sleep(0.01)


async def _rest(stream: EventStream) -> list[str]:
    routes = []
    try:
        while True:
            routes.append((await stream.next()).route)
    except (EOFError, httpx.RemoteProtocolError):
        return routes


async def _finish_user(
    server: Server, user: str, results: dict[str, list[str]]
) -> None:
    async with open_stream(server.client, user) as stream:
        ack = await submit(server.client, user, f"hello from {user}", bundle_id="slow")
        await stream.until("chat_delta", ack["turn_id"])
        results[f"{user}:started"] = []
        events = await stream.turn(ack["turn_id"])
        results[user] = [e.route for e in events] + await _rest(stream)


async def test_drain_finishes_in_flight_turns_and_refuses_new_ones(
    tmp_path: Path,
) -> None:
    users = ["ann", "ben", "cat"]
    results: dict[str, list[str]] = {}
    async with serve(tmp_path) as server, anyio.create_task_group() as users_tasks:
        for user in users:
            users_tasks.start_soon(_finish_user, server, user, results)
        with anyio.fail_after(5):
            while not all(f"{u}:started" in results for u in users):  # noqa: ASYNC110
                await anyio.sleep(0.01)

        server.supervisor.request_stop()
        ready = await _wait_draining(server.client)
        refused = await server.client.post(
            "/sse/chat", json=prompt_body("too late"), headers=auth("dan")
        )
        new_stream = await server.client.get(
            "/sse/stream", params={"stream_id": "s"}, headers=auth("dan")
        )

    assert ready.json() == {"status": "draining"}
    assert refused.status_code == 503
    assert refused.headers["Retry-After"].isdigit()
    assert refused.json()["error"] == "draining"
    assert new_stream.status_code == 503
    for user in users:
        assert results[user][-3:] == [
            "chat_complete",
            "conv_status",
            "server_shutdown",
        ], user


async def test_drain_deadline_interrupts_turns_with_terminal_events(
    tmp_path: Path,
) -> None:
    async with (
        serve(tmp_path, drain_timeout_s=0.2) as server,
        open_stream(server.client, "alice") as stream,
    ):
        running = await submit(server.client, "alice", "endless", bundle_id="sleeper")
        queued = await submit(
            server.client, "alice", "next", conversation_id=running["conversation_id"]
        )
        await stream.until("chat_delta", running["turn_id"])
        server.supervisor.request_stop()
        rest = [
            (e.route, e.turn_id, e.data) for e in await stream.until("server_shutdown")
        ]

    errors = {turn: data["data"] for route, turn, data in rest if route == "chat_error"}
    assert errors[running["turn_id"]]["error_type"] == "turn_interrupted"
    assert errors[running["turn_id"]]["reason"] == "server_shutdown"
    if backend() == "embedded":
        # The in-memory queue dies with the process, so its waiting turns end.
        assert errors[queued["turn_id"]]["error_type"] == "turn_interrupted"
    else:
        # A durable queue keeps them for the next processor.
        assert queued["turn_id"] not in errors
    assert rest[-1][0] == "server_shutdown"
    assert rest[-1][2]["reason"] == "draining"


async def test_stop_at_once_still_leaves_turns_interrupted(
    tmp_path: Path,
) -> None:
    same_data = backend_settings()
    async with (
        serve(tmp_path, keep_data=True, **same_data) as server,
        open_stream(server.client, "alice") as stream,
    ):
        ack = await submit(server.client, "alice", "endless", bundle_id="sleeper")
        await stream.until("chat_delta", ack["turn_id"])
        server.supervisor.request_stop()
        server.supervisor.request_stop()  # the second request stops at once

    async with serve(tmp_path, **same_data) as server:
        detail = await server.client.get(
            f"/api/conversations/{ack['conversation_id']}", headers=auth("alice")
        )

    turn = detail.json()["turns"][0]
    assert turn["state"] == "interrupted"
    assert turn["error_type"] == "turn_interrupted"
