"""Talking to AWS without boto3: credentials, backoff and a signed JSON client.

botocore supplies the credential chain and the SigV4 signer; requests go over
httpx, so they run on Trio as on asyncio.
"""

from __future__ import annotations

from kdcube.aws.credentials import Credentials, NoCredentials
from kdcube.aws.json_api import AwsError, AwsJsonClient
from kdcube.aws.retry import Retry

__all__ = ["AwsError", "AwsJsonClient", "Credentials", "NoCredentials", "Retry"]
