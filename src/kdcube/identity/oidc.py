"""OpenID Connect identity: JWT access tokens checked against the issuer's keys.

A token is accepted when its header names an algorithm from the configured
list that fits the key its ``kid`` points to, its signature verifies, ``iss``
is the configured issuer, it is issued for one of the configured audiences,
and ``exp``/``nbf``/``iat`` hold within the leeway. The user id is ``sub``.

Audience: ``aud`` must name a configured audience. Cognito access tokens carry
no ``aud`` but a ``client_id``, which is then compared instead. Where Cognito's
``token_use`` claim is present it must say ``access`` (or ``id`` for the ID
token), so one kind of token cannot stand in for the other.

User type comes from the roles of the access token (ID-token roles are not
read): the claims named in ``KDCUBE_OIDC_ROLES_CLAIM`` (default
``cognito:groups`` and ``roles``) are merged. A name is looked up as a
top-level claim, or as a dotted path such as Keycloak's ``realm_access.roles``.
A privileged role wins over a paid one; any other authenticated user is
registered.

One issuer per deployment: upstream's trust list of several Cognito pools is
not supported, and neither are revocation checks (a token stays good until it
expires).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jwt

from kdcube.config import ConfigError, Settings
from kdcube.identity.jwks import JwksCache
from kdcube.identity.model import Credentials, Identity, InvalidToken, UserType

TokenKind = Literal["access", "id"]

# Real key ids are short; a longer one is not looked up or echoed back.
_MAX_KID_CHARS = 256


@dataclass(frozen=True, slots=True)
class OidcPolicy:
    """What an OIDC token must satisfy and how its roles map to user types."""

    issuer: str
    audiences: frozenset[str]
    algorithms: frozenset[str]
    leeway_s: float = 60.0
    roles_claims: tuple[str, ...] = ("cognito:groups", "roles")
    privileged_roles: frozenset[str] = frozenset(
        {"kdcube:role:super-admin", "kdcube:role:admin"}
    )
    paid_roles: frozenset[str] = frozenset({"kdcube:role:paid"})

    @classmethod
    def from_settings(cls, settings: Settings) -> OidcPolicy:
        if settings.oidc_issuer is None or not settings.oidc_audience:
            raise ConfigError(
                "KDCUBE_AUTH=oidc needs KDCUBE_OIDC_ISSUER and KDCUBE_OIDC_AUDIENCE"
            )
        return cls(
            issuer=settings.oidc_issuer,
            audiences=frozenset(settings.oidc_audience),
            algorithms=frozenset(settings.oidc_algorithms),
            leeway_s=settings.oidc_leeway_s,
            roles_claims=settings.oidc_roles_claim,
            privileged_roles=frozenset(settings.oidc_privileged_roles),
            paid_roles=frozenset(settings.oidc_paid_roles),
        )


class OidcAuthenticator:
    """Identifies callers by OIDC tokens; no token means anonymous.

    Raises InvalidToken (401) for a token that fails any check, and
    IdentityUnavailable (503) when the issuer's keys cannot be fetched to
    check it. Refusing anonymous callers is left to ``RequireToken``.
    """

    def __init__(self, policy: OidcPolicy, keys: JwksCache) -> None:
        self._policy = policy
        self._keys = keys

    async def identify(self, credentials: Credentials) -> Identity:
        if credentials.token is None:
            if credentials.id_token is not None:
                raise InvalidToken("an ID token needs an access token beside it")
            return Identity(f"anonymous:{credentials.fingerprint}", UserType.ANONYMOUS)

        claims = await self.verify(credentials.token, kind="access")
        if credentials.id_token is not None:
            await self._check_id_token(credentials.id_token, claims)
        return Identity(claims["sub"], self.user_type(claims))

    async def verify(self, token: str, *, kind: TokenKind = "access") -> dict[str, Any]:
        """The claims of a token that passes every check; ``kind`` is access or id."""
        alg, kid = self._header(token, kind)
        key = await self._keys.signing_key(kid)
        if not key.fits(alg):
            raise InvalidToken(
                f"the {kind} token's algorithm {alg} does not fit key {kid!r}"
            )

        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                issuer=self._policy.issuer,
                leeway=self._policy.leeway_s,
                options={"require": ["exp", "iss", "sub"], "verify_aud": False},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"the {kind} token is not valid: {exc}") from None

        self._check_audience(claims, kind)
        self._check_use(claims, kind)
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise InvalidToken(f"the {kind} token has no subject")
        return claims

    def user_type(self, claims: dict[str, Any]) -> UserType:
        roles = _roles(claims, self._policy.roles_claims)
        if roles & self._policy.privileged_roles:
            return UserType.PRIVILEGED
        if roles & self._policy.paid_roles:
            return UserType.PAID
        return UserType.REGISTERED

    def _header(self, token: str, kind: TokenKind) -> tuple[str, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"the {kind} token is not a JWT: {exc}") from None

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._policy.algorithms:
            raise InvalidToken(
                f"the {kind} token's algorithm {alg!r} is not accepted; this server"
                f" takes {', '.join(sorted(self._policy.algorithms))}"
            )
        kid = header.get("kid")
        if isinstance(kid, str) and len(kid) > _MAX_KID_CHARS:
            raise InvalidToken(
                f"the {kind} token's kid is longer than {_MAX_KID_CHARS}"
            )
        if not isinstance(kid, str) or not kid:
            # Issuers that rotate keys always name them; a token without a kid
            # is refused rather than tried against every key.
            raise InvalidToken(f"the {kind} token's header has no kid")
        return alg, kid

    def _check_audience(self, claims: dict[str, Any], kind: TokenKind) -> None:
        aud = claims.get("aud", claims.get("client_id"))
        presented = [aud] if isinstance(aud, str) else aud
        if not isinstance(presented, list) or not any(
            isinstance(name, str) and name in self._policy.audiences
            for name in presented
        ):
            raise InvalidToken(f"the {kind} token is not issued for this server")

    def _check_use(self, claims: dict[str, Any], kind: TokenKind) -> None:
        use = claims.get("token_use")
        if use is not None and use != kind:
            raise InvalidToken(f"a token with token_use={use!r} is not an {kind} token")

    async def _check_id_token(self, id_token: str, access: dict[str, Any]) -> None:
        claims = await self.verify(id_token, kind="id")
        if claims["sub"] != access["sub"] or claims["iss"] != access["iss"]:
            raise InvalidToken("the ID token and the access token name different users")


def _roles(claims: dict[str, Any], names: tuple[str, ...]) -> set[str]:
    roles: set[str] = set()
    for name in names:
        value = _claim(claims, name)
        if isinstance(value, str):
            roles.add(value)
        elif isinstance(value, list):
            roles.update(role for role in value if isinstance(role, str))
    return roles


def _claim(claims: dict[str, Any], name: str) -> Any:
    """A top-level claim, else a dotted path into nested objects."""
    if name in claims:
        return claims[name]

    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
