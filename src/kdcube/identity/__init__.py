"""Who is calling: identities, user types and how tokens map to them."""

from kdcube.identity.dev import DevAuthenticator
from kdcube.identity.model import Credentials, Identity, InvalidToken, UserType

__all__ = ["Credentials", "DevAuthenticator", "Identity", "InvalidToken", "UserType"]
