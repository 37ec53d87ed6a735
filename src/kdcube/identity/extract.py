"""Finding the tokens a request carries, from plain header, query and cookie values.

The access token comes from the first place that has one: the
``Authorization: Bearer`` header, the ``bearer_token`` query parameter (an
EventSource cannot set headers), then the access cookie. The ID token is taken
from the same place only (``X-ID-Token``, ``id_token``, the ID cookie), so a
header token is never paired with a cookie some other login left behind. An
ID token with no access token beside it is ignored.

The cookies are the ones a login proxy unmasks at the edge (ProxyLogin turns
its masquerade cookie into ``__Secure-LATC`` and ``__Secure-LITC``); their
tokens are checked exactly like header tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kdcube.config import Settings
from kdcube.identity.model import Credentials, InvalidToken

ACCESS_COOKIE = "__Secure-LATC"
ID_COOKIE = "__Secure-LITC"


class Lookup(Protocol):
    """Anything with ``get``: a dict, or a request's headers, args or cookies."""

    def get(self, key: str, /) -> str | None: ...


@dataclass(frozen=True, slots=True)
class TokenCookies:
    access: str = ACCESS_COOKIE
    id: str = ID_COOKIE

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenCookies:
        return cls(settings.access_token_cookie, settings.id_token_cookie)


DEFAULT_COOKIES = TokenCookies()


def extract_credentials(
    *,
    headers: Lookup,
    query: Lookup,
    cookies: Lookup,
    remote_addr: str | None,
    cookie_names: TokenCookies = DEFAULT_COOKIES,
) -> Credentials:
    """The request's tokens and fingerprint.

    ``headers`` must look names up case-insensitively, as request headers do;
    a plain dict works when its keys are spelled as below. Raises InvalidToken
    for an Authorization header that is not ``Bearer <token>``.
    """
    fingerprint = Credentials.fingerprint_of(
        remote_addr or "", headers.get("User-Agent") or ""
    )
    authorization = headers.get("Authorization")
    if authorization is not None:
        id_token = _present(headers.get("X-ID-Token"))
        return Credentials(_bearer(authorization), fingerprint, id_token)

    token = _present(query.get("bearer_token"))
    if token is not None:
        return Credentials(token, fingerprint, _present(query.get("id_token")))

    token = _present(cookies.get(cookie_names.access))
    if token is not None:
        return Credentials(token, fingerprint, _present(cookies.get(cookie_names.id)))

    # A lone ID token proves nothing about access, so the caller is anonymous.
    return Credentials(None, fingerprint)


def _bearer(header: str) -> str:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise InvalidToken("Authorization must be 'Bearer <token>'.")
    return value.strip()


def _present(value: str | None) -> str | None:
    """An empty parameter or cookie counts as absent."""
    if value is None:
        return None
    return value.strip() or None
