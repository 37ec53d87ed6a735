"""The assistant bundle against a local OpenAI-compatible server, end to end.

Each test starts the stub (``tests/openai_stub.py``) and a kdcube server whose
bundles.yaml registers ``assistant`` pointed at it, then drives a turn over SSE.
A few tests call the bundle's ``run`` directly with a recording emitter, for
what the platform deliberately hides (the error message it logs) or what needs
no server (config errors, parsing).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
import yaml

from kdcube.sdk import TurnContext
from tests import helpers
from tests.helpers import (
    REPO,
    Event,
    EventStream,
    Server,
    auth,
    open_stream,
    prompt_body,
    serve,
    submit,
)
from tests.openai_stub import OpenAIStub, Script, open_openai_stub

pytestmark = pytest.mark.anyio

MODEL = "stub-model-1"
KEY_VARIABLE = "KDCUBE_TEST_ASSISTANT_KEY"
API_KEY = "sk-test-7f3a9c-do-not-leak"
BUNDLE = REPO / "bundles" / "assistant"
_write_default_bundles = helpers.write_bundles
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01"
    b"\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


def load_bundle_module() -> ModuleType:
    """The entry module, imported from its file as the platform would."""
    name = "assistant_under_test"
    spec = importlib.util.spec_from_file_location(name, BUNDLE / "entrypoint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while being defined.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


assistant = load_bundle_module()


@asynccontextmanager
async def serve_assistant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub: OpenAIStub, **config: Any
) -> AsyncIterator[Server]:
    """``serve`` with ``assistant`` added to its bundles.yaml.

    ``serve`` always writes its own registry, so the helper that writes it is
    wrapped rather than the file passed in.
    """
    item = {
        "id": "assistant",
        "path": str(BUNDLE),
        "config": {
            "base_url": stub.base_url,
            "model": MODEL,
            "api_key_env": KEY_VARIABLE,
            **config,
        },
    }

    def write_bundles(folder: Path) -> Path:
        path = _write_default_bundles(folder)
        registry = yaml.safe_load(path.read_text())
        registry["bundles"]["items"].append(item)
        path.write_text(yaml.safe_dump(registry))
        return path

    monkeypatch.setenv(KEY_VARIABLE, API_KEY)
    monkeypatch.setattr(helpers, "write_bundles", write_bundles)
    async with serve(tmp_path) as server:
        yield server


async def ask(
    server: Server, stream: EventStream, text: str
) -> tuple[dict[str, Any], list[Event]]:
    ack = await submit(server.client, "alice", text, bundle_id="assistant")
    with anyio.fail_after(10):
        events = await stream.turn(ack["turn_id"])
    return ack, events


def texts(events: list[Event], marker: str = "answer") -> list[str]:
    return [
        e.data["delta"]["text"]
        for e in events
        if e.route == "chat_delta" and e.data["delta"]["marker"] == marker
    ]


def steps(events: list[Event], kind: str = "chat.step") -> list[dict[str, Any]]:
    return [e.data for e in events if e.route == "chat_step" and e.data["type"] == kind]


def ending(events: list[Event]) -> Event:
    [end] = [e for e in events if e.route in ("chat_complete", "chat_error")]
    return end


async def test_streamed_deltas_join_to_the_final_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(
        pieces=("Zürich ", "is ", "by a lake ✓"), thinking=("Hmm, ", "geography.")
    )
    async with (
        open_openai_stub(script) as stub,
        serve_assistant(tmp_path, monkeypatch, stub) as server,
        open_stream(server.client, "alice") as stream,
    ):
        _, events = await ask(server, stream, "Where is Zürich?")

    assert texts(events) == list(script.pieces)
    assert texts(events, "thinking") == list(script.thinking)
    assert ending(events).route == "chat_complete"
    assert ending(events).data["data"]["final_answer"] == "Zürich is by a lake ✓"


async def test_model_step_runs_then_completes_with_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        open_openai_stub() as stub,
        serve_assistant(tmp_path, monkeypatch, stub, followups=False) as server,
        open_stream(server.client, "alice") as stream,
    ):
        _, events = await ask(server, stream, "hi")

    running, completed = steps(events)
    assert running["event"] == {
        "step": "model",
        "status": "running",
        "title": f"Asking {MODEL}",
    }
    assert completed["event"] == {"step": "model", "status": "completed"}
    assert completed["data"] == {
        "finish_reason": "stop",
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "total_tokens": 17,
    }
    routes = [e.route for e in events]
    assert routes.index("chat_step") < routes.index("chat_delta")


async def test_request_carries_model_messages_settings_and_bearer_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {"system_prompt": "Be brief.", "temperature": 0.2, "max_tokens": 64}
    async with (
        open_openai_stub() as stub,
        serve_assistant(tmp_path, monkeypatch, stub, **config) as server,
        open_stream(server.client, "alice") as stream,
    ):
        await ask(server, stream, "What is Trio?")

    first = stub.requests[0]
    assert first.headers["authorization"] == f"Bearer {API_KEY}"
    assert first.body == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is Trio?"},
        ],
        "stream": True,
        "temperature": 0.2,
        "max_tokens": 64,
    }


async def test_followups_arrive_as_a_followups_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(followups_reply='```json\n["A?", "B?", "C?", "D?"]\n```')
    async with (
        open_openai_stub(script) as stub,
        serve_assistant(tmp_path, monkeypatch, stub) as server,
        open_stream(server.client, "alice") as stream,
    ):
        _, events = await ask(server, stream, "hi")

    [followups] = steps(events, "chat.followups")
    assert followups["data"] == {"followups": ["A?", "B?", "C?"]}
    streamed, asked = stub.requests
    assert streamed.streamed and not asked.streamed
    assert asked.body["messages"][-2] == {
        "role": "assistant",
        "content": "Hello, world.",
    }
    assert "JSON array" in asked.body["messages"][-1]["content"]
    assert ending(events).data["data"]["final_answer"] == "Hello, world."


async def test_junk_followups_give_none_and_the_turn_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(followups_reply="Sure! Ask me anything [really].")
    async with (
        open_openai_stub(script) as stub,
        serve_assistant(tmp_path, monkeypatch, stub) as server,
        open_stream(server.client, "alice") as stream,
    ):
        _, events = await ask(server, stream, "hi")

    assert len(stub.requests) == 2
    assert steps(events, "chat.followups") == []
    assert ending(events).route == "chat_complete"


async def test_upstream_error_ends_the_turn_as_bundle_error_without_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(status=500, error_message=f"Incorrect API key: {API_KEY}")
    async with (
        open_openai_stub(script) as stub,
        serve_assistant(tmp_path, monkeypatch, stub) as server,
        open_stream(server.client, "alice") as stream,
    ):
        _, events = await ask(server, stream, "hi")

    end = ending(events)
    assert end.route == "chat_error"
    assert end.data["data"]["error_type"] == "bundle_error"
    assert API_KEY not in json.dumps([e.data for e in events])
    failed = steps(events)[-1]
    assert failed["event"]["status"] == "failed"
    assert failed["event"]["title"] == f"{MODEL} failed"


async def test_cancel_mid_stream_closes_the_upstream_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(pieces=("one ", "two ", "three"), hold_after=1)
    async with (
        open_openai_stub(script) as stub,
        serve_assistant(tmp_path, monkeypatch, stub) as server,
        open_stream(server.client, "alice") as stream,
    ):
        ack = await submit(server.client, "alice", "count", bundle_id="assistant")
        await stream.until("chat_delta", ack["turn_id"])
        response = await server.client.post(
            "/sse/cancel",
            json={"conversation_id": ack["conversation_id"], "turn_id": ack["turn_id"]},
            headers=auth("alice"),
        )
        cancelled_at = anyio.current_time()
        with anyio.fail_after(1):
            await stub.disconnected.wait()
        with anyio.fail_after(5):
            events = await stream.turn(ack["turn_id"])

    assert response.status_code == 202
    assert stub.disconnected_at is not None
    assert stub.disconnected_at - cancelled_at < 1
    assert ending(events).data["data"]["error_type"] == "cancelled"
    assert len(stub.requests) == 1


async def test_text_attachment_reaches_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notes = "Meeting notes: the lake is cold in März.\n"
    files = [("notes.md", notes.encode()), ("dot.gif", GIF)]
    async with (
        open_openai_stub() as stub,
        serve_assistant(tmp_path, monkeypatch, stub, followups=False) as server,
        open_stream(server.client, "alice") as stream,
    ):
        response = await send_with_files(server, "Summarise my notes", files)
        assert response.status_code == 200, response.text
        with anyio.fail_after(10):
            events = await stream.turn(response.json()["turn_id"])

    assert ending(events).route == "chat_complete"
    [user] = stub.requests[0].body["messages"]
    assert user["content"].startswith("Summarise my notes\n\n")
    assert notes in user["content"]
    assert 'Attached file "notes.md"' in user["content"]
    assert user["content"].endswith(
        f"Also attached, not shown here: dot.gif (image/gif, {len(GIF)} bytes)"
    )


async def send_with_files(
    server: Server, text: str, files: list[tuple[str, bytes]]
) -> httpx.Response:
    submission = prompt_body(text, bundle_id="assistant")
    return await server.client.post(
        "/sse/chat",
        params={"stream_id": "s1"},
        data={"event_submission": json.dumps(submission)},
        files=[("files", (name, content)) for name, content in files],
        headers=auth("alice"),
    )


# -- the bundle called directly ------------------------------------------------


@dataclass
class RecordingEmitter:
    deltas: list[tuple[str, str]] = field(default_factory=list)
    steps: list[tuple[str, str, str | None]] = field(default_factory=list)
    followups_seen: list[list[str]] = field(default_factory=list)

    async def delta(self, text: str, *, marker: str = "answer") -> None:
        self.deltas.append((marker, text))

    async def step(
        self,
        step: str,
        *,
        status: str = "running",
        title: str | None = None,
        data: Mapping[str, Any] | None = None,
        agent: str | None = None,
    ) -> None:
        self.steps.append((step, status, title))

    async def followups(self, suggestions: Sequence[str]) -> None:
        self.followups_seen.append(list(suggestions))


def context(config: Mapping[str, Any], prompt: str = "hi") -> TurnContext:
    return TurnContext(
        tenant="t",
        project="p",
        user_id="u",
        user_type="registered",
        session_id="s",
        conversation_id="c",
        turn_id="t1",
        bundle_id="assistant",
        prompt=prompt,
        config=config,
        emit=RecordingEmitter(),
    )


async def test_upstream_error_message_names_the_status_but_not_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_VARIABLE, API_KEY)
    script = Script(status=429, error_message=f"Rate limit for key {API_KEY}. " * 30)
    async with open_openai_stub(script) as stub:
        config = {
            "base_url": stub.base_url,
            "model": MODEL,
            "api_key_env": KEY_VARIABLE,
        }
        with pytest.raises(assistant.UpstreamError) as raised:
            await assistant.run(context(config))

    message = str(raised.value)
    assert message.startswith("The model endpoint answered 429: Rate limit for key ***")
    assert API_KEY not in message and len(message) < 300


async def test_unreachable_endpoint_is_a_short_error() -> None:
    config = {"base_url": "http://127.0.0.1:9/v1", "model": MODEL, "timeout_s": 2}
    with pytest.raises(assistant.UpstreamError, match="127.0.0.1 .ConnectError"):
        await assistant.run(context(config))


async def test_a_silent_endpoint_times_out() -> None:
    async with open_openai_stub(Script(delay_s=5)) as stub:
        config = {"base_url": stub.base_url, "model": MODEL, "timeout_s": 0.3}
        with pytest.raises(assistant.UpstreamError, match="within 0.3 s"):
            await assistant.run(context(config))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{not json", "malformed stream"),
        ("[1, 2]", "malformed stream"),
        ('{"error": {"message": "overloaded"}}', "mid-answer: overloaded"),
    ],
)
def test_a_bad_stream_chunk_is_an_upstream_error(payload: str, message: str) -> None:
    settings = assistant.Settings(base_url="http://x/v1", model=MODEL)
    with pytest.raises(assistant.UpstreamError, match=message):
        assistant.parse_chunk(payload, settings)


@pytest.mark.parametrize("missing", ["base_url", "model"])
async def test_missing_endpoint_or_model_is_a_config_error(
    missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KDCUBE_ASSISTANT_BASE_URL", raising=False)
    monkeypatch.delenv("KDCUBE_ASSISTANT_MODEL", raising=False)
    config = {"base_url": "http://127.0.0.1:9/v1", "model": MODEL}
    del config[missing]
    with pytest.raises(assistant.ConfigError, match=missing):
        await assistant.run(context(config))


async def test_environment_supplies_endpoint_and_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with open_openai_stub() as stub:
        monkeypatch.setenv("KDCUBE_ASSISTANT_BASE_URL", stub.base_url)
        monkeypatch.setenv("KDCUBE_ASSISTANT_MODEL", "from-env")
        answer = await assistant.run(context({"followups": False}))

    assert answer == "Hello, world."
    assert stub.requests[0].body["model"] == "from-env"
    assert "authorization" not in stub.requests[0].headers


async def test_sse_parsing_skips_comments_and_joins_data_lines() -> None:
    async def lines() -> AsyncIterator[str]:
        for line in [": ping", "", "event: x", "data: a", "data: b", "", "data: c"]:
            yield line

    found = [payload async for payload in assistant.sse_data(lines())]
    assert found == ["a\nb", "c"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('["One?", " Two? ", 3, ""]', ["One?", "Two?"]),
        ('Here you go: ["A?"] hope it helps', ["A?"]),
        ('{"questions": ["A?"]}', ["A?"]),
        ("[not json]", []),
        ('{"a": 1}', []),
        ("", []),
    ],
)
def test_followups_parsing_tolerates_junk(reply: str, expected: list[str]) -> None:
    assert assistant.parse_followups(reply) == expected
