"""What only the S3 adapter does: signing, retrying, presigning, opening by URL.

The scripted server below is a real socket on 127.0.0.1 that answers each
request with the next canned response, so retries are seen on the wire.
"""

from __future__ import annotations

import asyncio
import datetime
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import botocore.auth
import httpx
import pytest
from botocore.credentials import Credentials, RefreshableCredentials

from kdcube.aws import Retry
from kdcube.storage.local import LocalStorage
from kdcube.storage.open import open_storage
from kdcube.storage.ports import (
    AccessDenied,
    InvalidStorageUrl,
    ObjectInfo,
    StorageError,
    StorageUnavailable,
)
from kdcube.storage.s3 import S3Storage
from tests.s3_server import S3Server

pytestmark = pytest.mark.anyio

FAST_RETRY = Retry(attempts=3, base_s=0.01)


def http_response(status: str, body: bytes = b"", *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return "\r\n".join([*head, "Connection: close", "", ""]).encode() + body


SLOW_DOWN = http_response(
    "503 Slow Down",
    b"<Error><Code>SlowDown</Code><Message>Reduce your rate.</Message></Error>",
    "Content-Type: application/xml",
)
STORED = http_response("200 OK", b"", 'ETag: "e"')
HELLO = http_response("200 OK", b"hello")
HANG_UP = b""
"""Close the connection without answering."""


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    # Real sockets and HTTP timeouts: trio keeps its real clock here.
    if request.param == "trio":
        return "trio", {}
    return "asyncio", {"loop_factory": asyncio.SelectorEventLoop}


def s3_storage(
    client: httpx.AsyncClient,
    endpoint: str,
    credentials: Any,
    *,
    bucket: str = "bucket",
    prefix: str = "",
) -> S3Storage:
    return S3Storage(
        client,
        bucket=bucket,
        credentials=credentials,
        endpoint_url=endpoint,
        prefix=prefix,
        retry=FAST_RETRY,
    )


@dataclass
class Script:
    answers: list[bytes]
    requests: list[str] = field(default_factory=list)

    def next_answer(self, request_line: str) -> bytes:
        self.requests.append(request_line)
        return self.answers[min(len(self.requests), len(self.answers)) - 1]


async def _read_request(stream: anyio.abc.ByteStream) -> str:
    received = b""
    while b"\r\n\r\n" not in received:
        received += await stream.receive()
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        (
            int(line.split(":")[1])
            for line in lines
            if line.lower().startswith("content-length:")
        ),
        0,
    )
    while len(body) < length:
        body += await stream.receive()
    return lines[0]


@asynccontextmanager
async def scripted_server(*answers: bytes) -> AsyncIterator[tuple[str, Script]]:
    script = Script(list(answers))
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def answer(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            reply = script.next_answer(await _read_request(stream))
            if reply:
                await stream.send(reply)

    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, answer)
        yield f"http://127.0.0.1:{port}", script
        group.cancel_scope.cancel()


async def test_a_wrong_secret_is_refused_without_leaking_it(
    s3_server: S3Server,
) -> None:
    wrong = "not-the-secret-" + s3_server.secret_key[:8]

    async with httpx.AsyncClient() as client:
        storage = s3_storage(
            client,
            s3_server.endpoint,
            Credentials(s3_server.access_key, wrong),
            bucket=s3_server.bucket,
        )
        with pytest.raises(AccessDenied) as refused:
            await storage.put("secret/a.txt", b"x")

    message = "".join(traceback.format_exception(refused.value))
    assert isinstance(refused.value, StorageError)
    assert "SignatureDoesNotMatch" in message
    assert "put 'secret/a.txt'" in message
    assert wrong not in message
    assert s3_server.secret_key not in message


async def test_throttling_and_hang_ups_are_retried() -> None:
    async with (
        scripted_server(HANG_UP, SLOW_DOWN, STORED) as (endpoint, script),
        httpx.AsyncClient() as client,
    ):
        storage = s3_storage(client, endpoint, Credentials("id", "secret"))

        assert await storage.put("a/b", b"body") == ObjectInfo("a/b", 4)

    assert script.requests == ["PUT /bucket/a/b HTTP/1.1"] * 3


async def test_a_read_is_retried_until_its_first_byte() -> None:
    async with (
        scripted_server(SLOW_DOWN, SLOW_DOWN, HELLO) as (endpoint, script),
        httpx.AsyncClient() as client,
    ):
        storage = s3_storage(client, endpoint, Credentials("id", "secret"))

        assert b"".join([chunk async for chunk in storage.get("a/b")]) == b"hello"

    assert len(script.requests) == 3


async def test_retrying_gives_up_after_its_attempts() -> None:
    async with (
        scripted_server(SLOW_DOWN) as (endpoint, script),
        httpx.AsyncClient() as client,
    ):
        storage = s3_storage(client, endpoint, Credentials("id", "secret"))

        with pytest.raises(StorageUnavailable, match=r"head 'a/b'.*503"):
            await storage.head("a/b")
        with pytest.raises(StorageUnavailable, match=r"put 'a/b'.*SlowDown"):
            await storage.put("a/b", b"body")

    assert len(script.requests) == 2 * FAST_RETRY.attempts


async def test_an_unreachable_server_is_unavailable() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()

    async with httpx.AsyncClient() as client:
        storage = s3_storage(client, f"http://127.0.0.1:{port}", Credentials("i", "s"))
        with pytest.raises(StorageUnavailable, match=r"list 'x/'.*cannot reach"):
            await storage.list("x/")


async def test_refreshable_credentials_are_refreshed(s3_server: S3Server) -> None:
    refreshed = []

    def refresh() -> dict[str, Any]:
        refreshed.append(True)
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
        return {
            "access_key": s3_server.access_key,
            "secret_key": s3_server.secret_key,
            "token": None,
            "expiry_time": soon.isoformat(),
        }

    credentials = RefreshableCredentials.create_from_metadata(
        refresh(), refresh, "test"
    )
    async with httpx.AsyncClient() as client:
        storage = s3_storage(
            client, s3_server.endpoint, credentials, bucket=s3_server.bucket
        )
        await storage.put("refreshed/a", b"x")
        await storage.delete("refreshed/a")

    # Expiring within the advisory window, they are refreshed before each use.
    assert len(refreshed) >= 3


async def test_a_download_url_carries_its_expiry(s3_server: S3Server) -> None:
    async with httpx.AsyncClient() as client:
        storage = s3_storage(
            client,
            s3_server.endpoint,
            Credentials(s3_server.access_key, s3_server.secret_key),
            bucket=s3_server.bucket,
        )
        url = await storage.download_url("files/a b.txt", expires_s=90)
        with pytest.raises(ValueError, match="expires_s"):
            await storage.download_url("files/a b.txt", expires_s=0)

    query = parse_qs(urlsplit(url or "").query)
    signed_at = datetime.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
    age = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - signed_at
    assert query["X-Amz-Expires"] == ["90"]
    assert abs(age.total_seconds()) < 60
    assert query["X-Amz-Credential"][0].startswith(s3_server.access_key + "/")
    assert s3_server.secret_key not in (url or "")


async def test_an_expired_download_url_is_refused(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not s3_server.checks_presigned_expiry:
        pytest.skip("moto serves presigned URLs without checking their expiry")
    an_hour_ago = datetime.datetime.now(datetime.UTC).replace(
        tzinfo=None
    ) - datetime.timedelta(hours=1)

    async with httpx.AsyncClient() as client:
        storage = s3_storage(
            client,
            s3_server.endpoint,
            Credentials(s3_server.access_key, s3_server.secret_key),
            bucket=s3_server.bucket,
        )
        await storage.put("expired/a", b"x")
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: an_hour_ago)
        url = await storage.download_url("expired/a", expires_s=60)
        monkeypatch.undo()

        response = await client.get(url or "")
        await storage.delete("expired/a")

    assert response.status_code == 403


async def test_open_storage_by_url(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)

    url = s3_server.storage_url("opened/")
    async with open_storage(url, endpoint_url=s3_server.endpoint) as storage:
        await storage.put("a", b"via url")
        assert await storage.list("") == [ObjectInfo("a", 7)]
        assert await storage.delete_prefix("") == 1

    async with open_storage(f"file://{tmp_path}/root") as storage:
        assert isinstance(storage, LocalStorage)
        await storage.put("a", b"x")
    assert (tmp_path / "root" / "a").read_bytes() == b"x"


async def test_no_credentials_is_a_clear_error(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    with pytest.raises(AccessDenied, match="no AWS credentials"):
        async with open_storage(s3_server.storage_url()):
            pass


@pytest.mark.parametrize(
    "url",
    [
        "/var/data",
        "relative/path",
        "file://relative/path",
        "file:relative",
        "s3://",
        "s3:///prefix",
        "s3://bucket/../up",
        "s3://bucket/a//b",
        "gs://bucket/prefix",
        "http://example.com/x",
        "s3://bucket/p?x=1",
    ],
)
async def test_unknown_storage_urls_are_refused(url: str) -> None:
    opener: Callable[[str], Any] = open_storage
    with pytest.raises(InvalidStorageUrl, match="storage URL") as refused:
        async with opener(url):
            pass

    assert isinstance(refused.value, ValueError)
