"""Bad input gets PROTOCOL.md's status and JSON error; nothing half-written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kdcube.bus import BusUnavailable
from tests.helpers import auth, open_stream, prompt_body, serve, submit

pytestmark = pytest.mark.anyio

JSON = {"Content-Type": "application/json", **auth("alice")}

CASES: list[tuple[str, str, dict[str, Any], int, str]] = [
    (
        "malformed json",
        "/sse/chat",
        {"content": b"{not json", "headers": JSON},
        400,
        "bad_json",
    ),
    (
        "json array",
        "/sse/chat",
        {"json": [1], "headers": auth("alice")},
        400,
        "invalid_request",
    ),
    (
        "no events",
        "/sse/chat",
        {"json": {"external_events": []}, "headers": auth("alice")},
        400,
        "missing_external_events",
    ),
    (
        "event without text",
        "/sse/chat",
        {
            "json": {"external_events": [{"type": "event.user.prompt", "payload": {}}]},
            "headers": auth("alice"),
        },
        400,
        "invalid_request",
    ),
    (
        "unknown event type",
        "/sse/chat",
        {
            "json": {
                "external_events": [
                    {"type": "event.user.poke", "payload": {"event": {"text": "x"}}}
                ]
            },
            "headers": auth("alice"),
        },
        400,
        "unsupported_event",
    ),
    (
        "nul in prompt",
        "/sse/chat",
        {"json": prompt_body("a\x00b"), "headers": auth("alice")},
        400,
        "invalid_request",
    ),
    (
        "unknown bundle",
        "/sse/chat",
        {"json": prompt_body("hi", bundle_id="nope"), "headers": auth("alice")},
        400,
        "unknown_bundle",
    ),
    (
        "prompt too long",
        "/sse/chat",
        {"json": prompt_body("x" * 32_001), "headers": auth("alice")},
        400,
        "input_too_long",
    ),
    (
        "unknown conversation",
        "/sse/chat",
        {"json": prompt_body("hi", conversation_id="nope"), "headers": auth("alice")},
        404,
        "conversation_not_found",
    ),
    (
        "malformed conversation id",
        "/sse/chat",
        {"json": prompt_body("hi", conversation_id="../x"), "headers": auth("alice")},
        400,
        "invalid_conversation_id",
    ),
    (
        "wrong project",
        "/sse/chat",
        {"json": prompt_body("hi", project="other"), "headers": auth("alice")},
        400,
        "invalid_request",
    ),
    (
        "form body",
        "/sse/chat",
        {"content": b"a=b", "headers": {"Content-Type": "text/plain", **auth("alice")}},
        415,
        "unsupported_media_type",
    ),
    (
        "multipart without events",
        "/sse/chat",
        {
            "files": {"files": ("a.txt", b"hi")},
            "data": {"event_submission": '{"external_events": []}'},
            "headers": auth("alice"),
        },
        400,
        "missing_external_events",
    ),
    (
        "multipart with files first",
        "/sse/chat",
        {
            "content": (
                b"--b\r\nContent-Disposition: form-data; name=files;"
                b' filename="a.txt"\r\n\r\nhi\r\n--b--\r\n'
            ),
            "headers": {
                "Content-Type": "multipart/form-data; boundary=b",
                **auth("alice"),
            },
        },
        400,
        "missing_external_events",
    ),
    (
        "multipart cut short",
        "/sse/chat",
        {
            "content": b"--b\r\nContent-Disposition: form-data; name=event_sub",
            "headers": {
                "Content-Type": "multipart/form-data; boundary=b",
                **auth("alice"),
            },
        },
        400,
        "invalid_request",
    ),
    (
        "multipart without a boundary",
        "/sse/chat",
        {
            "content": b"whatever",
            "headers": {"Content-Type": "multipart/form-data", **auth("alice")},
        },
        400,
        "invalid_request",
    ),
    (
        "not a dev token",
        "/sse/chat",
        {"json": prompt_body("hi"), "headers": {"Authorization": "Bearer abc"}},
        401,
        "invalid_token",
    ),
    (
        "not a bearer header",
        "/sse/chat",
        {"json": prompt_body("hi"), "headers": {"Authorization": "Basic abc"}},
        401,
        "invalid_token",
    ),
    (
        "cancel without conversation",
        "/sse/cancel",
        {"json": {}, "headers": auth("alice")},
        400,
        "missing_conversation_id",
    ),
    (
        "cancel of unknown conversation",
        "/sse/cancel",
        {"json": {"conversation_id": "nope"}, "headers": auth("alice")},
        404,
        "conversation_not_found",
    ),
    (
        "status of unknown conversation",
        "/sse/conv_status.get",
        {"json": {"conversation_id": "nope"}, "headers": auth("alice")},
        404,
        "conversation_not_found",
    ),
]


@pytest.mark.parametrize(
    ("path", "request_args", "status", "code"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_bad_submissions_are_refused_and_the_server_keeps_serving(
    tmp_path: Path, path: str, request_args: dict[str, Any], status: int, code: str
) -> None:
    async with serve(tmp_path) as server:
        response = await server.client.post(path, **request_args)
        listing = await server.client.get("/api/conversations", headers=auth("alice"))
        async with open_stream(server.client, "alice") as stream:
            ack = await submit(server.client, "alice", "still here")
            events = await stream.turn(ack["turn_id"])

    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    assert listing.json() == {"conversations": []}, (
        "a refused submission writes nothing"
    )
    assert events[-2].route == "chat_complete"


async def test_oversized_body_is_413(tmp_path: Path) -> None:
    async with serve(tmp_path, max_body_bytes=4096) as server:
        response = await server.client.post(
            "/sse/chat", json=prompt_body("x" * 8000), headers=auth("alice")
        )

    assert response.status_code == 413
    assert response.json()["error"] == "request_entity_too_large"


@pytest.mark.parametrize(
    ("params", "headers", "status", "code"),
    [
        ({}, auth("alice"), 400, "missing_stream_id"),
        ({"stream_id": "a b"}, auth("alice"), 400, "invalid_stream_id"),
        (
            {"stream_id": "s"},
            {"Last-Event-ID": "yesterday", **auth("alice")},
            400,
            "bad_last_event_id",
        ),
        (
            {"stream_id": "s", "last_event_id": "12"},
            auth("alice"),
            400,
            "bad_last_event_id",
        ),
        ({"stream_id": "s", "bearer_token": "nope"}, {}, 401, "invalid_token"),
    ],
)
async def test_bad_stream_requests_are_refused(
    tmp_path: Path,
    params: dict[str, str],
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    async with serve(tmp_path) as server:
        response = await server.client.get(
            "/sse/stream", params=params, headers=headers
        )

    assert response.status_code == status
    assert response.json()["error"] == code


async def test_token_in_query_identifies_an_eventsource_client(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        async with server.client.stream(
            "GET", "/sse/stream", params={"stream_id": "s", "bearer_token": "dev-carol"}
        ) as response:
            lines = response.aiter_lines()
            ready = [await lines.__anext__() for _ in range(3)]

    assert '"user_type":"registered"' in ready[2]


async def test_a_turn_that_cannot_be_queued_is_ended_not_left_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def queue_down(*_args: Any, **_kwargs: Any) -> None:
        raise BusUnavailable("the queue is away")

    async with serve(tmp_path) as server:
        monkeypatch.setattr(server.running.platform.bus.queue, "enqueue", queue_down)
        refused = await server.client.post(
            "/sse/chat", json=prompt_body("hi"), headers=auth("alice")
        )
        listing = await server.client.get("/api/conversations", headers=auth("alice"))
        monkeypatch.undo()
        conversation = listing.json()["conversations"][0]
        detail = await server.client.get(
            f"/api/conversations/{conversation['conversation_id']}",
            headers=auth("alice"),
        )

    assert refused.status_code == 503
    assert refused.headers["Retry-After"].isdigit()
    assert detail.json()["state"] == "idle"
    assert [t["state"] for t in detail.json()["turns"]] == ["failed"]
