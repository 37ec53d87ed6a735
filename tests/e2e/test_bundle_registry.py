"""The live bundle registry: applied by an admin, taken by every processor,
with git bundles reloaded while turns run on the version they started with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import yaml

from tests.git_repos import Origin, new_origin
from tests.helpers import REPO, Server, auth, open_stream, serve, submit

pytestmark = pytest.mark.anyio

ADMIN = {"Authorization": "Bearer dev-admin-root", "Content-Type": "application/yaml"}


def registry(origin: Origin, **demo: Any) -> str:
    items = [
        {"id": "echo", "path": str(REPO / "bundles" / "echo")},
        {"id": "demo", "repo": origin.url, "ref": "main", "subdir": "bundle", **demo},
    ]
    return yaml.safe_dump({"bundles": {"default_bundle_id": "echo", "items": items}})


async def apply(server: Server, document: str) -> int:
    response = await server.client.post(
        "/admin/bundles", content=document, headers=ADMIN
    )
    assert response.status_code == 200, response.text
    return int(response.json()["version"])


async def answer_of(server: Server, stream: Any, bundle_id: str) -> str:
    ack = await submit(server.client, "alice", "hi", bundle_id=bundle_id)
    events = await stream.turn(ack["turn_id"])
    [complete] = [e for e in events if e.route == "chat_complete"]
    return str(complete.data["data"]["final_answer"])


async def test_a_git_bundle_is_applied_then_hot_reloaded(tmp_path: Path) -> None:
    origin = await anyio.to_thread.run_sync(new_origin, tmp_path / "git")
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        unknown = await server.client.post(
            "/sse/chat",
            json={"bundle_id": "demo", "external_events": []},
            headers=auth("alice"),
        )
        await apply(server, registry(origin))
        first = await answer_of(server, stream, "demo")

        await anyio.to_thread.run_sync(origin.commit, "v2")
        await apply(server, registry(origin))
        with anyio.fail_after(10):
            while True:
                second = await answer_of(server, stream, "demo")
                if second == "v2":
                    break
                await anyio.sleep(0.05)
        shown = await server.client.get("/admin/bundles", headers=ADMIN)

    assert unknown.status_code == 400
    assert first == "v1" and second == "v2"
    assert [item["id"] for item in shown.json()["items"]] == ["echo", "demo"]


async def test_a_running_turn_finishes_on_the_version_it_started_with(
    tmp_path: Path,
) -> None:
    origin = await anyio.to_thread.run_sync(new_origin, tmp_path / "git")
    await anyio.to_thread.run_sync(
        lambda: origin.commit("slow-v1", code="await anyio.sleep(1.5)")
    )
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        await apply(server, registry(origin))
        slow = await submit(server.client, "alice", "hi", bundle_id="demo")
        await stream.until("chat_start", slow["turn_id"])

        await anyio.to_thread.run_sync(origin.commit, "v2")
        await apply(server, registry(origin))
        with anyio.fail_after(10):
            while True:
                quick = await submit(
                    server.client, "bob", "hi", bundle_id="demo", stream_id=None
                )
                if await _answer(server, quick) == "v2":
                    break
                await anyio.sleep(0.05)
        events = await stream.turn(slow["turn_id"])

    [complete] = [e for e in events if e.route == "chat_complete"]
    assert complete.data["data"]["final_answer"] == "slow-v1"


async def _answer(server: Server, ack: dict[str, Any]) -> str | None:
    """The final answer of bob's turn, once it has ended."""
    with anyio.fail_after(5):
        while True:
            detail = await server.client.get(
                f"/api/conversations/{ack['conversation_id']}", headers=auth("bob")
            )
            [turn] = detail.json()["turns"]
            if turn["state"] not in ("queued", "running"):
                answer: str | None = turn["final_answer"]
                return answer
            await anyio.sleep(0.02)


async def test_an_invalid_registry_is_refused_and_the_old_one_stays(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path) as server:
        bad = await server.client.post(
            "/admin/bundles",
            content=b"bundles: {items: [{id: x, path: /no/such/folder}]}",
            headers=ADMIN,
        )
        both = await server.client.post(
            "/admin/bundles",
            content=b"bundles: {items: [{id: x, path: /tmp, repo: file:///x}]}",
            headers=ADMIN,
        )
        unknown_exec = await server.client.post(
            "/admin/bundles",
            content=yaml.safe_dump(
                {
                    "bundles": {
                        "items": [
                            {
                                "id": "x",
                                "path": str(REPO / "bundles" / "echo"),
                                "config": {"execution": {"runtime": {"mode": "vm"}}},
                            }
                        ]
                    }
                }
            ).encode(),
            headers=ADMIN,
        )
        not_admin = await server.client.post(
            "/admin/bundles",
            content=b"bundles: {items: []}",
            headers={**auth("alice"), "Content-Type": "application/yaml"},
        )
        still = await submit(server.client, "alice", "hello")

    assert bad.status_code == 400 and bad.json()["error"] == "invalid_bundle_registry"
    assert "/no/such/folder" in bad.json()["detail"]
    assert both.status_code == 400 and "either path" in both.json()["detail"]
    assert unknown_exec.status_code == 400
    assert "config.execution.runtime.mode 'vm'" in unknown_exec.json()["detail"]
    assert not_admin.status_code == 403
    assert still["status"] == "processing_started"
