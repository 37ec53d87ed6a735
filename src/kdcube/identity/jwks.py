"""The issuer's public signing keys, fetched over HTTP and cached by key id.

Keys come from the configured JWKS URL, or from the ``jwks_uri`` of the
issuer's OpenID discovery document. They are kept for a TTL; a key id that is
not in the cache triggers a refetch, because that is how an issuer's key
rotation shows up. Fetches are serialized and at most one starts per
cooldown, so a flood of tokens with made-up key ids costs the issuer one
request per cooldown, not one per token.

When a fetch fails the keys already held stay in use, past their TTL if need
be, rather than turning every caller away while the issuer is down. A key the
issuer has withdrawn therefore stays trusted until the next successful fetch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from kdcube.config import is_secure_url
from kdcube.identity.model import IdentityUnavailable, InvalidToken

log = structlog.get_logger("kdcube.identity")

PublicKey = (
    rsa.RSAPublicKey
    | ec.EllipticCurvePublicKey
    | ed25519.Ed25519PublicKey
    | ed448.Ed448PublicKey
)

_DISCOVERY_PATH = "/.well-known/openid-configuration"
_MAX_DOCUMENT_BYTES = 1_048_576
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    key: PublicKey
    declared_alg: str | None

    def fits(self, alg: str) -> bool:
        """Whether a token signed with ``alg`` can have been signed by this key.

        Checked before verifying, so a token cannot choose an algorithm the
        key was never meant for.
        """
        if self.declared_alg is not None and self.declared_alg != alg:
            return False
        if isinstance(self.key, rsa.RSAPublicKey):
            return alg in _RSA_ALGORITHMS
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            curve = _EC_CURVES.get(alg)
            return curve is not None and isinstance(self.key.curve, curve)
        return alg == "EdDSA"


class JwksCache:
    """Signing keys by ``kid``; see the module docstring for the refresh rules.

    ``client`` is owned by the caller. ``timeout_s`` bounds one whole refresh
    (discovery plus JWKS), not just each read.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        issuer: str,
        jwks_url: str | None = None,
        ttl_s: float = 3600.0,
        cooldown_s: float = 30.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self._client = client
        self._issuer = issuer
        self._jwks_url = jwks_url
        self._ttl_s = ttl_s
        self._cooldown_s = cooldown_s
        self._timeout_s = timeout_s
        self._clock = clock

        self._lock = anyio.Lock()
        self._keys: dict[str, SigningKey] = {}
        self._expires_at = float("-inf")
        self._next_fetch_at = float("-inf")
        self._last_fetch_failed = False

    async def signing_key(self, kid: str) -> SigningKey:
        """The key with this id.

        Raises InvalidToken when the issuer's current keys do not include it,
        IdentityUnavailable when the keys could not be fetched to tell.
        """
        if not self._fresh_with(kid):
            async with self._lock:
                # Another task may have refreshed while this one waited.
                if not self._fresh_with(kid):
                    await self._refresh_unless_cooling_down()
        return self._lookup(kid)

    async def prefetch(self) -> bool:
        """Fetch the keys now, as at start-up; a failure is logged, not raised.

        It does not start the cooldown, so the first token after a failed
        start-up fetch still gets a fresh attempt.
        """
        async with self._lock:
            await self._fetch()
        return not self._last_fetch_failed

    def _fresh_with(self, kid: str) -> bool:
        return kid in self._keys and self._clock() < self._expires_at

    async def _refresh_unless_cooling_down(self) -> None:
        now = self._clock()
        if now < self._next_fetch_at:
            return

        self._next_fetch_at = now + self._cooldown_s
        await self._fetch()

    async def _fetch(self) -> None:
        try:
            keys = await self._download()
        except IdentityUnavailable as exc:
            self._last_fetch_failed = True
            log.warning("jwks.fetch_failed", issuer=self._issuer, error=str(exc))
            return

        self._keys = keys
        self._expires_at = self._clock() + self._ttl_s
        self._last_fetch_failed = False
        log.info("jwks.fetched", issuer=self._issuer, kids=sorted(keys))

    def _lookup(self, kid: str) -> SigningKey:
        key = self._keys.get(kid)
        if key is not None:
            return key
        if self._last_fetch_failed or not self._keys:
            raise IdentityUnavailable(
                f"the signing keys of {self._issuer} cannot be fetched right now"
            )
        raise InvalidToken(f"the token's key {kid!r} is not one of the issuer's keys")

    async def _download(self) -> dict[str, SigningKey]:
        try:
            with anyio.fail_after(self._timeout_s):
                url = self._jwks_url or await self._discover()
                document = await self._get_json(url)
        except TimeoutError:
            raise IdentityUnavailable(
                f"fetching the keys of {self._issuer} took over {self._timeout_s}s"
            ) from None
        return _parse_jwks(document)

    async def _discover(self) -> str:
        document = await self._get_json(self._issuer.rstrip("/") + _DISCOVERY_PATH)
        if not isinstance(document, dict):
            raise IdentityUnavailable("the discovery document is not a JSON object")
        if document.get("issuer") != self._issuer:
            raise IdentityUnavailable(
                f"the discovery document names issuer {document.get('issuer')!r},"
                f" not {self._issuer!r}"
            )

        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise IdentityUnavailable("the discovery document has no jwks_uri")
        return jwks_uri

    async def _get_json(self, url: str) -> Any:
        if not is_secure_url(url):
            raise IdentityUnavailable(f"refusing to fetch keys over {url!r}")

        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise IdentityUnavailable(
                        f"{url} answered HTTP {response.status_code}"
                    )
                body = await _read_capped(response, url)
        except httpx.HTTPError as exc:
            raise IdentityUnavailable(f"{url}: {type(exc).__name__} {exc}") from exc

        try:
            return json.loads(body)
        except ValueError:
            raise IdentityUnavailable(f"{url} did not answer with JSON") from None


async def _read_capped(response: httpx.Response, url: str) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > _MAX_DOCUMENT_BYTES:
            raise IdentityUnavailable(f"{url} answered with more than 1 MiB")
    return bytes(body)


def _parse_jwks(document: Any) -> dict[str, SigningKey]:
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise IdentityUnavailable("the JWKS document has no keys list")

    keys: dict[str, SigningKey] = {}
    for entry in entries:
        key = _signing_key(entry)
        if key is not None:
            keys[key.kid] = key

    if not keys:
        raise IdentityUnavailable("the JWKS document has no usable signing key")
    return keys


def _signing_key(entry: Any) -> SigningKey | None:
    """The public key in one JWK, or None (logged) when it cannot sign tokens."""
    if not isinstance(entry, dict):
        return None

    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        log.warning("jwks.key_skipped", reason="no kid")
        return None
    if entry.get("use", "sig") != "sig":
        return None  # an encryption key, published alongside on purpose

    try:
        key = jwt.PyJWK(entry).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        log.warning("jwks.key_skipped", kid=kid, reason=str(exc))
        return None
    if not isinstance(key, PublicKey):
        # Symmetric ("oct") keys and private keys have no place in a JWKS.
        log.warning("jwks.key_skipped", kid=kid, reason="not a public key")
        return None

    alg = entry.get("alg")
    return SigningKey(kid, key, alg if isinstance(alg, str) else None)
