"""Reading what a request carries: identity, ids, bodies."""

from __future__ import annotations

import json
from typing import Any

from quart import Request

from kdcube.identity import Credentials, Identity, InvalidToken
from kdcube.identity.model import Authenticator
from kdcube.wire.errors import ApiError, bad_request
from kdcube.wire.ids import is_client_id

TOKEN_COOKIE = "__Secure-LATC"
_JSON_TYPES = ("application/json", "text/json")


def credentials(request: Request) -> Credentials:
    """The token by precedence: header, ``bearer_token`` query, then cookie."""
    header = request.headers.get("Authorization")
    token: str | None
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(
                401, "invalid_token", "Authorization must be 'Bearer <token>'."
            )
        token = value.strip()
    else:
        token = request.args.get("bearer_token") or request.cookies.get(TOKEN_COOKIE)

    fingerprint = Credentials.fingerprint_of(
        request.remote_addr or "", request.headers.get("User-Agent", "")
    )
    return Credentials(token, fingerprint)


async def identify(request: Request, authenticator: Authenticator) -> Identity:
    try:
        return await authenticator.identify(credentials(request))
    except InvalidToken as exc:
        raise ApiError(401, "invalid_token", str(exc)) from None


def client_id(value: str | None, name: str, *, required: bool) -> str | None:
    if value is None or value == "":
        if required:
            raise bad_request(f"missing_{name}", f"The {name} parameter is required.")
        return None
    if not is_client_id(value):
        raise bad_request(
            f"invalid_{name}",
            f"{name} must be 1-128 letters, digits or _.:- starting with a letter or digit.",
        )
    return value


async def json_body(request: Request) -> Any:
    if request.mimetype not in _JSON_TYPES:
        raise ApiError(
            415, "unsupported_media_type", "Send the body as application/json."
        )
    return parse_json(await request.get_data(as_text=False))


def parse_json(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("bad_json", "The body is not valid JSON.") from None


async def submission_body(request: Request) -> Any:
    """The chat submission from a JSON body or a multipart ``event_submission``."""
    if request.mimetype != "multipart/form-data":
        return await json_body(request)

    form = await request.form
    files = await request.files
    if any(True for _ in files.items(multi=True) if _[0] != "event_submission"):
        # Attachments need the scanning and storage path of the upload
        # pipeline, which this version does not have yet.
        raise bad_request(
            "attachment_rejected", "This server does not accept attachments yet."
        )
    if "event_submission" in form:
        return parse_json(form["event_submission"])
    if "event_submission" in files:
        return parse_json(files["event_submission"].read())
    raise bad_request(
        "missing_external_events", "The multipart body has no event_submission part."
    )


def last_event_id(request: Request) -> str | None:
    return (
        request.headers.get("Last-Event-ID")
        or request.args.get("last_event_id")
        or None
    )
