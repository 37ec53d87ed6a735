"""Storage on S3 and S3-compatible servers (MinIO, R2, moto), on Trio and asyncio.

Requests go over an ``httpx.AsyncClient`` and are signed with botocore's
SigV4 signers; botocore's own HTTP stack is not used because it blocks, and
aiobotocore needs asyncio's loop. Only plain object operations are used (no
tagging, versioning or checksums beyond Content-MD5), so any S3-compatible
server will do.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import quote

import anyio
import anyio.to_thread
import httpx
import structlog
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError

from kdcube.aws.credentials import (
    Credentials,
    NoCredentials,
    find_credentials,
    frozen_credentials,
)
from kdcube.aws.retry import THROTTLED, Retry
from kdcube.storage.keys import check_key
from kdcube.storage.ports import (
    AccessDenied,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
)

log = structlog.get_logger("kdcube.storage")

MIN_PART_SIZE = 5 * 1024 * 1024
"""S3 refuses smaller parts, except the last one of an upload."""

DEFAULT_TIMEOUT = httpx.Timeout(connect=10, read=60, write=60, pool=10)
_PART_SIZE = 8 * 1024 * 1024
_LIST_PAGE = 1000
_DELETE_BATCH = 1000
_SEND_SLICE = 256 * 1024
_HASH_IN_THREAD = 1024 * 1024
_ABORT_TIMEOUT_S = 10
_MAX_PRESIGN_S = 7 * 24 * 3600
_NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_REFUSED = frozenset(
    {
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
    }
)
_WRONG_REGION = frozenset(
    {"PermanentRedirect", "AuthorizationHeaderMalformed", "IncorrectEndpoint"}
)
_RETRYABLE_TRANSPORT = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


_DEFAULT_RETRY = Retry()


@dataclass(slots=True)
class _Call:
    """One S3 request, and the operation and key its errors should name."""

    operation: str
    key: str
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | bytearray = b""


class _PrehashedS3SigV4Auth(S3SigV4Auth):  # type: ignore[misc]
    """SigV4 with the body's hash computed beforehand, off the event loop."""

    def payload(self, request: AWSRequest) -> str:
        return str(request.context["payload_sha256"])


class S3Storage:
    """Objects under ``prefix`` in one bucket.

    With ``endpoint_url`` (MinIO, moto, R2) requests use path-style addresses
    under it; without, AWS's regional endpoint with the bucket as host name.
    The httpx client belongs to the caller, who closes it.

    A put holds at most one part (``part_size``, 8 MiB) of a streamed body in
    memory. Every request can be resent, streamed puts included, because the
    part being sent is buffered; so every request is retried on throttling,
    5xx and broken connections. The credentials need ``s3:ListBucket`` on the
    bucket besides the object actions: without it S3 answers 403, not 404,
    for a missing key.

    Known shortcomings: ``delete`` asks HEAD first to say whether something
    was there, so two deleting at once may both answer True. A
    CreateMultipartUpload or CompleteMultipartUpload whose answer was lost is
    retried: the first may leave an unused upload behind, the second may then
    report NoSuchUpload although the object was written. An upload that could
    not be aborted (the process died, or S3 was down) keeps its parts until a
    bucket lifecycle rule (AbortIncompleteMultipartUpload) removes them, so
    production buckets should have one. A read that breaks off midway is not
    resumed.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        bucket: str,
        credentials: Credentials,
        region: str = "us-east-1",
        prefix: str = "",
        endpoint_url: str | None = None,
        part_size: int = _PART_SIZE,
        list_page_size: int = _LIST_PAGE,
        retry: Retry = _DEFAULT_RETRY,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(
                f"part_size must be at least {MIN_PART_SIZE}, got {part_size}"
            )
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        check_key(prefix, prefix=True)

        self._client = client
        self._bucket = bucket
        self._credentials = credentials
        self._region = region
        self._prefix = prefix
        self._part_size = part_size
        self._list_page_size = list_page_size
        self._retry = retry
        self._timeout = timeout
        self._bucket_url = _bucket_url(bucket, region, endpoint_url)

    @classmethod
    async def from_environment(
        cls,
        client: httpx.AsyncClient,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
    ) -> S3Storage:
        """Credentials and region from botocore's chain: env, profile, role."""
        try:
            credentials, region = await find_credentials()
        except NoCredentials as exc:
            raise AccessDenied(str(exc)) from None
        return cls(
            client,
            bucket=bucket,
            credentials=credentials,
            region=region,
            prefix=prefix,
            endpoint_url=endpoint_url,
        )

    async def put(self, key: str, body: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        name = self._name(key)
        if isinstance(body, bytes) and len(body) <= self._part_size:
            await self._put_once(key, name, body)
            return ObjectInfo(key, len(body))

        chunks = _one(body) if isinstance(body, bytes) else body
        return ObjectInfo(key, await self._put_in_parts(key, name, chunks))

    async def get(
        self, key: str, *, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        name = self._name(key)
        if start < 0 or (end is not None and end < 0):
            raise ValueError(f"start and end must not be negative, got {start}, {end}")
        if end is not None and end <= start:
            await self.head(key)
            return

        call = _Call("get", key, "GET", self._object_url(name))
        call.headers["Accept-Encoding"] = "identity"
        if start or end is not None:
            last = "" if end is None else str(end - 1)
            call.headers["Range"] = f"bytes={start}-{last}"

        response = await self._send(call, stream=True)
        try:
            if response.status_code == 416:
                return
            if response.status_code == 200 and "Range" in call.headers:
                raise StorageError(f"get {key!r}: the server ignored the Range header")
            if response.status_code not in (200, 206):
                _raise_for(call, response)
            with _transport_errors(call):
                async for chunk in response.aiter_raw():
                    yield chunk
        finally:
            await response.aclose()

    async def head(self, key: str) -> ObjectInfo:
        name = self._name(key)
        call = _Call("head", key, "HEAD", self._object_url(name))
        response = await self._send(call)
        if response.status_code != 200:
            _raise_for(call, response)
        return ObjectInfo(key, int(response.headers["Content-Length"]))

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        check_key(prefix, prefix=True)
        found = []
        token = None
        while True:
            page, token = await self._list_page(prefix, token)
            found.extend(page)
            if token is None:
                return sorted(found, key=lambda info: info.key)

    async def delete(self, key: str) -> bool:
        try:
            await self.head(key)
        except ObjectNotFound:
            return False

        call = _Call("delete", key, "DELETE", self._object_url(self._name(key)))
        response = await self._send(call)
        if response.status_code not in (200, 204):
            _raise_for(call, response)
        return True

    async def delete_prefix(self, prefix: str) -> int:
        # One DeleteObjects request per thousand keys rather than one DELETE
        # each: a conversation may hold thousands of objects. It needs a
        # Content-MD5, which is cheap, and every S3-compatible server we
        # target (AWS, MinIO, R2, moto) implements it.
        found = await self.list(prefix)
        for start in range(0, len(found), _DELETE_BATCH):
            await self._delete_batch(prefix, found[start : start + _DELETE_BATCH])
        return len(found)

    async def download_url(self, key: str, *, expires_s: int) -> str | None:
        """A presigned GET URL.

        It stops working early when the credentials that signed it are
        temporary (a role's) and expire first.
        """
        name = self._name(key)
        if not 1 <= expires_s <= _MAX_PRESIGN_S:
            raise ValueError(
                f"expires_s must be 1 to {_MAX_PRESIGN_S}, got {expires_s}"
            )

        request = AWSRequest(method="GET", url=self._object_url(name))
        frozen = await self._frozen_credentials("download_url", key)
        S3SigV4QueryAuth(frozen, "s3", self._region, expires=expires_s).add_auth(
            request
        )
        return str(request.url)

    async def _put_once(self, key: str, name: str, body: bytes | bytearray) -> None:
        call = _Call("put", key, "PUT", self._object_url(name), body=body)
        response = await self._send(call)
        if response.status_code != 200:
            _raise_for(call, response)

    async def _put_in_parts(
        self, key: str, name: str, chunks: AsyncIterable[bytes]
    ) -> int:
        """Upload ``chunks`` holding at most one part in memory; returns the size.

        A part is sent only once the next byte arrives, so the last part is
        never empty, and a body that fits one part goes in a single PUT.
        """
        buffer = bytearray()
        size = 0
        upload: _MultipartUpload | None = None
        try:
            async for chunk in chunks:
                view = memoryview(chunk)
                size += len(view)
                while view:
                    if len(buffer) == self._part_size:
                        upload = upload or await self._start_upload(key, name)
                        await upload.send_part(buffer)
                        buffer.clear()
                    room = self._part_size - len(buffer)
                    buffer += view[:room]
                    view = view[room:]

            if upload is None:
                await self._put_once(key, name, buffer)
            else:
                await upload.send_part(buffer)
                await upload.complete()
        except BaseException:
            if upload is not None:
                await upload.abort()
            raise

        return size

    async def _start_upload(self, key: str, name: str) -> _MultipartUpload:
        call = _Call("put", key, "POST", self._object_url(name, {"uploads": None}))
        root = await self._send_for_xml(call)
        return _MultipartUpload(self, key, name, _text(root, "UploadId"))

    async def _list_page(
        self, prefix: str, token: str | None
    ) -> tuple[builtins.list[ObjectInfo], str | None]:
        query = {
            "list-type": "2",
            "prefix": self._prefix + prefix,
            "max-keys": str(self._list_page_size),
        }
        if token is not None:
            query["continuation-token"] = token
        call = _Call("list", prefix, "GET", self._bucket_url + _query(query))
        root = await self._send_for_xml(call)

        page = [
            ObjectInfo(
                _text(item, "Key").removeprefix(self._prefix), int(_text(item, "Size"))
            )
            for item in _children(root, "Contents")
        ]
        if _text(root, "IsTruncated", "false") != "true":
            return page, None
        return page, _text(root, "NextContinuationToken")

    async def _delete_batch(
        self, prefix: str, batch: builtins.list[ObjectInfo]
    ) -> None:
        request = ElementTree.Element("Delete", xmlns=_NAMESPACE)
        ElementTree.SubElement(request, "Quiet").text = "true"
        for info in batch:
            item = ElementTree.SubElement(request, "Object")
            ElementTree.SubElement(item, "Key").text = self._prefix + info.key
        body = ElementTree.tostring(request, encoding="utf-8")

        url = self._bucket_url + _query({"delete": None})
        call = _Call("delete_prefix", prefix, "POST", url, body=body)
        call.headers["Content-MD5"] = base64.b64encode(
            hashlib.md5(body, usedforsecurity=False).digest()
        ).decode()
        root = await self._send_for_xml(call)

        for error in _children(root, "Error"):
            raise StorageError(
                f"delete_prefix {prefix!r}: could not delete"
                f" {_text(error, 'Key', '?')!r}: {_text(error, 'Code', '?')}"
            )

    def _name(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _object_url(
        self, name: str, query: Mapping[str, str | None] | None = None
    ) -> str:
        return f"{self._bucket_url}/{quote(name, safe='/')}" + _query(query or {})

    async def _send_for_xml(self, call: _Call) -> ElementTree.Element:
        response = await self._send(call)
        root = _parse(call, response)
        # CompleteMultipartUpload can fail after answering 200: the error is the body.
        if response.status_code != 200 or _local_name(root.tag) == "Error":
            _raise_for(call, response)
        return root

    async def _send(self, call: _Call, *, stream: bool = False) -> httpx.Response:
        """Send ``call``, resending it on throttling, 5xx and broken connections."""
        for attempt in range(self._retry.attempts):
            last = attempt == self._retry.attempts - 1
            try:
                response = await self._attempt(call, stream=stream)
            except _RETRYABLE_TRANSPORT as exc:
                if last:
                    _raise_transport(call, exc)
                reason = type(exc).__name__
            except httpx.HTTPError as exc:
                _raise_transport(call, exc)
            else:
                if last or not _should_retry(response):
                    return response
                await response.aclose()
                reason = _error_code(response) or str(response.status_code)

            delay_s = self._retry.delay_s(attempt)
            log.info(
                "storage.retry",
                operation=call.operation,
                key=call.key,
                attempt=attempt + 1,
                reason=reason,
                delay_s=round(delay_s, 3),
            )
            await anyio.sleep(delay_s)
        raise AssertionError("the last attempt returns or raises")

    async def _attempt(self, call: _Call, *, stream: bool) -> httpx.Response:
        headers = await self._signed_headers(call)
        request = self._client.build_request(
            call.method,
            httpx.URL(call.url),
            headers=headers,
            content=_content(call.body),
            timeout=self._timeout,
        )
        response = await self._client.send(request, stream=stream)
        if stream and response.status_code >= 300:
            # Error bodies are small, and reading them says whether to retry.
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def _signed_headers(self, call: _Call) -> dict[str, str]:
        headers = dict(call.headers)
        if call.body or call.method in ("PUT", "POST"):
            headers["Content-Length"] = str(len(call.body))
        request = AWSRequest(method=call.method, url=call.url, headers=headers)
        request.context["payload_sha256"] = await _sha256(call.body)

        frozen = await self._frozen_credentials(call.operation, call.key)
        _PrehashedS3SigV4Auth(frozen, "s3", self._region).add_auth(request)
        return dict(request.headers.items())

    async def _frozen_credentials(self, operation: str, key: str) -> Any:
        try:
            return await frozen_credentials(self._credentials)
        except BotoCoreError as exc:
            raise StorageUnavailable(
                f"{operation} {key!r}: cannot refresh the AWS credentials"
                f" ({type(exc).__name__})"
            ) from exc


@dataclass
class _MultipartUpload:
    storage: S3Storage
    key: str
    name: str
    upload_id: str
    etags: list[str] = field(default_factory=list)

    async def send_part(self, part: bytearray) -> None:
        number = len(self.etags) + 1
        query = {"partNumber": str(number), "uploadId": self.upload_id}
        url = self.storage._object_url(self.name, query)
        call = _Call("put", self.key, "PUT", url, body=part)
        response = await self.storage._send(call)
        if response.status_code != 200:
            _raise_for(call, response)
        self.etags.append(response.headers["ETag"])

    async def complete(self) -> None:
        request = ElementTree.Element("CompleteMultipartUpload", xmlns=_NAMESPACE)
        for number, etag in enumerate(self.etags, start=1):
            part = ElementTree.SubElement(request, "Part")
            ElementTree.SubElement(part, "PartNumber").text = str(number)
            ElementTree.SubElement(part, "ETag").text = etag
        body = ElementTree.tostring(request, encoding="utf-8")

        url = self.storage._object_url(self.name, {"uploadId": self.upload_id})
        call = _Call("put", self.key, "POST", url, body=body)
        await self.storage._send_for_xml(call)

    async def abort(self) -> None:
        """Drop the parts sent so far, even when the put was cancelled."""
        url = self.storage._object_url(self.name, {"uploadId": self.upload_id})
        call = _Call("put", self.key, "DELETE", url)
        with anyio.move_on_after(_ABORT_TIMEOUT_S, shield=True) as scope:
            try:
                response = await self.storage._send(call)
            except StorageError as exc:
                self._abort_failed(str(exc))
                return
            if response.status_code not in (200, 204, 404):
                self._abort_failed(f"status {response.status_code}")
        if scope.cancelled_caught:
            self._abort_failed("timed out")

    def _abort_failed(self, error: str) -> None:
        # The parts stay billed until a lifecycle rule removes them; that rule
        # (AbortIncompleteMultipartUpload) is the backstop we document.
        log.warning(
            "storage.multipart_abort_failed",
            key=self.key,
            upload_id=self.upload_id,
            error=error,
        )


def _bucket_url(bucket: str, region: str, endpoint_url: str | None) -> str:
    if not bucket or "/" in bucket:
        raise ValueError(f"bucket must be a bucket name, got {bucket!r}")
    if endpoint_url is not None:
        return f"{endpoint_url.rstrip('/')}/{bucket}"
    # A dotted name breaks the TLS wildcard certificate of virtual hosts.
    if "." in bucket:
        return f"https://s3.{region}.amazonaws.com/{bucket}"
    return f"https://{bucket}.s3.{region}.amazonaws.com"


def _query(params: Mapping[str, str | None]) -> str:
    """A query string encoded once, so the signed and the sent one are the same."""
    if not params:
        return ""
    pairs = [
        quote(name, safe="")
        if value is None
        else f"{quote(name, safe='')}={quote(value, safe='')}"
        for name, value in params.items()
    ]
    return "?" + "&".join(pairs)


async def _one(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _content(body: bytes | bytearray) -> bytes | AsyncIterator[bytes]:
    if isinstance(body, bytes):
        return body
    if len(body) <= _SEND_SLICE:
        return bytes(body)
    return _slices(body)


async def _slices(body: bytearray) -> AsyncIterator[bytes]:
    # Small copies: the transport may keep a slice buffered until it is sent.
    # Sliced from the bytearray, not from a memoryview of it: a view left in
    # an abandoned generator would stop the part buffer from being cleared.
    for start in range(0, len(body), _SEND_SLICE):
        yield bytes(body[start : start + _SEND_SLICE])


async def _sha256(body: bytes | bytearray) -> str:
    if not body:
        return _EMPTY_SHA256
    if len(body) < _HASH_IN_THREAD:
        return hashlib.sha256(body).hexdigest()
    return await anyio.to_thread.run_sync(lambda: hashlib.sha256(body).hexdigest())


def _should_retry(response: httpx.Response) -> bool:
    if response.status_code >= 500 or response.status_code == 429:
        return True
    return response.status_code >= 400 and _error_code(response) in THROTTLED


def _parse(call: _Call, response: httpx.Response) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(response.content)
    except ElementTree.ParseError as exc:
        if response.status_code >= 300:
            _raise_for(call, response)
        raise StorageError(
            f"{call.operation} {call.key!r}: the server's answer is not XML"
        ) from exc


def _error_code(response: httpx.Response) -> str:
    try:
        root = ElementTree.fromstring(response.content)
    except ElementTree.ParseError:
        return ""
    return _text(root, "Code", "")


def _error_message(response: httpx.Response) -> str:
    try:
        root = ElementTree.fromstring(response.content)
    except ElementTree.ParseError:
        return ""
    return _text(root, "Message", "")


def _raise_for(call: _Call, response: httpx.Response) -> NoReturn:
    """Turn S3's error answer into ours, naming the operation and the key."""
    code = _error_code(response) or str(response.status_code)
    detail = _error_message(response)
    where = f"{call.operation} {call.key!r}"
    said = f"{code}: {detail}" if detail else code

    if code in _WRONG_REGION:
        raise StorageError(f"{where}: {said}; check the region (AWS_REGION)")
    if code == "NoSuchBucket":
        raise StorageError(
            f"{where}: bucket does not exist ({said}); check the storage URL"
        )
    if response.status_code == 404:
        raise ObjectNotFound(f"{where}: no such object")
    if response.status_code == 403 or code in _REFUSED:
        raise AccessDenied(
            f"{where}: refused by S3 ({said}); check the credentials and policy"
        )
    if response.status_code >= 500 or code in THROTTLED:
        raise StorageUnavailable(f"{where}: S3 kept failing ({said})")
    raise StorageError(f"{where}: S3 answered {response.status_code} ({said})")


def _raise_transport(call: _Call, exc: httpx.HTTPError) -> NoReturn:
    raise StorageUnavailable(
        f"{call.operation} {call.key!r}: cannot reach S3 ({type(exc).__name__}: {exc})"
    ) from exc


@contextmanager
def _transport_errors(call: _Call) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError as exc:
        _raise_transport(call, exc)


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


def _children(root: ElementTree.Element, name: str) -> Iterator[ElementTree.Element]:
    return (child for child in root if _local_name(child.tag) == name)


def _text(root: ElementTree.Element, name: str, default: str | None = None) -> str:
    for child in _children(root, name):
        return child.text or ""
    if default is None:
        raise StorageError(f"the server's answer has no {name}")
    return default
