"""Reading what a request carries: identity, ids, bodies."""

from __future__ import annotations

import json
from typing import Any

from quart import Request

from kdcube.identity import Credentials, Identity, InvalidToken
from kdcube.identity.extract import (
    ACCESS_COOKIE,
    DEFAULT_COOKIES,
    TokenCookies,
    extract_credentials,
)
from kdcube.identity.model import Authenticator, IdentityUnavailable
from kdcube.wire.errors import ApiError, bad_request
from kdcube.wire.ids import is_client_id

TOKEN_COOKIE = ACCESS_COOKIE
_JSON_TYPES = ("application/json", "text/json")
_IDENTITY_RETRY_S = 5


def credentials(
    request: Request, cookie_names: TokenCookies = DEFAULT_COOKIES
) -> Credentials:
    """The tokens by precedence: header, ``bearer_token`` query, then cookie."""
    try:
        return extract_credentials(
            headers=request.headers,
            query=request.args,
            cookies=request.cookies,
            remote_addr=request.remote_addr,
            cookie_names=cookie_names,
        )
    except InvalidToken as exc:
        raise ApiError(401, "invalid_token", str(exc)) from None


async def identify(
    request: Request,
    authenticator: Authenticator,
    cookie_names: TokenCookies = DEFAULT_COOKIES,
) -> Identity:
    try:
        return await authenticator.identify(credentials(request, cookie_names))
    except InvalidToken as exc:
        raise ApiError(401, "invalid_token", str(exc)) from None
    except IdentityUnavailable as exc:
        raise ApiError(
            503, "dependency_unavailable", str(exc), retry_after=_IDENTITY_RETRY_S
        ) from None


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
    except RecursionError:
        raise bad_request("bad_json", "The body nests JSON too deeply.") from None


def last_event_id(request: Request) -> str | None:
    return (
        request.headers.get("Last-Event-ID")
        or request.args.get("last_event_id")
        or None
    )
