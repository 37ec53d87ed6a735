"""AWS credentials and region from botocore's chain, for clients that sign
their own requests.

The chain is the usual one: environment variables, the shared profile files,
then the container or instance role. Looking them up and refreshing a role's
credentials ask the network and block, so both run in a worker thread.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import anyio.to_thread
import botocore.session

__all__ = [
    "Credentials",
    "NoCredentials",
    "credentials_and_region",
    "find_credentials",
    "frozen_credentials",
]

DEFAULT_REGION = "us-east-1"


class Credentials(Protocol):
    """botocore credentials: static, or refreshable ones from a role."""

    def get_frozen_credentials(self) -> Any: ...


class NoCredentials(Exception):
    """botocore's chain found no credentials at all."""


def credentials_and_region() -> tuple[Credentials, str]:
    """The credentials and region botocore's chain finds; blocks."""
    session = botocore.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise NoCredentials(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and"
            " AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with a role"
        )
    region = (
        os.environ.get("AWS_REGION")
        or session.get_config_variable("region")
        or DEFAULT_REGION
    )
    return credentials, str(region)


async def find_credentials() -> tuple[Credentials, str]:
    """``credentials_and_region`` off the event loop."""
    return await anyio.to_thread.run_sync(credentials_and_region)


async def frozen_credentials(credentials: Credentials) -> Any:
    """A consistent snapshot of the key, secret and token to sign with.

    botocore's errors (``BotoCoreError``) pass through for the caller to map.
    """
    # Refreshing asks STS or the instance metadata service, which blocks.
    refresh_needed = getattr(credentials, "refresh_needed", None)
    if refresh_needed is not None and refresh_needed():
        return await anyio.to_thread.run_sync(credentials.get_frozen_credentials)
    return credentials.get_frozen_credentials()
