"""Files a bundle produces, and the history it sees."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.helpers import Server, auth, open_stream, serve, storage, submit
from tests.s3_server import provide_s3_server

pytestmark = pytest.mark.anyio


async def fetch(server: Server, path: str, user: str) -> httpx.Response:
    response = await server.client.get(path, headers=auth(user))
    if response.status_code != 302:
        return response
    with provide_s3_server().anonymous_reads():
        async with httpx.AsyncClient() as plain:
            return await plain.get(response.headers["location"])


async def test_an_artifact_is_listed_announced_and_served_to_its_owner(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        first = await submit(server.client, "alice", "first", bundle_id="maker")
        first_events = await stream.turn(first["turn_id"])
        second = await submit(
            server.client,
            "alice",
            "second",
            bundle_id="maker",
            conversation_id=first["conversation_id"],
        )
        second_events = await stream.turn(second["turn_id"])
        detail = await server.client.get(
            f"/api/conversations/{first['conversation_id']}", headers=auth("alice")
        )
        base = f"/api/conversations/{first['conversation_id']}/turns/{first['turn_id']}"
        own = await fetch(server, f"{base}/artifacts/report.md", "alice")
        other = await server.client.get(
            f"{base}/artifacts/report.md", headers=auth("bob")
        )

    [step] = [e for e in first_events if e.data["event"].get("step") == "artifact"]
    assert step.data["data"] == {
        "name": "report.md",
        "mime": "text/markdown",
        "size": 8,
    }
    answers = [
        e.data["data"]["final_answer"] for e in (first_events[-2], second_events[-2])
    ]
    assert answers == [
        "report.md 8 after []",
        "report.md 9 after ['report.md 8 after []']",
    ]
    turns = detail.json()["turns"]
    assert turns[0]["artifacts"] == [
        {"name": "report.md", "mime": "text/markdown", "size": 8}
    ]
    assert own.status_code == 200 and own.content == b"# first\n"
    if storage() == "local":
        assert own.headers["content-type"].startswith("text/markdown")
    assert other.status_code == 404 and other.json()["error"] == "artifact_not_found"
