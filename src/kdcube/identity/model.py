"""Identities and the credentials a request carries."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class UserType(StrEnum):
    ANONYMOUS = "anonymous"
    REGISTERED = "registered"
    PAID = "paid"
    PRIVILEGED = "privileged"


class InvalidToken(Exception):
    """A token was presented and is not valid; the request gets 401."""


class AnonymousRefused(InvalidToken):
    """No token was presented where anonymous callers are not allowed (401)."""


class IdentityUnavailable(Exception):
    """A token could not be checked because the issuer's keys are out of reach.

    The caller is not at fault, so this is not a 401: the ingress answers 503
    ``dependency_unavailable`` and the client may retry.
    """


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    user_type: UserType

    @property
    def session_key(self) -> str:
        return f"{self.user_type.value}:{self.user_id}"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request offers to prove who it is.

    ``token`` is the access token: the first one found in the header, the
    ``bearer_token`` query parameter, then the cookie. ``id_token`` is the
    OpenID ID token taken from the same place as the access token, if any.
    ``fingerprint`` tells anonymous callers apart.
    """

    token: str | None
    fingerprint: str
    id_token: str | None = None

    @staticmethod
    def fingerprint_of(remote_addr: str, user_agent: str) -> str:
        digest = hashlib.sha256(f"{remote_addr}:{user_agent}".encode())
        return digest.hexdigest()[:16]


class Authenticator(Protocol):
    async def identify(self, credentials: Credentials) -> Identity:
        """Raises InvalidToken for a token that is presented but not valid."""
