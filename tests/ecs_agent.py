"""A stand-in for the ECS agent's task-protection endpoint, served by
Hypercorn on port 0. It records every request and answers from a script, so
a test can make the agent refuse, fail or stall."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio

from kdcube.asgi import serve_lifespan
from kdcube.runtime.http import hypercorn_config, serve_http
from tests.openai_stub import read_body, respond_json

ON_FOR_60 = {"ProtectionEnabled": True, "ExpiresInMinutes": 60}
OFF = {"ProtectionEnabled": False}
PROTECTED = (200, {"protection": {"ProtectionEnabled": True, "TaskArn": "arn:t"}})
RELEASED = (200, {"protection": {"ProtectionEnabled": False, "TaskArn": "arn:t"}})
REFUSED = (400, {"failure": {"Arn": "arn:t", "Reason": "TASK_NOT_VALID"}})
BROKEN = (500, {"error": {"Code": "ServerException", "Message": "try later"}})


@dataclass
class Call:
    method: str
    path: str
    body: Any


@dataclass
class Agent:
    """A stand-in for the ECS agent's task-protection endpoint."""

    answers: list[tuple[int, Any]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    stall: anyio.Event | None = None
    url: str = ""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return

        body = await read_body(receive)
        self.calls.append(Call(scope["method"], scope["path"], json.loads(body)))
        if self.stall is not None:
            await self.stall.wait()
        status, answer = self.answers.pop(0) if self.answers else PROTECTED
        await respond_json(send, status, answer)

    @property
    def bodies(self) -> list[Any]:
        return [call.body for call in self.calls]


@asynccontextmanager
async def running_agent() -> AsyncIterator[Agent]:
    agent = Agent()
    shutdown = anyio.Event()
    config = hypercorn_config("127.0.0.1", 0)
    async with anyio.create_task_group() as tasks:
        urls = await tasks.start(partial(serve_http, agent, config, shutdown=shutdown))
        agent.url = urls[0]
        try:
            yield agent
        finally:
            if agent.stall is not None:
                agent.stall.set()
            shutdown.set()
