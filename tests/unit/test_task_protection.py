"""TaskProtection against a stand-in ECS agent (``tests/ecs_agent.py``).

Time for renewals comes from a fake clock the test moves; the agent itself
keeps no time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from kdcube.runtime.task_protection import TaskProtection
from tests.ecs_agent import (
    BROKEN,
    OFF,
    ON_FOR_60,
    PROTECTED,
    REFUSED,
    RELEASED,
    Agent,
    running_agent,
)

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    async with running_agent() as agent:
        yield agent


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def protection_for(
    agent_uri: str | None, http: httpx.AsyncClient, clock: FakeClock, **options: Any
) -> TaskProtection:
    return TaskProtection(
        agent_uri, http, expires_minutes=60, renew_before_s=300, clock=clock, **options
    )


async def test_protects_renews_before_expiry_and_releases(
    agent: Agent, http: httpx.AsyncClient
) -> None:
    clock = FakeClock()
    protection = protection_for(agent.url, http, clock)
    agent.answers = [PROTECTED, PROTECTED, RELEASED]

    await protection.update(True)
    clock.now += 60 * 60 - 301
    await protection.update(True)
    assert agent.bodies == [ON_FOR_60]

    clock.now += 1
    await protection.update(True)
    await protection.update(False)
    await protection.update(False)
    assert agent.bodies == [ON_FOR_60, ON_FOR_60, OFF]
    assert {(call.method, call.path) for call in agent.calls} == {
        ("PUT", "/task-protection/v1/state")
    }
    assert not protection.protected


async def test_idle_without_protection_sends_nothing(
    agent: Agent, http: httpx.AsyncClient
) -> None:
    protection = protection_for(agent.url, http, FakeClock())

    await protection.update(False)
    assert agent.calls == []


@pytest.mark.parametrize(
    ("answer", "reason"),
    [(REFUSED, "TASK_NOT_VALID"), (BROKEN, "ServerException: try later")],
)
async def test_refused_protection_is_logged_and_retried(
    agent: Agent, http: httpx.AsyncClient, answer: tuple[int, Any], reason: str
) -> None:
    protection = protection_for(agent.url, http, FakeClock())
    agent.answers = [answer, PROTECTED]

    with capture_logs() as logs:
        await protection.update(True)
    assert not protection.protected
    assert [(log["event"], log.get("reason")) for log in logs] == [
        ("task_protection.refused", reason)
    ]

    await protection.update(True)
    assert protection.protected
    assert agent.bodies == [ON_FOR_60, ON_FOR_60]


async def test_refused_release_is_retried_on_the_next_idle_update(
    agent: Agent, http: httpx.AsyncClient
) -> None:
    protection = protection_for(agent.url, http, FakeClock())
    agent.answers = [PROTECTED, BROKEN, RELEASED]

    await protection.update(True)
    with capture_logs() as logs:
        await protection.update(False)
    assert logs[0]["event"] == "task_protection.refused"

    await protection.update(False)
    assert agent.bodies == [ON_FOR_60, OFF, OFF]
    assert not protection.protected


async def test_an_answer_without_protection_counts_as_refused(
    agent: Agent, http: httpx.AsyncClient
) -> None:
    protection = protection_for(agent.url, http, FakeClock())
    agent.answers = [(200, {"unexpected": True})]

    with capture_logs() as logs:
        await protection.update(True)
    assert not protection.protected
    assert logs[0]["reason"] == "unrecognised answer"


async def test_a_stalled_agent_times_out(agent: Agent, http: httpx.AsyncClient) -> None:
    protection = protection_for(agent.url, http, FakeClock(), timeout_s=0.2)
    agent.stall = anyio.Event()

    with capture_logs() as logs:
        await protection.update(True)
    assert logs[0]["event"] in {
        "task_protection.timeout",
        "task_protection.unreachable",
    }
    assert not protection.protected


async def test_an_unreachable_agent_is_logged(http: httpx.AsyncClient) -> None:
    async with running_agent() as agent:
        gone = agent.url
    protection = protection_for(gone, http, FakeClock())

    with capture_logs() as logs:
        await protection.update(True)
    assert logs[0]["event"] == "task_protection.unreachable"
    assert not protection.protected


async def test_without_agent_uri_updates_do_nothing_and_say_so_once(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ECS_AGENT_URI", raising=False)
    protection = TaskProtection.from_environment(http)

    with capture_logs() as logs:
        await protection.update(True)
        await protection.update(False)
        await protection.update(True)
    assert [log["event"] for log in logs] == ["task_protection.disabled"]
    assert not protection.protected


async def test_from_environment_reads_the_agent_uri(
    agent: Agent, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ECS_AGENT_URI", agent.url + "/")
    protection = TaskProtection.from_environment(http, expires_minutes=10)

    await protection.update(True)
    assert agent.bodies == [{"ProtectionEnabled": True, "ExpiresInMinutes": 10}]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"expires_minutes": 0}, "expires_minutes"),
        ({"expires_minutes": 2881}, "expires_minutes"),
        ({"expires_minutes": 5, "renew_before_s": 300}, "renew_before_s"),
    ],
)
async def test_bad_options_are_refused(
    http: httpx.AsyncClient, options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        TaskProtection("http://agent", http, **options)
