"""An S3-compatible server for the tests, with real signature checks.

With ``KDCUBE_TEST_S3_ENDPOINT`` set (and ``KDCUBE_TEST_S3_ACCESS_KEY``,
``KDCUBE_TEST_S3_SECRET_KEY``, optionally ``KDCUBE_TEST_S3_BUCKET`` and
``KDCUBE_TEST_S3_REGION``), the tests use that server and create the bucket
when it is missing. Otherwise moto runs in server mode on a free port of
127.0.0.1, started on first use and stopped when pytest ends. moto accepts any
signature unless ``INITIAL_NO_AUTH_ACTION_COUNT`` is set, so it is, to the
number of unsigned calls needed to create an IAM user with an ``s3:*`` policy
and an access key; every later request must be signed with that key.

Uses from other tests:

- the session fixture ``s3_server`` gives an :class:`S3Server` with
  ``endpoint``, ``bucket``, ``access_key``, ``secret_key`` and ``region``
  (``astuple(server)[:4]`` is ``(endpoint, bucket, access_key, secret_key)``);
- ``server.env()`` is the environment a process needs to reach it through
  botocore's credential chain (set it with ``monkeypatch.setenv`` or pass it
  to a subprocess); ``server.storage_url("some/prefix/")`` is the matching
  ``s3://`` URL, to open with ``open_storage(url, endpoint_url=server.endpoint)``;
- ``server.client()`` is a plain synchronous botocore S3 client, an oracle
  independent of the adapter under test;
- ``with server.anonymous_reads():`` around a plain GET of a presigned URL:
  moto checking signatures fails any request without an Authorization header,
  presigned ones too, so its checks are off meanwhile;
- outside pytest (the benchmarks), ``with moto_server() as server:``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import botocore.session
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

_READY_TIMEOUT_S = 30
_STOP_TIMEOUT_S = 5
_UNSIGNED_SETUP_CALLS = 3
"""CreateUser, PutUserPolicy and CreateAccessKey; moto checks every later call."""

_S3_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    is_moto: bool = False

    @property
    def checks_presigned_expiry(self) -> bool:
        """moto serves a presigned URL without checking its signature or expiry."""
        return not self.is_moto

    @contextmanager
    def anonymous_reads(self) -> Iterator[None]:
        """Let requests without an Authorization header through, as S3 does.

        moto checking signatures fails with a 500 on any request that has no
        Authorization header, presigned URLs included, so its checks are
        switched off meanwhile (moto's own ``reset-auth`` switch); a real
        server needs nothing.
        """
        if not self.is_moto:
            yield
            return
        _reset_moto_auth(self.endpoint, "inf")
        try:
            yield
        finally:
            _reset_moto_auth(self.endpoint, "0")

    def key_allowed(self, actions: list[str]) -> tuple[str, str]:
        """A new moto access key whose policy allows ``actions`` (``ecs:*``...).

        moto checks every call against the caller's policy, and the session's
        key may use S3 only; three calls go unchecked to make this key, then
        moto checks again.
        """
        _reset_moto_auth(self.endpoint, str(_UNSIGNED_SETUP_CALLS))
        iam = _client("iam", self.endpoint, self.region, "setup", "setup")
        user = f"kdcube-{uuid.uuid4().hex[:8]}"
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }
        iam.create_user(UserName=user)
        iam.put_user_policy(
            UserName=user, PolicyName="allowed", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def env(self) -> dict[str, str]:
        """Variables under which botocore's credential chain finds this server's key."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def storage_url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self) -> Any:
        return _client(
            "s3", self.endpoint, self.region, self.access_key, self.secret_key
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _client(
    service: str, endpoint: str, region: str, access_key: str, secret_key: str
) -> Any:
    session = botocore.session.Session()
    return session.create_client(
        service,
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 2},
        ),
    )


def _wait_until_listening(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto exited with {process.returncode} on startup")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"moto did not listen on port {port} within {_READY_TIMEOUT_S}s")


def _create_access_key(endpoint: str, region: str) -> tuple[str, str]:
    iam = _client("iam", endpoint, region, "bootstrap", "bootstrap")
    iam.create_user(UserName="kdcube-test")
    iam.put_user_policy(
        UserName="kdcube-test", PolicyName="s3-all", PolicyDocument=json.dumps(_S3_ALL)
    )
    key = iam.create_access_key(UserName="kdcube-test")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def _reset_moto_auth(endpoint: str, unchecked_calls: str) -> None:
    response = httpx.post(
        f"{endpoint}/moto-api/reset-auth", content=unchecked_calls, timeout=10
    )
    response.raise_for_status()


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(_STOP_TIMEOUT_S)


@contextmanager
def moto_server(bucket: str = "kdcube-test") -> Iterator[S3Server]:
    """A moto server that checks signatures, with one bucket and one access key."""
    port = free_port()
    environment = {
        **os.environ,
        "INITIAL_NO_AUTH_ACTION_COUNT": str(_UNSIGNED_SETUP_CALLS),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_listening(process, port)
        endpoint = f"http://127.0.0.1:{port}"
        access_key, secret_key = _create_access_key(endpoint, "us-east-1")
        server = S3Server(endpoint, bucket, access_key, secret_key, is_moto=True)
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        _stop(process)


def _configured_server() -> S3Server | None:
    endpoint = os.environ.get("KDCUBE_TEST_S3_ENDPOINT")
    if not endpoint:
        return None
    server = S3Server(
        endpoint=endpoint,
        bucket=os.environ.get("KDCUBE_TEST_S3_BUCKET", "kdcube-test"),
        access_key=os.environ["KDCUBE_TEST_S3_ACCESS_KEY"],
        secret_key=os.environ["KDCUBE_TEST_S3_SECRET_KEY"],
        region=os.environ.get("KDCUBE_TEST_S3_REGION", "us-east-1"),
    )
    try:
        server.client().create_bucket(Bucket=server.bucket)
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in (
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        ):
            raise
    return server


_servers = ExitStack()
_server: S3Server | None = None


def provide_s3_server() -> S3Server:
    """The session's S3 server, started on first use."""
    global _server
    if _server is None:
        _server = _configured_server() or _servers.enter_context(moto_server())
    return _server


def pytest_unconfigure(config: pytest.Config) -> None:
    _servers.close()


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    return provide_s3_server()
