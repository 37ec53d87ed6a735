"""Development identity: the token names the user, no secret involved."""

from __future__ import annotations

import re

from kdcube.identity.model import Credentials, Identity, InvalidToken, UserType

_USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_ADMIN_PREFIX = "dev-admin-"
_USER_PREFIX = "dev-"


class DevAuthenticator:
    """``dev-<user>`` is a registered user, ``dev-admin-<user>`` a privileged one.

    Meant for ``kdcube run`` on a developer's machine: anyone can claim any
    user id, so ``kdcube serve`` refuses it unless it is asked for by name.
    """

    async def identify(self, credentials: Credentials) -> Identity:
        token = credentials.token
        if token is None:
            return Identity(f"anonymous:{credentials.fingerprint}", UserType.ANONYMOUS)
        if token.startswith(_ADMIN_PREFIX):
            return Identity(_user_id(token[len(_ADMIN_PREFIX) :]), UserType.PRIVILEGED)
        if token.startswith(_USER_PREFIX):
            return Identity(_user_id(token[len(_USER_PREFIX) :]), UserType.REGISTERED)
        raise InvalidToken("dev tokens look like dev-<user> or dev-admin-<user>")


def _user_id(candidate: str) -> str:
    if _USER_ID.fullmatch(candidate) is None:
        raise InvalidToken(
            "a dev user id is 1-64 letters, digits or _.@- and starts with a "
            f"letter or digit, got {candidate!r}"
        )
    return candidate
