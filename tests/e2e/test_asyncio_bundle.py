"""A bundle written for asyncio runs under Trio, and cancel still reaches it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.helpers import auth, open_stream, prompt_body, serve, submit

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "anyio_backend",
    # Explicit loop: once trio-asyncio is imported, asyncio's default loop is its own.
    ["trio", ("asyncio", {"loop_factory": asyncio.SelectorEventLoop})],
)
async def test_an_asyncio_bundle_streams_its_answer(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack = await submit(server.client, "alice", "one two three", bundle_id="asyncio")
        events = await stream.turn(ack["turn_id"])

    deltas = [e.data["delta"]["text"] for e in events if e.route == "chat_delta"]
    assert deltas == ["one ", "two ", "three "]
    assert events[-2].route == "chat_complete"
    assert events[-2].data["data"]["final_answer"] == "one two three"


async def test_cancel_reaches_an_asyncio_bundle_as_cancelled_error(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack = await submit(server.client, "alice", "please wait", bundle_id="asyncio")
        await stream.until("chat_delta", ack["turn_id"])
        await stream.until("chat_delta", ack["turn_id"])
        await server.client.post(
            "/sse/cancel",
            json={"conversation_id": ack["conversation_id"]},
            headers=auth("alice"),
        )
        error = (await stream.until("chat_error", ack["turn_id"]))[-1]

    assert error.data["data"]["error_type"] == "cancelled"
    assert (tmp_path / "asyncio-cancelled").read_text() == "cancelled"


async def test_an_asyncio_bundle_reads_attachments(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        response = await server.client.post(
            "/sse/chat",
            params={"stream_id": "s1"},
            data={
                "event_submission": json.dumps(
                    prompt_body("count", bundle_id="asyncio")
                )
            },
            files=[("files", ("a.txt", b"x" * 70_000))],
            headers=auth("alice"),
        )
        assert response.status_code == 200, response.text
        events = await stream.turn(response.json()["turn_id"])

    assert events[-2].data["data"]["final_answer"] == "count [70000]"
