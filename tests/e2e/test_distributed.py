"""Roles in separate OS processes on Redis and Postgres, and what survives a crash.

These tests start real ``kdcube serve`` processes, so they run in the
``redis-postgres`` cell of the test matrix only (``KDCUBE_TEST_BACKEND``).
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from kdcube.config import Settings
from tests.helpers import (
    EventStream,
    auth,
    backend,
    backend_settings,
    clean_backend,
    open_stream,
    storage_environment,
    submit,
    write_bundles,
)
from tests.servers import can_run_postgres, throwaway_postgres, throwaway_redis

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        backend() != "redis-postgres",
        reason="needs the redis-postgres cell of the matrix (KDCUBE_TEST_BACKEND)",
    ),
]


@dataclass
class Role:
    process: anyio.abc.Process
    url: str

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


@dataclass
class Cluster:
    tmp_path: Path
    env: dict[str, str]
    roles: list[Role]

    async def start(self, role: str) -> Role:
        command = [sys.executable, "-m", "kdcube", "serve", role]
        log = self.tmp_path / f"{role}-{len(self.roles)}.log"
        with log.open("wb") as log_file:  # the child keeps its own descriptor
            process = await anyio.open_process(
                [*command, "--host", "127.0.0.1", "--port", "0"],
                stderr=log_file,
                env=self.env,
            )
        line = await _first_line(process)
        assert "ready at" in line, f"{role} did not start: {line!r}"
        started = Role(process, line.rsplit(" ", 1)[-1].strip())
        self.roles.append(started)
        return started


async def _first_line(process: anyio.abc.Process) -> str:
    assert process.stdout is not None
    received = b""
    with anyio.fail_after(30):
        while b"\n" not in received:
            received += await process.stdout.receive()
    return received.decode().split("\n", 1)[0]


@asynccontextmanager
async def cluster(tmp_path: Path, **env: str) -> AsyncIterator[Cluster]:
    settings = Settings(**backend_settings())
    assert settings.redis_url is not None and settings.postgres_dsn is not None
    environment = {
        **os.environ,
        "KDCUBE_REDIS_URL": settings.redis_url,
        "KDCUBE_POSTGRES_DSN": settings.postgres_dsn,
        "KDCUBE_PROJECT": settings.project,
        "KDCUBE_AUTH": "dev",
        "KDCUBE_BUNDLES": str(write_bundles(tmp_path)),
        "KDCUBE_HOME": str(tmp_path / "home"),
        # Well inside the clients' 10 s read timeout.
        "KDCUBE_SSE_KEEPALIVE_S": "2",
        **storage_environment(settings),
        **env,
    }
    running = Cluster(tmp_path, environment, [])
    try:
        yield running
    finally:
        with anyio.CancelScope(shield=True):
            for role in running.roles:
                if role.process.returncode is None:
                    await role.kill()
            await clean_backend(settings)


async def test_a_turn_crosses_processes_and_a_stream_resumes_on_another_ingress(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path) as roles:
        ingress_a = await roles.start("ingress")
        ingress_b = await roles.start("ingress")
        await roles.start("proc")
        async with (
            httpx.AsyncClient(base_url=ingress_a.url, timeout=10) as client_a,
            httpx.AsyncClient(base_url=ingress_b.url, timeout=10) as client_b,
        ):
            async with open_stream(client_a, "alice") as stream:
                ack = await submit(client_a, "alice", "abcdefghij", bundle_id="slow")
                before = await stream.until("chat_delta", ack["turn_id"])
                await ingress_a.kill()
                with pytest.raises((EOFError, httpx.HTTPError)):
                    while True:
                        before.append(await stream.next())

            resume_from = before[-1].id
            async with open_stream(
                client_b, "alice", last_event_id=resume_from
            ) as again:
                after = await again.turn(ack["turn_id"])

    events = [e for e in before + after if e.turn_id == ack["turn_id"]]
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), "no event twice"
    routes = [e.route for e in events]
    assert routes == ["conv_status", "chat_start"] + ["chat_delta"] * 5 + [
        "chat_complete",
        "conv_status",
    ]


async def _run_user(
    client: httpx.AsyncClient, user: str, turns: int, acks: list[str], seen: list[str]
) -> None:
    async with open_stream(client, user) as stream:
        for n in range(turns):
            ack = await submit(client, user, f"{user} turn {n}", bundle_id="slow")
            acks.append(ack["turn_id"])
            await _collect_terminal(stream, ack["turn_id"], seen)


async def _collect_terminal(stream: EventStream, turn_id: str, seen: list[str]) -> None:
    with anyio.fail_after(30):
        while True:
            event = await stream.next()
            if event.route in ("chat_complete", "chat_error") and event.turn_id:
                seen.append(event.turn_id)
                if event.turn_id == turn_id:
                    return


async def test_a_processor_killed_mid_turn_loses_no_turn_and_doubles_none(
    tmp_path: Path,
) -> None:
    acks: list[str] = []
    terminals: list[str] = []
    async with cluster(tmp_path, KDCUBE_LEASE_S="1") as roles:
        ingress = await roles.start("ingress")
        victim = await roles.start("proc")
        await roles.start("proc")
        async with (
            httpx.AsyncClient(base_url=ingress.url, timeout=10) as client,
            anyio.create_task_group() as users,
        ):
            for n in range(8):
                users.start_soon(_run_user, client, f"user{n}", 3, acks, terminals)
            with anyio.fail_after(10):
                while len(terminals) < 4:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            await victim.kill()

    counts = Counter(terminals)
    assert len(acks) == 24
    assert [t for t in acks if counts[t] == 0] == [], "every accepted turn ends"
    assert [t for t, c in counts.items() if c > 1] == [], "no turn ends twice"


@dataclass
class Ledger:
    """What the clients saw: turns accepted, and terminal events per turn."""

    accepted: list[str]
    terminals: Counter[str]
    arrived: dict[str, anyio.Event]

    def terminal_seen(self, turn_id: str) -> None:
        self.terminals[turn_id] += 1
        self.arrived.setdefault(turn_id, anyio.Event()).set()


async def _follow(client: httpx.AsyncClient, user: str, ledger: Ledger) -> None:
    """Keep the user's stream open across outages, resuming by Last-Event-ID."""
    last_id: str | None = None
    while True:
        try:
            async with open_stream(client, user, last_event_id=last_id) as stream:
                while True:
                    event = await stream.next()
                    last_id = event.id or last_id
                    if event.route in ("chat_complete", "chat_error") and event.turn_id:
                        ledger.terminal_seen(event.turn_id)
        except (EOFError, httpx.HTTPError, AssertionError):
            await anyio.sleep(0.2)


async def _submit_until_accepted(
    client: httpx.AsyncClient, user: str, text: str
) -> str:
    with anyio.fail_after(60):
        while True:
            try:
                response = await client.post(
                    "/sse/chat",
                    params={"stream_id": "s1"},
                    json={
                        "bundle_id": "slow",
                        "external_events": [
                            {
                                "type": "event.user.prompt",
                                "payload": {"event": {"text": text}},
                            }
                        ],
                    },
                    headers=auth(user),
                )
            except httpx.HTTPError:
                await anyio.sleep(0.2)
                continue
            if response.status_code == 503:
                assert response.headers["Retry-After"].isdigit()
                await anyio.sleep(0.2)
                continue
            assert response.status_code == 200, response.text
            return str(response.json()["turn_id"])


async def _chaos_user(url: str, user: str, turns: int, ledger: Ledger) -> None:
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as client,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(_follow, client, user, ledger)
        for n in range(turns):
            turn_id = await _submit_until_accepted(client, user, f"{user} says {n}")
            ledger.accepted.append(turn_id)
            with anyio.fail_after(90):
                await ledger.arrived.setdefault(turn_id, anyio.Event()).wait()
        tasks.cancel_scope.cancel()


@pytest.mark.slow
@pytest.mark.skipif(not can_run_postgres(), reason="needs root and PostgreSQL 15")
async def test_chaos_kill_a_processor_restart_redis_restart_postgres(
    tmp_path: Path,
) -> None:
    ledger = Ledger([], Counter(), {})
    with throwaway_redis(tmp_path / "redis") as redis, throwaway_postgres() as postgres:
        env = {
            "KDCUBE_REDIS_URL": redis.url,
            "KDCUBE_POSTGRES_DSN": postgres.dsn,
            "KDCUBE_LEASE_S": "1",
        }
        async with cluster(tmp_path, **env) as roles:
            ingress = await roles.start("ingress")
            victim = await roles.start("proc")
            await roles.start("proc")
            async with anyio.create_task_group() as users:
                for n in range(6):
                    users.start_soon(_chaos_user, ingress.url, f"user{n}", 5, ledger)

                await _until_terminals(ledger, 4)
                await victim.kill()
                await _until_terminals(ledger, 10)
                await anyio.to_thread.run_sync(redis.stop)
                await anyio.to_thread.run_sync(redis.start)
                await _until_terminals(ledger, 16)
                await anyio.to_thread.run_sync(postgres.stop)
                await anyio.to_thread.run_sync(postgres.start)

    assert len(ledger.accepted) == 30
    missing = [t for t in ledger.accepted if ledger.terminals[t] == 0]
    doubled = [t for t, count in ledger.terminals.items() if count > 1]
    assert (missing, doubled) == ([], [])


async def _until_terminals(ledger: Ledger, count: int) -> None:
    with anyio.fail_after(60):
        while sum(ledger.terminals.values()) < count:  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def _ready_body(client: httpx.AsyncClient, status: int) -> dict[str, object]:
    """Poll /ready until it answers ``status`` (the watcher probes every 2 s)."""
    with anyio.fail_after(15):
        while True:
            response = await client.get("/ready")
            if response.status_code == status:
                body: dict[str, object] = response.json()
                return body
            await anyio.sleep(0.1)


async def test_an_outage_is_named_by_ready_and_refused_with_retry_after(
    tmp_path: Path,
) -> None:
    with throwaway_redis(tmp_path / "redis") as redis:
        async with cluster(tmp_path, KDCUBE_REDIS_URL=redis.url) as roles:
            ingress = await roles.start("ingress")
            async with httpx.AsyncClient(base_url=ingress.url, timeout=10) as client:
                await anyio.to_thread.run_sync(redis.stop)
                down = await _ready_body(client, 503)
                refused = await client.post(
                    "/sse/chat",
                    json={
                        "external_events": [
                            {
                                "type": "event.user.prompt",
                                "payload": {"event": {"text": "x"}},
                            }
                        ]
                    },
                    headers=auth("alice"),
                )
                await anyio.to_thread.run_sync(redis.start)
                up = await _ready_body(client, 200)

    assert down == {"status": "unavailable", "down": ["redis"]}
    assert refused.status_code == 503
    assert refused.json()["error"] == "dependency_unavailable"
    assert refused.headers["Retry-After"].isdigit()
    assert up == {"status": "ready"}
