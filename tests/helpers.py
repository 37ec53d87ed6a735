"""A real server on port 0 and a small SSE client that speaks PROTOCOL.md."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import yaml

from kdcube.config import Settings
from kdcube.edge.server import edge_options
from kdcube.runtime.supervisor import Role, Running, Supervisor
from tests.s3_server import provide_s3_server

REPO = Path(__file__).resolve().parent.parent
TERMINAL = ("chat_complete", "chat_error")


def write_bundles(folder: Path) -> Path:
    """A registry with echo in several tempos plus the test bundles."""
    echo = REPO / "bundles" / "echo"
    tests = REPO / "tests" / "bundles"
    items = [
        {"id": "echo", "path": str(echo), "config": {"chunks": 4, "delay_s": 0}},
        {"id": "slow", "path": str(echo), "config": {"chunks": 5, "delay_s": 0.1}},
        {"id": "glacial", "path": str(echo), "config": {"chunks": 3, "delay_s": 30}},
        {"id": "sleeper", "path": str(tests / "sleeper")},
        {"id": "failing", "path": str(tests / "failing")},
        {"id": "quiet", "path": str(tests / "quiet")},
        {"id": "reader", "path": str(tests / "reader")},
        {"id": "maker", "path": str(tests / "maker")},
        {"id": "coder", "path": str(REPO / "bundles" / "coder")},
        *(
            {
                "id": f"coder-{mode}",
                "path": str(REPO / "bundles" / "coder"),
                "config": {"execution": {"runtime": {"mode": mode}}},
            }
            for mode in ("subprocess", "fargate")
        ),
        {
            "id": "asyncio",
            "path": str(tests / "asyncio_words"),
            "config": {"marker": str(folder / "asyncio-cancelled")},
        },
    ]
    path = folder / "bundles.yaml"
    path.write_text(
        yaml.safe_dump({"bundles": {"default_bundle_id": "echo", "items": items}})
    )
    return path


@dataclass
class Server:
    running: Running
    supervisor: Supervisor
    client: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.running.urls[0]


def backend() -> str:
    """The matrix cell: ``embedded`` (default) or ``redis-postgres``."""
    return os.environ.get("KDCUBE_TEST_BACKEND", "embedded")


def storage() -> str:
    """The matrix cell's storage: ``local`` (default) or ``s3``."""
    return os.environ.get("KDCUBE_TEST_STORAGE", "local")


def backend_settings() -> dict[str, Any]:
    """Settings that put a test on the backend and storage of its matrix cell.

    On Redis and Postgres each test gets a project of its own: its keys carry
    that project and its tables live in that project's schema, so tests never
    see each other's data, and ``clean_backend`` removes both afterwards. On
    S3 each test gets a prefix of its own in the test bucket.
    """
    settings = storage_settings()
    if backend() == "embedded":
        return settings
    return {
        **settings,
        "redis_url": os.environ.get(
            "KDCUBE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"
        ),
        "postgres_dsn": os.environ.get(
            "KDCUBE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
        ),
        "project": f"t{uuid.uuid4().hex[:12]}",
    }


def storage_settings() -> dict[str, Any]:
    if storage() == "local":
        return {}
    server = provide_s3_server()
    # The processes under test find their S3 credentials the way deployed ones
    # do: through botocore's chain, here the environment.
    os.environ.update(server.env())
    return {
        "storage_path": server.storage_url(f"e2e/{uuid.uuid4().hex[:12]}/"),
        "s3_endpoint_url": server.endpoint,
    }


def storage_environment(settings: Settings) -> dict[str, str]:
    """The storage of ``settings`` as the environment of a ``kdcube`` process."""
    environment = {}
    if settings.storage_path is not None:
        environment["KDCUBE_STORAGE_PATH"] = settings.storage_path
    if settings.s3_endpoint_url is not None:
        environment["KDCUBE_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return environment


async def clean_backend(settings: Settings) -> None:
    if not settings.distributed:
        return
    import coredis

    from kdcube.runtime.platform import project_schema

    assert settings.redis_url is not None and settings.postgres_dsn is not None
    client: coredis.Redis[bytes] = coredis.Redis.from_url(settings.redis_url)
    async with client:
        keys = [key async for key in client.scan_iter(match=f"*{settings.project}*")]
        if keys:
            await client.delete(keys)

    dsn, schema = settings.postgres_dsn, project_schema(settings)
    await anyio.to_thread.run_sync(_drop_schema, dsn, schema)


def _drop_schema(dsn: str, schema: str) -> None:
    # psql, so the cleanup needs no event loop bridge of its own.
    subprocess.run(
        ["psql", dsn, "-q", "-c", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'],
        check=True,
        capture_output=True,
    )


@asynccontextmanager
async def serve(
    tmp_path: Path, *, keep_data: bool = False, edge: bool = True, **overrides: Any
) -> AsyncIterator[Server]:
    """Run every role behind the embedded edge (as ``kdcube run`` does) in
    this event loop; drain it when the block ends. ``edge=False`` serves the
    roles' app bare.

    Its Redis keys and Postgres schema are removed afterwards, unless
    ``keep_data`` (for a test that starts a second server on the same data).
    """
    settings = Settings(
        home=tmp_path / "home",
        bundles=write_bundles(tmp_path),
        **{
            "sse_keepalive_s": 5.0,
            "drain_timeout_s": 5.0,
            "exec": "subprocess",
            **backend_settings(),
            **overrides,
        },
    )
    supervisor = Supervisor(
        settings,
        {Role.INGRESS, Role.PROC, Role.METRICS},
        host="127.0.0.1",
        port=0,
        edge=edge_options(settings, rate_limited=False) if edge else None,
    )
    try:
        async with anyio.create_task_group() as tasks:
            running: Running = await tasks.start(supervisor.run)
            async with httpx.AsyncClient(
                base_url=running.urls[0], timeout=10
            ) as client:
                yield Server(running, supervisor, client)
            if not supervisor.stopping:
                supervisor.request_stop()
    finally:
        if not keep_data:
            with anyio.CancelScope(shield=True):
                await clean_backend(settings)


def prompt_body(text: str, **fields: Any) -> dict[str, Any]:
    event = {
        "type": "event.user.prompt",
        "payload": {"mime": "text/plain", "event": {"text": text}},
    }
    return {"external_events": [event], **fields}


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer dev-{user}"}


async def submit(
    client: httpx.AsyncClient,
    user: str,
    text: str,
    stream_id: str | None = "s1",
    **fields: Any,
) -> dict[str, Any]:
    params = {"stream_id": stream_id} if stream_id else {}
    response = await client.post(
        "/sse/chat", params=params, json=prompt_body(text, **fields), headers=auth(user)
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@dataclass
class Event:
    route: str
    data: dict[str, Any]
    id: str | None

    @property
    def turn_id(self) -> str | None:
        conversation = self.data.get("conversation") or {}
        value = conversation.get("turn_id")
        return str(value) if value is not None else None


@dataclass
class EventStream:
    """Frames of one open SSE response; comments are counted, not returned."""

    lines: AsyncIterator[str]
    keepalives: int = 0
    seen: list[Event] = field(default_factory=list)

    async def next(self) -> Event:
        fields: dict[str, str] = {}
        async for line in self.lines:
            if line == "":
                if fields:
                    break
                continue
            if line.startswith(":"):
                self.keepalives += 1
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        else:
            raise EOFError("the stream ended")

        event = Event(
            fields.get("event", "message"), json.loads(fields["data"]), fields.get("id")
        )
        self.seen.append(event)
        return event

    async def until(self, route: str, turn_id: str | None = None) -> list[Event]:
        """Events up to and including the first ``route`` (of ``turn_id``)."""
        got = []
        while True:
            event = await self.next()
            got.append(event)
            if event.route == route and (turn_id is None or event.turn_id == turn_id):
                return got

    async def turn(self, turn_id: str, *, started: bool = True) -> list[Event]:
        """This turn's events through its closing conv_status, or through its
        terminal event for a turn dropped before it ``started``."""
        events = []
        while True:
            event = await self.next()
            if event.turn_id != turn_id:
                continue
            events.append(event)
            if (
                event.route == "conv_status"
                and event.data["data"]["state"] != "in_progress"
            ):
                return events
            if event.route in TERMINAL and not started:
                return events


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient,
    user: str,
    stream_id: str = "s1",
    *,
    last_event_id: str | None = None,
) -> AsyncIterator[EventStream]:
    headers = auth(user)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with client.stream(
        "GET", "/sse/stream", params={"stream_id": stream_id}, headers=headers
    ) as response:
        assert response.status_code == 200, await response.aread()
        stream = EventStream(response.aiter_lines())
        ready = await stream.next()
        assert ready.route == "ready"
        yield stream
