"""A processor on ECS protects its task from scale-in while turns run there,
and releases it once idle (the ECS agent is a stand-in, tests/ecs_agent.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import anyio
import pytest

from tests.ecs_agent import OFF, ON_FOR_60, Agent, running_agent
from tests.helpers import auth, open_stream, serve, submit

pytestmark = pytest.mark.anyio


async def wait_for_body(agent: Agent, body: Mapping[str, object], count: int) -> None:
    # The stand-in has no event of its own; the processor checks every second.
    with anyio.fail_after(10):
        while agent.bodies.count(body) < count:  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def test_the_task_is_protected_while_a_turn_runs_and_released_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_agent() as agent:
        monkeypatch.setenv("ECS_AGENT_URI", agent.url)
        async with (
            serve(tmp_path) as server,
            open_stream(server.client, "alice") as stream,
        ):
            ack = await submit(server.client, "alice", "hi", bundle_id="glacial")
            await wait_for_body(agent, ON_FOR_60, 1)
            protected_while_running = agent.bodies == [ON_FOR_60]

            await server.client.post(
                "/sse/cancel",
                json={"conversation_id": ack["conversation_id"]},
                headers=auth("alice"),
            )
            with anyio.fail_after(10):
                await stream.turn(ack["turn_id"])
            await wait_for_body(agent, OFF, 1)

    assert protected_while_running
    assert agent.bodies[:2] == [ON_FOR_60, OFF]
    assert {call.path for call in agent.calls} == {"/task-protection/v1/state"}
