"""OIDC identity against a real local issuer (tests/oidc_issuer.py).

Token times are fixed offsets from the wall clock, far from the leeway edges;
the key cache runs on a manual clock so TTL and cooldown need no sleeping.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from kdcube.config import ConfigError, Settings, load_settings
from kdcube.identity import (
    AnonymousRefused,
    Credentials,
    IdentityUnavailable,
    InvalidToken,
    JwksCache,
    OidcAuthenticator,
    OidcPolicy,
    TokenCookies,
    UserType,
    extract_credentials,
    open_authenticator,
    open_oidc_authenticator,
)
from tests.oidc_issuer import AUDIENCE, Issuer, Key, open_issuer

pytestmark = pytest.mark.anyio

LEEWAY_S = 30
COOLDOWN_S = 30
TTL_S = 3600


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module", name="rsa_key")
def _rsa_key() -> Key:
    return Key.rsa()


@pytest.fixture(scope="module", name="rsa_key_2")
def _rsa_key_2() -> Key:
    return Key.rsa()


@pytest.fixture(scope="module", name="ec_key")
def _ec_key() -> Key:
    return Key.ec()


def oidc_settings(issuer_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "auth": "oidc",
        "oidc_issuer": issuer_url,
        "oidc_audience": AUDIENCE,
        "oidc_leeway_s": LEEWAY_S,
        "oidc_jwks_cooldown_s": COOLDOWN_S,
        "oidc_jwks_ttl_s": TTL_S,
        "oidc_fetch_timeout_s": 2,
    }
    return load_settings(**{**values, **overrides})


@asynccontextmanager
async def oidc(
    issuer: Issuer, *, clock: Clock | None = None, **overrides: Any
) -> AsyncIterator[OidcAuthenticator]:
    settings = oidc_settings(issuer.url, **overrides)
    async with open_oidc_authenticator(settings, clock=clock or Clock()) as auth:
        yield auth


def bearer(token: str | None, id_token: str | None = None) -> Credentials:
    return Credentials(token, "fingerprint", id_token)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """A JWT signed with HMAC-SHA256 over ``secret`` (or unsigned if empty)."""
    signing_input = (
        f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    )
    if not secret:
        return f"{signing_input}."
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def claims_for(issuer: Issuer) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": issuer.url,
        "aud": AUDIENCE,
        "sub": "mallory",
        "iat": now,
        "exp": now + 300,
    }


# -- valid tokens and user types ---------------------------------------------


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({}, UserType.REGISTERED),
        ({"cognito:groups": ["some-team"]}, UserType.REGISTERED),
        ({"cognito:groups": ["kdcube:role:paid"]}, UserType.PAID),
        ({"roles": ["kdcube:role:paid"]}, UserType.PAID),
        ({"cognito:groups": ["kdcube:role:admin"]}, UserType.PRIVILEGED),
        (
            {
                "cognito:groups": ["kdcube:role:paid"],
                "roles": "kdcube:role:super-admin",
            },
            UserType.PRIVILEGED,
        ),
    ],
)
async def test_roles_map_to_user_types(
    rsa_key: Key, claims: dict[str, Any], expected: UserType
) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        identity = await auth.identify(
            bearer(issuer.sign(rsa_key, sub="u-1", **claims))
        )

    assert (identity.user_id, identity.user_type) == ("u-1", expected)


async def test_no_token_is_anonymous(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        identity = await auth.identify(bearer(None))

    assert identity.user_type is UserType.ANONYMOUS
    assert identity.user_id == "anonymous:fingerprint"


async def test_ec_keys_and_configured_role_names(ec_key: Key) -> None:
    roles: dict[str, Any] = {
        "oidc_roles_claim": "realm_access.roles",
        "oidc_paid_roles": "customer,subscriber",
    }
    async with open_issuer(ec_key) as issuer, oidc(issuer, **roles) as auth:
        token = issuer.sign(ec_key, realm_access={"roles": ["subscriber"]})
        identity = await auth.identify(bearer(token))

    assert identity.user_type is UserType.PAID


async def test_cognito_access_token_audience_is_its_client_id(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        claims = claims_for(issuer)
        del claims["aud"]
        token = issuer.sign(
            rsa_key, **{**claims, "client_id": AUDIENCE, "token_use": "access"}
        )
        identity = await auth.identify(bearer(token))
        id_token_as_access = issuer.sign(rsa_key, token_use="id")
        with pytest.raises(InvalidToken, match="token_use"):
            await auth.identify(bearer(id_token_as_access))

    assert identity.user_id == "mallory"


async def test_configured_jwks_url_skips_discovery(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer:
        jwks_url = f"{issuer.url}/jwks.json"
        async with oidc(issuer, oidc_jwks_url=jwks_url) as auth:
            identity = await auth.identify(bearer(issuer.sign(rsa_key)))

    assert identity.user_id == "alice"


# -- time claims ---------------------------------------------------------------


async def test_expired_beyond_leeway_is_refused(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        token = issuer.sign(rsa_key, age_s=300 + LEEWAY_S + 60, lifetime_s=300)
        with pytest.raises(InvalidToken, match="expired"):
            await auth.identify(bearer(token))


async def test_expired_within_leeway_is_accepted(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        token = issuer.sign(rsa_key, age_s=300 + LEEWAY_S / 3, lifetime_s=300)
        identity = await auth.identify(bearer(token))

    assert identity.user_id == "alice"


async def test_not_yet_valid_is_refused(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        token = issuer.sign(rsa_key, nbf=int(time.time()) + LEEWAY_S + 120)
        with pytest.raises(InvalidToken, match="not yet valid"):
            await auth.identify(bearer(token))


# -- claims and signatures -----------------------------------------------------


async def test_wrong_issuer_is_refused(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        token = issuer.sign(rsa_key, iss="https://issuer.example")
        with pytest.raises(InvalidToken, match="issuer"):
            await auth.identify(bearer(token))


async def test_wrong_audience_is_refused(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        token = issuer.sign(rsa_key, aud=["another-app"])
        with pytest.raises(InvalidToken, match="not issued for this server"):
            await auth.identify(bearer(token))


async def test_bad_signature_is_refused(rsa_key: Key, rsa_key_2: Key) -> None:
    async with open_issuer(rsa_key, rsa_key_2) as issuer, oidc(issuer) as auth:
        token = issuer.sign(rsa_key_2, header={"kid": rsa_key.kid})
        with pytest.raises(InvalidToken, match="Signature verification failed"):
            await auth.identify(bearer(token))


async def test_algorithm_that_does_not_fit_the_key_is_refused(
    rsa_key: Key, ec_key: Key
) -> None:
    async with open_issuer(rsa_key, ec_key) as issuer, oidc(issuer) as auth:
        token = issuer.sign(ec_key, header={"kid": rsa_key.kid})
        with pytest.raises(InvalidToken, match="does not fit"):
            await auth.identify(bearer(token))


async def test_token_without_kid_is_refused(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        header, payload, signature = issuer.sign(rsa_key).split(".")
        unnamed = _b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
        with pytest.raises(InvalidToken, match="no kid"):
            await auth.identify(bearer(f"{unnamed}.{payload}.{signature}"))


async def test_alg_none_is_refused(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        header = {"alg": "none", "typ": "JWT", "kid": rsa_key.kid}
        token = forged(header, claims_for(issuer), b"")
        with pytest.raises(InvalidToken, match="'none' is not accepted"):
            await auth.identify(bearer(token))


async def test_hs256_signed_with_the_public_key_is_refused(rsa_key: Key) -> None:
    public_pem = rsa_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    async with open_issuer(rsa_key) as issuer:
        header = {"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}
        token = forged(header, claims_for(issuer), public_pem)
        async with oidc(issuer) as auth:
            with pytest.raises(InvalidToken, match="'HS256' is not accepted"):
                await auth.identify(bearer(token))

        # Even a policy that skipped the settings' check never lets an RSA
        # key verify an HMAC.
        careless = OidcPolicy(
            issuer.url, frozenset({AUDIENCE}), frozenset({"RS256", "HS256"})
        )
        async with httpx.AsyncClient() as client:
            auth = OidcAuthenticator(careless, JwksCache(client, issuer=issuer.url))
            with pytest.raises(InvalidToken, match="does not fit"):
                await auth.identify(bearer(token))


def test_settings_refuse_symmetric_and_none_algorithms() -> None:
    for algorithms in ("HS256", "RS256,none"):
        with pytest.raises(ConfigError, match="KDCUBE_OIDC_ALGORITHMS"):
            oidc_settings("https://issuer.example", oidc_algorithms=algorithms)


def test_oidc_needs_issuer_and_audience() -> None:
    with pytest.raises(ConfigError, match="KDCUBE_OIDC_ISSUER"):
        load_settings(auth="oidc", oidc_audience=AUDIENCE)
    with pytest.raises(ConfigError, match="KDCUBE_OIDC_AUDIENCE"):
        load_settings(auth="oidc", oidc_issuer="https://issuer.example")
    with pytest.raises(ConfigError, match="KDCUBE_OIDC_ISSUER"):
        oidc_settings("http://issuer.example")


# -- ID tokens -------------------------------------------------------------------


async def test_id_token_must_name_the_same_user(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        access = issuer.sign(rsa_key, sub="alice")
        same = await auth.identify(bearer(access, issuer.sign(rsa_key, sub="alice")))
        with pytest.raises(InvalidToken, match="different users"):
            await auth.identify(bearer(access, issuer.sign(rsa_key, sub="bob")))
        with pytest.raises(InvalidToken, match="id token"):
            await auth.identify(bearer(access, issuer.sign(rsa_key, aud="another-app")))

    assert same.user_id == "alice"


# -- key rotation, flooding and outages ------------------------------------------


async def test_unknown_kid_refetches_once_after_rotation(
    rsa_key: Key, rsa_key_2: Key
) -> None:
    async with open_issuer(rsa_key) as issuer, oidc(issuer) as auth:
        await auth.identify(bearer(issuer.sign(rsa_key)))
        assert issuer.jwks_fetches == 1

        issuer.keys = [rsa_key_2]
        identity = await auth.identify(bearer(issuer.sign(rsa_key_2, sub="bob")))
        assert (identity.user_id, issuer.jwks_fetches) == ("bob", 2)

        # The withdrawn key is gone from the cache; within the cooldown it
        # is refused without asking the issuer again.
        with pytest.raises(InvalidToken, match="not one of the issuer's keys"):
            await auth.identify(bearer(issuer.sign(rsa_key)))
        assert issuer.jwks_fetches == 2


async def test_flood_of_unknown_kids_fetches_once_per_cooldown(rsa_key: Key) -> None:
    clock = Clock()
    refused = 0

    async def bogus(number: int) -> None:
        nonlocal refused
        token = issuer.sign(rsa_key, header={"kid": f"bogus-{number}"})
        with pytest.raises(InvalidToken):
            await auth.identify(bearer(token))
        refused += 1

    async with open_issuer(rsa_key) as issuer, oidc(issuer, clock=clock) as auth:
        async with anyio.create_task_group() as tasks:
            for number in range(40):
                tasks.start_soon(bogus, number)
        assert (refused, issuer.jwks_fetches) == (40, 2)  # start-up + one refetch

        clock.advance(COOLDOWN_S + 1)
        await bogus(41)
        await bogus(42)
        assert issuer.jwks_fetches == 3


async def test_keys_are_refetched_after_their_ttl(rsa_key: Key) -> None:
    clock = Clock()
    async with open_issuer(rsa_key) as issuer, oidc(issuer, clock=clock) as auth:
        await auth.identify(bearer(issuer.sign(rsa_key)))
        clock.advance(TTL_S - 1)
        await auth.identify(bearer(issuer.sign(rsa_key)))
        assert issuer.jwks_fetches == 1

        clock.advance(2)
        await auth.identify(bearer(issuer.sign(rsa_key)))
        assert issuer.jwks_fetches == 2


async def test_issuer_down_is_unavailable_not_invalid(rsa_key: Key) -> None:
    clock = Clock()
    async with open_issuer(rsa_key) as issuer:
        issuer.available = False
        async with oidc(issuer, clock=clock) as auth:
            token = issuer.sign(rsa_key)
            with pytest.raises(IdentityUnavailable):
                await auth.identify(bearer(token))

            issuer.available = True
            with pytest.raises(IdentityUnavailable):
                await auth.identify(bearer(token))  # still cooling down

            clock.advance(COOLDOWN_S + 1)
            identity = await auth.identify(bearer(token))

    assert identity.user_id == "alice"


async def test_known_keys_outlive_their_ttl_while_the_issuer_is_down(
    rsa_key: Key, rsa_key_2: Key
) -> None:
    clock = Clock()
    async with open_issuer(rsa_key) as issuer, oidc(issuer, clock=clock) as auth:
        issuer.available = False
        clock.advance(TTL_S + 1)
        identity = await auth.identify(bearer(issuer.sign(rsa_key)))

        with pytest.raises(IdentityUnavailable):
            await auth.identify(bearer(issuer.sign(rsa_key_2)))

    assert identity.user_id == "alice"


async def test_unreachable_issuer_at_start_up_does_not_crash(rsa_key: Key) -> None:
    async with open_issuer(rsa_key) as issuer:
        gone = issuer
    token = gone.sign(rsa_key)

    async with open_authenticator(oidc_settings(gone.url)) as auth:
        with pytest.raises(IdentityUnavailable):
            await auth.identify(bearer(token))


# -- anonymous callers and where tokens come from ----------------------------------


@pytest.mark.parametrize("auth_mode", ["dev", "oidc"])
async def test_anonymous_refused_when_configured(rsa_key: Key, auth_mode: str) -> None:
    async with open_issuer(rsa_key) as issuer:
        settings = oidc_settings(issuer.url, auth=auth_mode, allow_anonymous=False)
        async with open_authenticator(settings) as auth:
            with pytest.raises(AnonymousRefused):
                await auth.identify(bearer(None))
            token = "dev-alice" if auth_mode == "dev" else issuer.sign(rsa_key)
            identity = await auth.identify(bearer(token))

    assert issubclass(AnonymousRefused, InvalidToken)
    assert identity.user_id == "alice"


def extract(
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
    names: TokenCookies | None = None,
) -> Credentials:
    return extract_credentials(
        headers=headers or {},
        query=query or {},
        cookies=cookies or {},
        remote_addr="10.0.0.1",
        cookie_names=names or TokenCookies(),
    )


def test_token_precedence_is_header_then_query_then_cookie() -> None:
    header = {"Authorization": "Bearer h", "X-ID-Token": "hi"}
    query = {"bearer_token": "q", "id_token": "qi"}
    cookies = {"__Secure-LATC": "c", "__Secure-LITC": "ci"}

    from_header = extract(header, query, cookies)
    from_query = extract({}, query, cookies)
    from_cookie = extract({}, {}, cookies)

    assert (from_header.token, from_header.id_token) == ("h", "hi")
    assert (from_query.token, from_query.id_token) == ("q", "qi")
    assert (from_cookie.token, from_cookie.id_token) == ("c", "ci")


def test_id_token_comes_from_the_access_tokens_place() -> None:
    paired = extract({"Authorization": "Bearer h"}, {}, {"__Secure-LITC": "ci"})
    lone = extract({}, {"id_token": "qi"}, {"__Secure-LITC": "ci"})

    assert (paired.token, paired.id_token) == ("h", None)
    assert (lone.token, lone.id_token) == (None, None)


def test_cookie_names_are_configurable() -> None:
    names = TokenCookies(access="edge_at", id="edge_it")
    found = extract(cookies={"edge_at": "c", "edge_it": "ci"}, names=names)
    settings = load_settings(access_token_cookie="edge_at", id_token_cookie="edge_it")

    assert (found.token, found.id_token) == ("c", "ci")
    assert TokenCookies.from_settings(settings) == names


def test_malformed_authorization_header_is_invalid() -> None:
    for value in ("Basic abc", "Bearer ", "token"):
        with pytest.raises(InvalidToken, match="Bearer <token>"):
            extract({"Authorization": value}, {"bearer_token": "q"})


def test_empty_values_count_as_absent() -> None:
    found = extract({}, {"bearer_token": ""}, {"__Secure-LATC": "c"})

    assert found.token == "c"
    assert found.fingerprint == Credentials.fingerprint_of("10.0.0.1", "")
