"""The coder bundle end to end: a snippet in the prompt runs in a child process
and its output comes back as the turn's answer.

The snippet parsing is tested on the entry module directly, imported from its
file as the platform would.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

from tests.helpers import REPO, Event, EventStream, Server, auth, open_stream, serve
from tests.helpers import submit as submit_prompt

pytestmark = pytest.mark.anyio


def load_bundle_module() -> ModuleType:
    name = "coder_under_test"
    spec = importlib.util.spec_from_file_location(
        name, REPO / "bundles" / "coder" / "entrypoint.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


coder = load_bundle_module()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def fenced(code: str, language: str = "python") -> str:
    return f"Please run this:\n\n```{language}\n{code}\n```\n"


async def run_turn(
    server: Server, stream: EventStream, prompt: str
) -> tuple[dict[str, Any], list[Event]]:
    ack = await submit_prompt(server.client, "alice", prompt, bundle_id="coder")
    with anyio.fail_after(10):
        events = await stream.turn(ack["turn_id"])
    return ack, events


def deltas(events: list[Event]) -> str:
    return "".join(e.data["delta"]["text"] for e in events if e.route == "chat_delta")


def steps(events: list[Event]) -> list[dict[str, Any]]:
    return [e.data for e in events if e.route == "chat_step"]


def final_answer(events: list[Event]) -> str:
    [complete] = [e for e in events if e.route == "chat_complete"]
    answer: str = complete.data["data"]["final_answer"]
    return answer


async def test_a_snippet_prints_a_computed_value(tmp_path: Path) -> None:
    prompt = fenced("print(sum(range(10)) * 7)")
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        _, events = await run_turn(server, stream, prompt)

    answer = final_answer(events)
    assert "````text\n315\n````" in answer
    assert deltas(events) == answer
    running, completed = steps(events)
    assert running["event"]["status"] == "running"
    assert running["event"]["title"] == "Running the snippet"
    assert completed["event"]["status"] == "completed"
    assert completed["data"]["exit_code"] == 0
    assert completed["data"]["timed_out"] is False
    assert completed["data"]["stdout_truncated"] is False
    routes = [e.route for e in events]
    assert routes.index("chat_step") < routes.index("chat_delta")


async def test_a_failing_snippet_reports_its_error_and_exit_code(
    tmp_path: Path,
) -> None:
    prompt = fenced("print('before')\nraise ValueError('boom')")
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        _, events = await run_turn(server, stream, prompt)

    answer = final_answer(events)
    assert "before" in answer
    assert "ValueError: boom" in answer
    assert "exited with code 1" in answer
    assert deltas(events) == answer
    assert [s["event"]["status"] for s in steps(events)] == ["running", "failed"]
    assert steps(events)[1]["data"]["exit_code"] == 1


async def test_files_written_to_out_are_kept_as_artifacts(tmp_path: Path) -> None:
    prompt = fenced("open('out/report.txt', 'w').write('done')")
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack, events = await run_turn(server, stream, prompt)
        detail = await server.client.get(
            f"/api/conversations/{ack['conversation_id']}", headers=auth("alice")
        )
        records = await execution_records(server, ack["turn_id"])

    answer = final_answer(events)
    assert "The snippet printed nothing." in answer
    assert "`report.txt` (4 bytes)" in answer
    exec_steps = [s for s in steps(events) if s["event"]["step"] == "exec"]
    assert exec_steps[1]["data"]["files"] == ["report.txt"]
    [turn] = detail.json()["turns"]
    assert turn["artifacts"] == [
        {"name": "report.txt", "mime": "text/plain", "size": 4}
    ]
    [result] = [json.loads(v) for k, v in records.items() if k.endswith("result.json")]
    assert result["mode"] == "subprocess"
    assert result["exit_code"] == 0 and result["files"] == ["report.txt"]


async def test_each_run_leaves_its_record_under_the_turns_executions(
    tmp_path: Path,
) -> None:
    prompt = fenced("import sys\nprint('to out')\nprint('to err', file=sys.stderr)")
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack, _ = await run_turn(server, stream, prompt)
        records = await execution_records(server, ack["turn_id"])

    names = sorted(key.rsplit("/", 1)[1] for key in records)
    assert names == ["result.json", "stderr.txt", "stdout.txt"]
    [folder] = {key.rsplit("/", 2)[0] for key in records}
    assert f"/executions/alice/{ack['conversation_id']}/{ack['turn_id']}" in folder
    by_name = {key.rsplit("/", 1)[1]: value for key, value in records.items()}
    assert by_name["stdout.txt"] == b"to out\n"
    assert by_name["stderr.txt"] == b"to err\n"
    assert json.loads(by_name["result.json"])["run_id"] == ack["turn_id"]


async def execution_records(server: Server, turn_id: str) -> dict[str, bytes]:
    """The stored objects of the turn's runs, by key."""
    storage = server.running.platform.storage
    keys = [info.key for info in await storage.list("cb/") if turn_id in info.key]
    records = [key for key in keys if "/executions/" in key]
    contents = {}
    for key in records:
        contents[key] = b"".join([chunk async for chunk in storage.get(key)])
    return contents


async def test_cancel_stops_an_endless_snippet_and_its_process(
    tmp_path: Path,
) -> None:
    prompt = fenced("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass")
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        ack = await submit_prompt(server.client, "alice", prompt, bundle_id="coder")
        with anyio.fail_after(10):
            pid = await wait_for_pid(stream, ack["turn_id"])
        response = await server.client.post(
            "/sse/cancel",
            json={"conversation_id": ack["conversation_id"]},
            headers=auth("alice"),
        )
        with anyio.fail_after(3):
            events = await stream.turn(ack["turn_id"])

    assert response.status_code == 202
    assert [e.route for e in events][-2:] == ["chat_error", "conv_status"]
    assert events[-2].data["data"]["error_type"] == "cancelled"
    assert not alive(pid)


async def wait_for_pid(stream: EventStream, turn_id: str) -> int:
    """The pid the snippet printed, once its line has streamed."""
    text = ""
    while True:
        event = await stream.next()
        if event.turn_id == turn_id and event.route == "chat_delta":
            text += event.data["delta"]["text"]
            found = re.search(r"^(\d+)\n", text, re.M)
            if found:
                return int(found.group(1))


def test_the_first_python_block_is_the_snippet() -> None:
    prompt = "a\n```js\nx()\n```\n```python\nprint(1)\n```\n```py\nprint(2)\n```"
    assert coder.snippet(prompt) == "print(1)\n"


def test_a_lone_block_without_language_is_the_snippet() -> None:
    assert coder.snippet("run:\n```\nprint(3)\n```") == "print(3)\n"


def test_without_a_usable_block_the_whole_prompt_is_the_snippet() -> None:
    assert coder.snippet("print(4)") == "print(4)"
    two = "```\nprint(5)\n```\n```\nprint(6)\n```"
    assert coder.snippet(two) == two


async def test_a_bundle_may_choose_its_own_executor(tmp_path: Path) -> None:
    prompt = fenced("print(6 * 7)")
    async with (
        serve(tmp_path, exec="off") as server,
        open_stream(server.client, "alice") as stream,
    ):
        turns = {}
        for bundle_id in ("coder", "coder-subprocess", "coder-fargate"):
            ack = await submit_prompt(
                server.client, "alice", prompt, bundle_id=bundle_id
            )
            with anyio.fail_after(10):
                turns[bundle_id] = await stream.turn(ack["turn_id"])

    assert "42" in final_answer(turns["coder-subprocess"])
    off, fargate = turns["coder"], turns["coder-fargate"]
    assert off[-2].route == fargate[-2].route == "chat_error"
    assert "KDCUBE_EXEC=off" in steps(off)[-1]["data"]["reason"]
    assert "KDCUBE_EXEC_FARGATE_CLUSTER" in steps(fargate)[-1]["data"]["reason"]
