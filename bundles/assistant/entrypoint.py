"""Assistant: answers from any OpenAI-compatible chat-completions endpoint, streamed.

Each turn POSTs the prompt to ``{base_url}/chat/completions`` with
``stream: true`` and forwards the answer as it arrives: ``delta.content``
becomes ``answer`` deltas, ``delta.reasoning_content`` (or ``delta.reasoning``)
becomes ``thinking`` deltas. Text attachments are quoted into the prompt; other
files are listed by name. After the answer, one more (non-streamed) call asks
for three follow-up questions.

Config (``bundles.yaml``), all optional except the endpoint and the model:

- ``base_url``: the API root, e.g. ``https://api.openai.com/v1``; falls back to
  the environment variable ``KDCUBE_ASSISTANT_BASE_URL``.
- ``model``: the model name sent upstream; falls back to
  ``KDCUBE_ASSISTANT_MODEL``.
- ``api_key_env``: the name of the environment variable that holds the API key
  (default ``OPENAI_API_KEY``). When it is unset, no ``Authorization`` header is
  sent (local servers such as Ollama or vLLM need none).
- ``system_prompt``: sent as the first message when set.
- ``temperature``, ``max_tokens``: passed upstream when set.
- ``timeout_s``: seconds to wait for the connection and for each piece of the
  stream (default 60). The platform's idle and wall timeouts bound the turn.
- ``stream_usage``: ask for token counts in the stream (``stream_options``;
  default false, since not every compatible server accepts it).
- ``followups``: suggest follow-up questions after the answer (default true).

A failure upstream (an error status, a malformed stream, a timeout, a refused
connection) raises ``AssistantError`` with a short message that never contains
the API key; the platform ends the turn with ``bundle_error``.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterator,
    Mapping,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from kdcube.sdk import Attachment, TurnContext

# A rerun would ask the model (and bill the key) a second time.
RERUN_SAFE = False

DEFAULT_TIMEOUT_S = 60.0
ATTACHMENT_BYTES = 24_000
"""How much of each text attachment is quoted into the prompt."""
ATTACHMENTS_TOTAL_BYTES = 96_000
"""How much attachment text one prompt carries at most; later files are listed."""
PROVIDER_MESSAGE_CHARS = 200
FOLLOWUPS_WANTED = 3
FOLLOWUP_CHARS = 200
FOLLOWUPS_REQUEST = (
    "Suggest 3 short follow-up questions the user might ask next about this "
    "conversation. Reply with only a JSON array of 3 strings, nothing else."
)
_TEXT_TYPES = ("text/", "application/json")
_N = TypeVar("_N", int, float)


class AssistantError(Exception):
    """The assistant could not answer; the message is safe to show and log."""


class ConfigError(AssistantError):
    """The bundle's config is missing or has a bad value."""


class UpstreamError(AssistantError):
    """The model endpoint failed, refused or sent something unreadable."""


@dataclass(frozen=True, slots=True)
class Settings:
    """The bundle's config, read once per turn; ``repr`` leaves out the key."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    system_prompt: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    stream_usage: bool = False
    followups: bool = True

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/chat/completions"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def redact(self, text: str) -> str:
        """``text`` without the API key, which providers sometimes echo back."""
        return text.replace(self.api_key, "***") if self.api_key else text


@dataclass(slots=True)
class Outcome:
    """What the stream delivered besides the deltas."""

    answer: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        tokens = {
            key: value
            for key, value in self.usage.items()
            if key.endswith("_tokens") and isinstance(value, int)
        }
        return {"finish_reason": self.finish_reason, **tokens}


async def run(ctx: TurnContext) -> str:
    settings = read_settings(ctx.config, os.environ)
    messages = await opening_messages(ctx, settings)
    timeout = httpx.Timeout(settings.timeout_s)
    async with httpx.AsyncClient(timeout=timeout) as client:
        await ctx.step("model", status="running", title=f"Asking {settings.model}")
        try:
            outcome = await stream_answer(client, settings, messages, ctx)
        except AssistantError:
            # The details go to the operator's log with the exception; the
            # platform shows users no bundle error text, and neither do we.
            await ctx.step("model", status="failed", title=f"{settings.model} failed")
            raise

        await ctx.step("model", status="completed", data=outcome.summary())
        answer = "".join(outcome.answer)
        if settings.followups and answer:
            suggestions = await suggest_followups(client, settings, messages, answer)
            if suggestions:
                await ctx.followups(suggestions)
    return answer


# -- settings ----------------------------------------------------------------


def read_settings(config: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    base_url = _text(config, "base_url") or environ.get("KDCUBE_ASSISTANT_BASE_URL")
    model = _text(config, "model") or environ.get("KDCUBE_ASSISTANT_MODEL")
    if not base_url:
        raise ConfigError(
            "The assistant has no model endpoint: set base_url in its bundle "
            "config or KDCUBE_ASSISTANT_BASE_URL."
        )
    if not model:
        raise ConfigError(
            "The assistant has no model: set model in its bundle config or "
            "KDCUBE_ASSISTANT_MODEL."
        )

    key_variable = _text(config, "api_key_env") or "OPENAI_API_KEY"
    return Settings(
        base_url=base_url.rstrip("/"),
        model=model,
        api_key=environ.get(key_variable) or None,
        system_prompt=_text(config, "system_prompt"),
        temperature=_number(config, "temperature", float),
        max_tokens=_number(config, "max_tokens", int),
        timeout_s=_number(config, "timeout_s", float) or DEFAULT_TIMEOUT_S,
        stream_usage=_flag(config, "stream_usage", default=False),
        followups=_flag(config, "followups", default=True),
    )


def _text(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"The assistant's config {key} must be text, not {value!r}.")
    return value


def _number(
    config: Mapping[str, Any], key: str, kind: Callable[[Any], _N]
) -> _N | None:
    value = config.get(key)
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"The assistant's config {key} must be a number, not {value!r}."
        ) from None
    if number < 0:
        raise ConfigError(f"The assistant's config {key} must not be negative.")
    return number


def _flag(config: Mapping[str, Any], key: str, *, default: bool) -> bool:
    value = config.get(key, default)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


# -- the prompt --------------------------------------------------------------


async def opening_messages(
    ctx: TurnContext, settings: Settings
) -> list[dict[str, str]]:
    messages = []
    if settings.system_prompt:
        messages.append({"role": "system", "content": settings.system_prompt})
    messages.append({"role": "user", "content": await user_content(ctx)})
    return messages


async def user_content(ctx: TurnContext) -> str:
    """The prompt, then each text attachment quoted, then the other files named."""
    parts, unshown = [ctx.prompt], []
    budget = ATTACHMENTS_TOTAL_BYTES
    for attachment in ctx.attachments:
        if not is_text(attachment) or budget <= 0:
            unshown.append(
                f"{attachment.name} ({attachment.mime}, {attachment.size} bytes)"
            )
            continue

        limit = min(ATTACHMENT_BYTES, budget)
        head = await read_head(ctx, attachment.name, limit)
        budget -= len(head)
        parts.append(quote(attachment, head))

    if unshown:
        parts.append("Also attached, not shown here: " + "; ".join(unshown))
    return "\n\n".join(parts)


def is_text(attachment: Attachment) -> bool:
    return attachment.mime.startswith(_TEXT_TYPES)


async def read_head(ctx: TurnContext, name: str, limit: int) -> bytes:
    """At most ``limit`` bytes from the start of an attachment."""
    chunks = ctx.open_attachment(name)
    head = bytearray()
    try:
        async for chunk in chunks:
            head += chunk
            if len(head) >= limit:
                break
    finally:
        # Stopping early must not leave the storage's file open until GC.
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()
    return bytes(head[:limit])


def quote(attachment: Attachment, head: bytes) -> str:
    complete = len(head) >= attachment.size
    # A cut may split a character; final=False drops its dangling bytes.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(head, final=complete)
    lines = [f'--- Attached file "{attachment.name}" ({attachment.mime}) ---', text]
    if not complete:
        lines.append(f"[truncated: the first {len(head)} of {attachment.size} bytes]")
    lines.append(f'--- End of "{attachment.name}" ---')
    return "\n".join(lines)


# -- the streamed answer -----------------------------------------------------


async def stream_answer(
    client: httpx.AsyncClient,
    settings: Settings,
    messages: list[dict[str, str]],
    ctx: TurnContext,
) -> Outcome:
    body = request_body(settings, messages, stream=True)
    outcome = Outcome()
    with upstream_errors(settings):
        async with client.stream(
            "POST", settings.endpoint, json=body, headers=settings.headers()
        ) as response:
            await raise_for_status(response, settings)
            async for payload in sse_data(response.aiter_lines()):
                if payload.strip() == "[DONE]":
                    break
                await forward(parse_chunk(payload, settings), outcome, ctx)
    return outcome


def request_body(
    settings: Settings, messages: list[dict[str, str]], *, stream: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": settings.model,
        "messages": messages,
        "stream": stream,
    }
    if settings.temperature is not None:
        body["temperature"] = settings.temperature
    if settings.max_tokens is not None:
        body["max_tokens"] = settings.max_tokens
    if stream and settings.stream_usage:
        body["stream_options"] = {"include_usage": True}
    return body


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event; comments and other fields are
    skipped, and several ``data`` lines of one event are joined as SSE says."""
    pending: list[str] = []
    async for line in lines:
        if line == "":
            if pending:
                yield "\n".join(pending)
                pending = []
            continue

        name, _, value = line.partition(":")
        if name == "data":
            pending.append(value.removeprefix(" "))

    if pending:
        yield "\n".join(pending)


def parse_chunk(payload: str, settings: Settings) -> dict[str, Any]:
    try:
        chunk = json.loads(payload)
    except ValueError:
        raise UpstreamError("The model endpoint sent a malformed stream.") from None
    if not isinstance(chunk, dict):
        raise UpstreamError("The model endpoint sent a malformed stream.")
    if "error" in chunk:
        # Some providers report a failure mid-stream as a data frame.
        message = settings.redact(provider_message(chunk))
        raise UpstreamError(f"The model endpoint failed mid-answer: {message}")
    return chunk


async def forward(chunk: dict[str, Any], outcome: Outcome, ctx: TurnContext) -> None:
    if isinstance(chunk.get("usage"), dict):
        outcome.usage = chunk["usage"]
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return

    choice = choices[0]
    if isinstance(choice.get("finish_reason"), str):
        outcome.finish_reason = choice["finish_reason"]
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return

    thinking = delta.get("reasoning_content") or delta.get("reasoning")
    if isinstance(thinking, str) and thinking:
        await ctx.delta(thinking, marker="thinking")
    content = delta.get("content")
    if isinstance(content, str) and content:
        outcome.answer.append(content)
        await ctx.delta(content)


# -- upstream failures -------------------------------------------------------


@contextmanager
def upstream_errors(settings: Settings) -> Iterator[None]:
    """httpx's failures as ``UpstreamError``s that name no secret or full URL."""
    host = httpx.URL(settings.base_url).host or "the model endpoint"
    try:
        yield
    except httpx.TimeoutException:
        raise UpstreamError(
            f"The model endpoint at {host} did not answer within "
            f"{settings.timeout_s:g} s."
        ) from None
    except httpx.HTTPError as exc:
        raise UpstreamError(
            f"Could not talk to the model endpoint at {host} ({type(exc).__name__})."
        ) from exc


async def raise_for_status(response: httpx.Response, settings: Settings) -> None:
    if response.status_code < 400:
        return

    await response.aread()
    try:
        message = provider_message(response.json())
    except ValueError:
        message = response.text
    message = settings.redact(" ".join(message.split()))
    raise UpstreamError(
        f"The model endpoint answered {response.status_code}: {trim(message)}"
    )


def provider_message(body: Any) -> str:
    """The ``error.message`` of an OpenAI-style error body, or the body itself."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return json.dumps(body)


def trim(text: str, limit: int = PROVIDER_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- follow-ups --------------------------------------------------------------


async def suggest_followups(
    client: httpx.AsyncClient,
    settings: Settings,
    messages: list[dict[str, str]],
    answer: str,
) -> list[str]:
    """Up to three questions, or none when the model's reply is unusable:
    follow-ups are a nicety, so their failure never fails the turn."""
    conversation = [
        *messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": FOLLOWUPS_REQUEST},
    ]
    body = request_body(settings, conversation, stream=False)
    try:
        with upstream_errors(settings):
            response = await client.post(
                settings.endpoint, json=body, headers=settings.headers()
            )
            await raise_for_status(response, settings)
    except UpstreamError:
        return []
    return parse_followups(reply_text(response))


def reply_text(response: httpx.Response) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def parse_followups(text: str) -> list[str]:
    """The strings of the first JSON array in ``text``; models like to wrap it
    in prose or a code fence."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return []
    try:
        items = json.loads(text[start : end + 1])
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    questions = [item.strip() for item in items if isinstance(item, str)]
    return [trim(q, FOLLOWUP_CHARS) for q in questions if q][:FOLLOWUPS_WANTED]
