"""Choosing and opening the authenticator the settings ask for."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import httpx

from kdcube.config import Settings
from kdcube.identity.dev import DevAuthenticator
from kdcube.identity.jwks import JwksCache
from kdcube.identity.model import (
    AnonymousRefused,
    Authenticator,
    Credentials,
    Identity,
)
from kdcube.identity.oidc import OidcAuthenticator, OidcPolicy


class RequireToken:
    """Wraps an authenticator so that a caller without a token gets 401."""

    def __init__(self, inner: Authenticator) -> None:
        self._inner = inner

    async def identify(self, credentials: Credentials) -> Identity:
        if credentials.token is None:
            raise AnonymousRefused("this server needs a token; sign in first")
        return await self._inner.identify(credentials)


@asynccontextmanager
async def open_authenticator(settings: Settings) -> AsyncIterator[Authenticator]:
    """Dev identity unless ``KDCUBE_AUTH=oidc``; anonymous callers refused
    when ``KDCUBE_ALLOW_ANONYMOUS`` is false."""
    async with AsyncExitStack() as stack:
        authenticator: Authenticator
        if settings.auth == "oidc":
            authenticator = await stack.enter_async_context(
                open_oidc_authenticator(settings)
            )
        else:
            authenticator = DevAuthenticator()

        yield authenticator if settings.allow_anonymous else RequireToken(authenticator)


@asynccontextmanager
async def open_oidc_authenticator(
    settings: Settings, *, clock: Callable[[], float] = anyio.current_time
) -> AsyncIterator[OidcAuthenticator]:
    """An OIDC authenticator owning its HTTP client, its keys fetched once.

    An issuer that cannot be reached now is logged, not raised: the process
    starts and tokens get IdentityUnavailable until the keys can be fetched.
    """
    policy = OidcPolicy.from_settings(settings)
    timeout = httpx.Timeout(settings.oidc_fetch_timeout_s)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        keys = JwksCache(
            client,
            issuer=policy.issuer,
            jwks_url=settings.oidc_jwks_url,
            ttl_s=settings.oidc_jwks_ttl_s,
            cooldown_s=settings.oidc_jwks_cooldown_s,
            timeout_s=settings.oidc_fetch_timeout_s,
            clock=clock,
        )
        await keys.prefetch()
        yield OidcAuthenticator(policy, keys)
