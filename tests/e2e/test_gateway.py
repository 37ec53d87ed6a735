"""The gateway through the HTTP API: rate limits, backpressure, stream caps,
and the live config that every process follows (on Redis in that cell)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from tests.helpers import (
    Server,
    auth,
    backend,
    open_stream,
    prompt_body,
    serve,
    submit,
)

pytestmark = pytest.mark.anyio

ADMIN = {"Authorization": "Bearer dev-admin-root"}


def gateway_file(folder: Path, **sections: Any) -> Path:
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump({"gateway": sections}))
    return path


async def chat(server: Server, user: str, text: str = "hi") -> httpx.Response:
    return await server.client.post(
        "/sse/chat",
        params={"stream_id": "s1"},
        json=prompt_body(text),
        headers=auth(user),
    )


async def test_a_session_over_its_burst_gets_429_and_a_notice(tmp_path: Path) -> None:
    config = gateway_file(
        tmp_path, rate_limits={"registered": {"burst": 3, "burst_window": 60}}
    )
    async with (
        serve(tmp_path, gateway_config=config) as server,
        open_stream(server.client, "alice") as stream,
    ):
        answers = [await chat(server, "alice") for _ in range(4)]
        other_user = await chat(server, "bob")
        notice = await next_service_notice(stream)

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    refused = answers[-1]
    assert refused.json()["error"] == "rate_limited"
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 60 and refused.json()["retry_after"] == retry_after
    assert other_user.status_code == 200, "limits are per session"
    assert notice.data["type"] == "gateway.rate_limit"
    assert notice.data["data"]["reason"] == "burst_rate_limit"


async def next_service_notice(stream: Any) -> Any:
    with anyio.fail_after(5):
        while True:
            event = await stream.next()
            if event.route == "chat_service":
                return event


async def test_a_full_queue_gets_503_with_retry_after(tmp_path: Path) -> None:
    config = gateway_file(tmp_path, backpressure={"max_queue_size": 1})
    async with (
        serve(tmp_path, gateway_config=config) as server,
        open_stream(server.client, "alice") as stream,
    ):
        busy = await submit(server.client, "alice", "slow one", bundle_id="glacial")
        await stream.until("chat_start", busy["turn_id"])
        refused = await chat(server, "bob")
        await server.client.post(
            "/sse/cancel",
            json={"conversation_id": busy["conversation_id"]},
            headers=auth("alice"),
        )
        await stream.until("chat_error", busy["turn_id"])
        admitted_again = await chat(server, "bob")

    assert refused.status_code == 503
    assert refused.json()["error"] == "system_busy"
    assert "queue_size_exceeded" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) == refused.json()["retry_after"] > 0
    assert admitted_again.status_code == 200


async def test_streams_over_the_process_cap_get_429(tmp_path: Path) -> None:
    config = gateway_file(tmp_path, limits={"max_sse_connections_per_instance": 1})
    async with (
        serve(tmp_path, gateway_config=config) as server,
        open_stream(server.client, "alice"),
    ):
        second = await server.client.get(
            "/sse/stream", params={"stream_id": "s2"}, headers=auth("bob")
        )

    assert second.status_code == 429
    assert second.json()["error"] == "too_many_streams"
    assert "retry-after" in second.headers


async def test_admin_changes_apply_validate_and_reset(tmp_path: Path) -> None:
    strict = yaml.safe_dump({"rate_limits": {"registered": {"burst": 1}}})
    async with serve(tmp_path) as server:
        client = server.client
        anonymous = await client.get("/admin/gateway")
        registered = await client.get("/admin/gateway", headers=auth("alice"))
        invalid = await client.post(
            "/admin/gateway",
            content=b"rate_limits: {paid: {burst: 0}}",
            headers={**ADMIN, "Content-Type": "application/yaml"},
        )
        checked = await client.post(
            "/admin/gateway/validate",
            content=strict,
            headers={**ADMIN, "Content-Type": "application/yaml"},
        )
        before = (await client.get("/admin/gateway", headers=ADMIN)).json()
        applied = await client.post(
            "/admin/gateway",
            content=strict,
            headers={**ADMIN, "Content-Type": "application/yaml"},
        )
        limited = [await chat(server, "alice") for _ in range(2)]
        reset = await client.post("/admin/gateway/reset", headers=ADMIN)
        after_reset = await chat(server, "alice")

    assert (anonymous.status_code, registered.status_code) == (401, 403)
    assert invalid.status_code == 400
    assert invalid.json()["error"] == "invalid_gateway_config"
    assert "rate_limits.paid.burst" in invalid.json()["detail"]
    assert checked.status_code == 200 and checked.json()["status"] == "valid"
    assert before["version"] == 0
    assert before["config"]["rate_limits"]["registered"]["burst"] == 160
    assert set(before["breakers"]) >= {"redis", "postgres", "clamd"}
    assert applied.status_code == 200 and applied.json()["version"] > 0
    assert [r.status_code for r in limited] == [200, 429]
    assert reset.status_code == 200
    assert reset.json()["config"]["rate_limits"]["registered"]["burst"] == 160
    assert after_reset.status_code == 200


@pytest.mark.skipif(
    backend() != "redis-postgres",
    reason="processes share a live config through Redis (redis-postgres cell)",
)
async def test_a_config_applied_on_one_ingress_reaches_another(tmp_path: Path) -> None:
    strict = yaml.safe_dump({"rate_limits": {"registered": {"burst": 1}}})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with serve(tmp_path / "a", keep_data=True) as first:
        project = first.running.platform.settings.project
        async with serve(tmp_path / "b", project=project) as second:
            applied = await first.client.post(
                "/admin/gateway",
                content=strict,
                headers={**ADMIN, "Content-Type": "application/yaml"},
            )
            version = applied.json()["version"]
            with anyio.fail_after(5):
                while True:
                    if await gateway_version(second) >= version:
                        break
                    await anyio.sleep(0.1)
            answers = [await chat(second, "alice") for _ in range(2)]

    assert [a.status_code for a in answers] == [200, 429]


async def gateway_version(server: Server) -> int:
    shown = await server.client.get("/admin/gateway", headers=ADMIN)
    return int(shown.json()["version"])
