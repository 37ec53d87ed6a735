"""Who is calling: identities, user types and how tokens map to them."""

from kdcube.identity.dev import DevAuthenticator
from kdcube.identity.extract import TokenCookies, extract_credentials
from kdcube.identity.factory import (
    RequireToken,
    open_authenticator,
    open_oidc_authenticator,
)
from kdcube.identity.jwks import JwksCache
from kdcube.identity.model import (
    AnonymousRefused,
    Authenticator,
    Credentials,
    Identity,
    IdentityUnavailable,
    InvalidToken,
    UserType,
)
from kdcube.identity.oidc import OidcAuthenticator, OidcPolicy

__all__ = [
    "AnonymousRefused",
    "Authenticator",
    "Credentials",
    "DevAuthenticator",
    "Identity",
    "IdentityUnavailable",
    "InvalidToken",
    "JwksCache",
    "OidcAuthenticator",
    "OidcPolicy",
    "RequireToken",
    "TokenCookies",
    "UserType",
    "extract_credentials",
    "open_authenticator",
    "open_oidc_authenticator",
]
