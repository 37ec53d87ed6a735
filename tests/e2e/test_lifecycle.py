"""Process lifecycle: no task outlives shutdown; the CLI starts and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
import trio
import trio.lowlevel

from tests.helpers import open_stream, serve, submit, write_bundles

pytestmark = pytest.mark.anyio


def _all_tasks() -> set[trio.lowlevel.Task]:
    found: set[trio.lowlevel.Task] = set()
    root = trio.lowlevel.current_root_task()
    assert root is not None
    pending = [root]
    while pending:
        task = pending.pop()
        found.add(task)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return found


async def test_no_task_outlives_shutdown(tmp_path: Path) -> None:
    before = _all_tasks()
    async with serve(tmp_path) as server:
        async with open_stream(server.client, "alice") as stream:
            ack = await submit(
                server.client, "alice", "count my tasks", bundle_id="slow"
            )
            await stream.until("chat_delta", ack["turn_id"])
        during = _all_tasks()

    after = _all_tasks()
    assert len(during) > len(before) + 5, "the server ran tasks of its own"
    assert after - before == set(), f"left behind: {[t.name for t in after - before]}"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kdcube", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


async def _started_url(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = await anyio.to_thread.run_sync(process.stdout.readline)
    assert "ready at" in line, line
    return line.rsplit(" ", 1)[-1].strip()


@asynccontextmanager
async def _kdcube_run(
    tmp_path: Path, **env: str
) -> AsyncIterator[tuple[subprocess.Popen[str], httpx.AsyncClient]]:
    """``kdcube run`` in a child process, and a client for it; killed at the end."""
    bundles = write_bundles(tmp_path)
    command = ["run", "--port", "0", "--bundles", str(bundles)]
    process = _cli(*command, env={"KDCUBE_HOME": str(tmp_path / "home"), **env})
    try:
        url = await _started_url(process)
        async with httpx.AsyncClient(base_url=url) as client:
            yield process, client
    finally:
        process.kill()


@pytest.mark.slow
async def test_kdcube_run_serves_then_drains_on_sigterm(tmp_path: Path) -> None:
    async with (
        _kdcube_run(tmp_path) as (process, client),
        open_stream(client, "alice") as stream,
    ):
        ack = await submit(client, "alice", "over the wire")
        events = await stream.turn(ack["turn_id"])
        process.send_signal(signal.SIGTERM)
        goodbye = await stream.next()
        code = await anyio.to_thread.run_sync(process.wait, 10)

    assert events[-2].data["data"]["final_answer"] == "over the wire"
    assert goodbye.route == "server_shutdown"
    assert code == 0


@pytest.mark.slow
async def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    async with (
        _kdcube_run(tmp_path, KDCUBE_DRAIN_TIMEOUT_S="60") as (process, client),
        open_stream(client, "alice") as stream,
    ):
        ack = await submit(client, "alice", "endless", bundle_id="sleeper")
        await stream.until("chat_delta", ack["turn_id"])
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(5):
            # Polls another process, which has no event to wait on.
            while (await client.get("/ready")).status_code != 503:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        process.send_signal(signal.SIGINT)
        code = await anyio.to_thread.run_sync(process.wait, 10)

    assert code == 0


@pytest.mark.parametrize(
    ("env", "args", "names"),
    [
        ({"KDCUBE_PROC_CONCURRENCY": "lots"}, ["run"], "KDCUBE_PROC_CONCURRENCY"),
        ({"KDCUBE_STORAGE_PATH": "ftp://x"}, ["run"], "KDCUBE_STORAGE_PATH"),
        ({"KDCUBE_ASYNC_BACKEND": "curio"}, ["run"], "KDCUBE_ASYNC_BACKEND"),
        ({}, ["serve", "ingress"], "KDCUBE_REDIS_URL"),
        ({}, ["serve", "edge"], "KDCUBE_INGRESS_URL"),
        ({"KDCUBE_TLS_CERT": "/nowhere.pem"}, ["run"], "KDCUBE_TLS_KEY"),
        (
            {"KDCUBE_INGRESS_URL": "http://127.0.0.1:1", "KDCUBE_HTTP3": "1"},
            ["serve", "edge"],
            "KDCUBE_HTTP3",
        ),
    ],
)
def test_bad_configuration_stops_with_one_line_naming_it(
    tmp_path: Path, env: dict[str, str], args: list[str], names: str
) -> None:
    process = _cli(*args, "--port", "0", env={"KDCUBE_HOME": str(tmp_path), **env})
    _, err = process.communicate(timeout=30)

    assert process.returncode == 2
    assert err.count("\n") == 1 and names in err, err


def test_bad_bundles_file_is_a_clear_error(tmp_path: Path) -> None:
    bundles = tmp_path / "bundles.yaml"
    bundles.write_text("bundles:\n  items:\n    - id: x\n      path: nowhere\n")
    process = _cli(
        "run",
        "--port",
        "0",
        "--bundles",
        str(bundles),
        env={"KDCUBE_HOME": str(tmp_path)},
    )
    _, err = process.communicate(timeout=30)

    assert process.returncode == 2
    assert "nowhere" in err and "is not a folder" in err


async def _cli_done(*args: str, url: str) -> tuple[int, str, str]:
    process = _cli(*args, "--url", url, "--token", "dev-admin-root")
    out, err = await anyio.to_thread.run_sync(process.communicate, None, 30)
    return process.returncode, out, err


@pytest.mark.slow
async def test_the_cli_applies_the_live_documents(tmp_path: Path) -> None:
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text("rate_limits: {registered: {burst: 7}}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("rate_limits: {registered: {burst: -1}}\n")
    async with _kdcube_run(tmp_path) as (_, client):
        url = str(client.base_url)
        applied = await _cli_done("gateway", "apply", str(gateway), url=url)
        refused = await _cli_done("gateway", "apply", str(broken), url=url)
        bundles = await _cli_done(
            "bundles", "apply", str(write_bundles(tmp_path)), url=url
        )
        shown = await _cli_done("gateway", "show", url=url)

    assert applied[0] == 0 and "version 1 applied" in applied[1]
    assert refused[0] == 2 and "rate_limits.registered.burst" in refused[2]
    assert bundles[0] == 0 and "bundle registry version 1 applied" in bundles[1]
    assert shown[0] == 0
    assert json.loads(shown[1])["config"]["rate_limits"]["registered"]["burst"] == 7


async def test_kdcube_serve_edge_passes_requests_on_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path, edge=False) as roles:
        process = _cli(
            "serve",
            "edge",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            env={
                "KDCUBE_HOME": str(tmp_path / "edge"),
                "KDCUBE_INGRESS_URL": roles.url,
            },
        )
        try:
            url = await _started_url(process)
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                listed = await client.get(
                    "/api/conversations", headers={"Authorization": "Bearer dev-alice"}
                )
                metrics = await client.get("/metrics")
            process.send_signal(signal.SIGTERM)
            _, err = await anyio.to_thread.run_sync(process.communicate, None, 30)
        finally:
            process.kill()

    assert listed.status_code == 200
    assert listed.json() == {"conversations": []}
    # No KDCUBE_METRICS_URL: the edge has nowhere to send /metrics.
    assert metrics.status_code == 404
    assert process.returncode == 0, err
