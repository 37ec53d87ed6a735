"""Files sent with a prompt: typed, capped, scanned by a real clamd, stored, served.

A message is accepted with all its files or not at all: whatever was stored
for a refused message is gone, and no turn or conversation is recorded.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from kdcube.storage import Storage
from tests.clamd_server import EICAR, ClamdUrls, PrivateClamd
from tests.helpers import Server, auth, open_stream, prompt_body, serve, storage
from tests.s3_server import provide_s3_server

pytestmark = pytest.mark.anyio

MB = 1024 * 1024


def png(payload_bytes: int = 0) -> bytes:
    """A real PNG of one pixel, padded with an ancillary chunk to any size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x00")
    padding = chunk(b"teXt", b"k\x00" + b"x" * payload_bytes) if payload_bytes else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + padding
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


async def send(
    server: Server,
    user: str,
    files: list[tuple[str, bytes]],
    text: str = "look at these",
    **fields: Any,
) -> httpx.Response:
    return await server.client.post(
        "/sse/chat",
        params={"stream_id": "s1"},
        data={"event_submission": json.dumps(prompt_body(text, **fields))},
        files=[("files", (name, content)) for name, content in files],
        headers=auth(user),
    )


async def stored_keys(server: Server) -> list[str]:
    storage: Storage = server.running.platform.storage
    return [info.key for info in await storage.list("cb/")]


async def conversations(server: Server, user: str) -> list[dict[str, Any]]:
    response = await server.client.get("/api/conversations", headers=auth(user))
    assert response.status_code == 200
    found: list[dict[str, Any]] = response.json()["conversations"]
    return found


async def download(server: Server, path: str, user: str) -> httpx.Response:
    """The attachment's bytes: served by the ingress, or on S3 through the
    short-lived presigned URL it redirects to."""
    response = await server.client.get(path, headers=auth(user))
    if response.status_code != 302:
        return response

    location = response.headers["location"]
    assert "X-Amz-Signature=" in location and "X-Amz-Expires=300" in location
    with provide_s3_server().anonymous_reads():
        async with httpx.AsyncClient() as plain:
            return await plain.get(location)


async def test_files_are_stored_listed_and_served_to_their_owner_only(
    tmp_path: Path, clamd: ClamdUrls
) -> None:
    notes = "Zürich notes\n".encode() * 100
    image = png()
    async with (
        serve(tmp_path, clamd=clamd.get("tcp")) as server,
        open_stream(server.client, "alice") as stream,
    ):
        response = await send(
            server, "alice", [("notes.md", notes), ("cat.png", image)]
        )
        assert response.status_code == 200, response.text
        ack = response.json()
        await stream.turn(ack["turn_id"])

        detail = await server.client.get(
            f"/api/conversations/{ack['conversation_id']}", headers=auth("alice")
        )
        [turn] = detail.json()["turns"]
        base = (
            f"/api/conversations/{ack['conversation_id']}/turns/{ack['turn_id']}"
            "/attachments"
        )
        own = await download(server, f"{base}/notes.md", "alice")
        other = await server.client.get(f"{base}/notes.md", headers=auth("bob"))
        anonymous = await server.client.get(f"{base}/notes.md")
        missing = await server.client.get(f"{base}/nope.md", headers=auth("alice"))

    assert turn["attachments"] == [
        {
            "name": "notes.md",
            "mime": "text/markdown",
            "size": len(notes),
            "scan": "clean",
        },
        {"name": "cat.png", "mime": "image/png", "size": len(image), "scan": "clean"},
    ]
    assert own.status_code == 200 and own.content == notes
    if storage() == "local":
        assert own.headers["content-disposition"].startswith("attachment;")
        assert own.headers["x-content-type-options"] == "nosniff"
    assert [r.status_code for r in (other, anonymous, missing)] == [404, 404, 404]
    assert other.json()["error"] == "attachment_not_found"


async def test_the_bundle_reads_exactly_the_bytes_sent(
    tmp_path: Path, clamd: ClamdUrls
) -> None:
    notes = "naïve café\n".encode() * 20_000
    image = png(300_000)
    async with (
        serve(tmp_path, clamd=clamd.get("tcp")) as server,
        open_stream(server.client, "alice") as stream,
    ):
        response = await send(
            server,
            "alice",
            [("notes.txt", notes), ("cat.png", image)],
            bundle_id="reader",
        )
        assert response.status_code == 200, response.text
        events = await stream.turn(response.json()["turn_id"])

    [complete] = [e for e in events if e.route == "chat_complete"]
    assert complete.data["data"]["final_answer"].splitlines() == [
        f"notes.txt text/plain {len(notes)} {hashlib.sha256(notes).hexdigest()}",
        f"cat.png image/png {len(image)} {hashlib.sha256(image).hexdigest()}",
    ]


async def test_an_infected_file_refuses_the_whole_message(
    tmp_path: Path, clamd: ClamdUrls
) -> None:
    async with serve(tmp_path, clamd=clamd.get("unix")) as server:
        response = await send(
            server, "alice", [("clean.txt", b"fine text\n"), ("eicar.txt", EICAR)]
        )
        keys = await stored_keys(server)
        listed = await conversations(server, "alice")

    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "attachment_rejected"
    assert "eicar.txt" in body["detail"] and "EICAR" in body["detail"]
    assert keys == [] and listed == []


async def test_a_file_over_its_type_cap_is_refused_with_413(
    tmp_path: Path, clamd: ClamdUrls
) -> None:
    async with serve(tmp_path, clamd=clamd.get("tcp")) as server:
        response = await send(server, "alice", [("big.png", png(5 * MB + 1))])
        keys = await stored_keys(server)

    assert response.status_code == 413, response.text
    assert response.json()["error"] == "request_entity_too_large"
    assert "big.png" in response.json()["detail"]
    assert keys == []


async def test_a_declared_oversize_body_is_refused_before_it_is_sent(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path) as server:
        host, port = server.url.removeprefix("http://").split(":")
        async with await anyio.connect_tcp(host, int(port)) as connection:
            await connection.send(
                b"POST /sse/chat HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer dev-alice\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 40000000\r\n\r\n"
            )
            with anyio.fail_after(5):
                answer = await connection.receive()
                while b"request_entity_too_large" not in answer:
                    answer += await connection.receive()

    assert answer.startswith(b"HTTP/1.1 413")
    assert b"\r\n\r\n{" in answer


async def test_a_spoofed_type_is_refused(tmp_path: Path) -> None:
    program = b"MZ\x90\x00" + b"\x00" * 200
    async with serve(tmp_path) as server:
        response = await send(server, "alice", [("report.pdf", program)])

    assert response.status_code == 400
    assert response.json()["error"] == "attachment_rejected"
    assert "report.pdf" in response.json()["detail"]


async def test_files_of_a_conversation_of_another_user_are_refused(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path) as server:
        first = await send(server, "alice", [("a.txt", b"alice's\n")])
        conversation_id = first.json()["conversation_id"]
        intruder = await send(
            server, "bob", [("b.txt", b"bob's\n")], conversation_id=conversation_id
        )
        keys = await stored_keys(server)

    assert first.status_code == 200
    assert intruder.status_code == 404, intruder.text
    assert intruder.json()["error"] == "conversation_not_found"
    assert [key.rsplit("/", 1)[-1] for key in keys] == ["a.txt"]


@pytest.mark.parametrize(
    ("policy", "status", "scan"),
    [("required", 400, None), ("best_effort", 200, "failed")],
)
async def test_a_stopped_clamd_rejects_or_passes_by_policy(
    tmp_path: Path,
    private_clamd: PrivateClamd,
    policy: str,
    status: int,
    scan: str | None,
) -> None:
    url = private_clamd.urls.get("tcp")
    private_clamd.stop()
    async with serve(tmp_path, clamd=url, clamd_policy=policy) as server:
        response = await send(server, "alice", [("a.txt", b"some text\n")])
        listed = await conversations(server, "alice")
        keys = await stored_keys(server)
        labels = [await scan_labels(server, c["conversation_id"]) for c in listed]

    assert response.status_code == status, response.text
    if scan is None:
        assert response.json()["error"] == "attachment_rejected"
        assert "a.txt" in response.json()["detail"]
        assert listed == [] and keys == []
    else:
        assert labels == [[scan]] and len(keys) == 1


async def scan_labels(server: Server, conversation_id: str) -> list[str]:
    detail = await server.client.get(
        f"/api/conversations/{conversation_id}", headers=auth("alice")
    )
    return [a["scan"] for t in detail.json()["turns"] for a in t["attachments"]]


@pytest.mark.parametrize(
    ("policy", "status"), [("required", 503), ("best_effort", 200)]
)
async def test_an_open_clamd_breaker_refuses_or_skips_scans_at_once(
    tmp_path: Path, private_clamd: PrivateClamd, policy: str, status: int
) -> None:
    url = private_clamd.urls.get("tcp")
    private_clamd.stop()
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text(
        yaml.safe_dump({"circuit_breakers": {"clamd": {"failure_threshold": 1}}})
    )
    async with serve(
        tmp_path, clamd=url, clamd_policy=policy, gateway_config=gateway
    ) as server:
        first = await send(server, "alice", [("a.txt", b"some text\n")])
        second = await send(server, "alice", [("b.txt", b"more text\n")])
        keys = await stored_keys(server)

    assert first.status_code == (400 if policy == "required" else 200)
    assert second.status_code == status, second.text
    if policy == "required":
        assert second.json()["error"] == "dependency_unavailable"
        assert "clamd" in second.json()["detail"]
        assert int(second.headers["retry-after"]) >= 1
        assert keys == []
    else:
        assert len(keys) == 2
