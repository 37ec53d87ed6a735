"""The chat submission body of ``POST /sse/chat``, validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdcube.wire.errors import bad_request

PROMPT_TYPES = frozenset(
    {"event.user.prompt", "event.user.followup", "event.user.steer"}
)


class _PromptEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    mime: str = "text/plain"
    event: _PromptEvent


class ExternalEvent(BaseModel):
    # Upstream clients send more fields than we use; they are accepted and ignored.
    model_config = ConfigDict(extra="ignore")

    event_id: str | None = None
    type: str
    event_source_id: str | None = None
    reactive: bool = True
    payload: _Payload


class Submission(BaseModel):
    model_config = ConfigDict(extra="ignore")

    conversation_id: str | None = Field(None, min_length=1)
    bundle_id: str | None = Field(None, min_length=1)
    tenant: str | None = None
    project: str | None = None
    message_kind: Literal["regular", "followup", "steer"] = "regular"
    external_events: list[ExternalEvent] = Field(default_factory=list)

    def prompt(self) -> str:
        return "\n\n".join(e.payload.event.text for e in self.external_events)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_submission(document: Any) -> Submission:
    """Validate a decoded JSON body, or raise the matching 400 ApiError."""
    if not isinstance(document, dict):
        raise bad_request("invalid_request", "The body must be a JSON object.")
    if not document.get("external_events"):
        raise bad_request(
            "missing_external_events", "external_events must hold at least one event."
        )
    try:
        submission = Submission.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise bad_request("invalid_request", f"{where}: {first['msg']}") from None

    for event in submission.external_events:
        if event.type not in PROMPT_TYPES:
            raise bad_request(
                "unsupported_event",
                f"Event type {event.type!r} is not accepted; send one of "
                f"{', '.join(sorted(PROMPT_TYPES))}.",
            )
        if "\x00" in event.payload.event.text:
            # Postgres text cannot hold NUL, and no prompt needs one.
            raise bad_request("invalid_request", "The prompt contains a NUL character.")
        if not _encodable(event.payload.event.text):
            # JSON can escape lone surrogates ("\ud800"), which no database
            # or UTF-8 stream can carry.
            raise bad_request(
                "invalid_request", "The prompt is not valid Unicode text."
            )
        if not event.reactive:
            # Events recorded for a later turn without waking one need a
            # per-conversation event lane, which this version does not have.
            raise bad_request(
                "unsupported_event",
                "Non-reactive events are not accepted by this server.",
            )
    return submission


@dataclass(frozen=True, slots=True)
class CheckedSubmission:
    """A submission the ingress has checked against its limits and registry."""

    submission: Submission
    prompt: str
    bundle_id: str
    requested_conversation: str | None
    """The conversation the client named; None when a new one is created."""
    conversation_id: str
