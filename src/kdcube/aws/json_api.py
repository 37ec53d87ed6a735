"""A client for AWS services that speak the JSON protocol (ECS, CloudWatch
Logs, CloudWatch metrics), signed with botocore's SigV4 signer and sent with
httpx.

One operation is one POST of a JSON document to the service's endpoint, named
by the ``X-Amz-Target`` header; the answer is a JSON document. ``call``
resends a request on throttling, 5xx and broken connections, with jittered
exponential backoff, so the operations it is used for must be safe to resend:
read-only ones, or ones made idempotent by the caller (RunTask's
``clientToken``). Every failure surfaces as one ``AwsError`` carrying AWS's
error code and message.

Known shortcomings: the default endpoint is ``https://{service}.{region}.
amazonaws.com``, which is wrong for the China and other partitions (pass
``endpoint_url`` there). Bodies are held in memory, which suits these control
plane APIs and nothing bulkier.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from typing import Any

import anyio
import httpx
import structlog
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError

from kdcube.aws.credentials import Credentials, find_credentials, frozen_credentials
from kdcube.aws.retry import THROTTLED, Retry

__all__ = ["DEFAULT_TIMEOUT", "AwsError", "AwsJsonClient"]

log = structlog.get_logger("kdcube.aws")

DEFAULT_TIMEOUT = httpx.Timeout(connect=10, read=30, write=30, pool=10)
_DEFAULT_RETRY = Retry()
_RETRYABLE_TRANSPORT = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


class AwsError(Exception):
    """An AWS operation failed: AWS refused it, kept failing or could not be
    reached.

    ``code`` is AWS's error code (``AccessDeniedException``,
    ``ClusterNotFoundException``, ``ThrottlingException``...), or the name of
    the transport error when no answer came; ``status_code`` is the HTTP
    status, None without an answer.
    """

    def __init__(
        self,
        service: str,
        operation: str,
        code: str,
        message: str,
        status_code: int | None = None,
    ) -> None:
        said = f"{code}: {message}" if message else code
        super().__init__(f"{service} {operation}: {said}")
        self.service = service
        self.operation = operation
        self.code = code
        self.message = message
        self.status_code = status_code


class AwsJsonClient:
    """Calls one JSON-protocol service.

    ``service`` is the endpoint prefix (``ecs``, ``logs``, ``monitoring``)
    and, unless ``signing_name`` says otherwise, the name requests are signed
    for; ``target_prefix`` goes before the operation in ``X-Amz-Target``
    (``AmazonEC2ContainerServiceV20141113`` for ECS, ``Logs_20140328`` for
    CloudWatch Logs). ``json_version`` is the protocol's ``1.1`` (most) or
    ``1.0``. The httpx client belongs to the caller, who closes it.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        service: str,
        target_prefix: str,
        credentials: Credentials,
        region: str,
        endpoint_url: str | None = None,
        json_version: str = "1.1",
        signing_name: str | None = None,
        retry: Retry = _DEFAULT_RETRY,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        if json_version not in ("1.0", "1.1"):
            raise ValueError(
                f"json_version must be '1.0' or '1.1', got {json_version!r}"
            )
        self._client = client
        self._service = service
        self._target_prefix = target_prefix
        self._credentials = credentials
        self._region = region
        endpoint = endpoint_url or f"https://{service}.{region}.amazonaws.com"
        self._url = endpoint.rstrip("/") + "/"
        self._content_type = f"application/x-amz-json-{json_version}"
        self._signing_name = signing_name or service
        self._retry = retry
        self._timeout = timeout

    @classmethod
    async def from_environment(
        cls,
        client: httpx.AsyncClient,
        *,
        service: str,
        target_prefix: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        json_version: str = "1.1",
    ) -> AwsJsonClient:
        """Credentials (and the region, unless given) from botocore's chain."""
        credentials, found_region = await find_credentials()
        return cls(
            client,
            service=service,
            target_prefix=target_prefix,
            credentials=credentials,
            region=region or found_region,
            endpoint_url=endpoint_url,
            json_version=json_version,
        )

    @property
    def region(self) -> str:
        return self._region

    async def call(
        self, operation: str, payload: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Send ``operation`` with ``payload`` and return AWS's answer."""
        body = json.dumps(payload or {}, separators=(",", ":")).encode()
        for attempt in range(self._retry.attempts):
            last = attempt == self._retry.attempts - 1
            try:
                response = await self._attempt(operation, body)
            except _RETRYABLE_TRANSPORT as exc:
                if last:
                    raise self._unreachable(operation, exc) from exc
                reason = type(exc).__name__
            except httpx.HTTPError as exc:
                raise self._unreachable(operation, exc) from exc
            else:
                if response.is_success:
                    return _answer(self._service, operation, response)
                error = _error(self._service, operation, response)
                if last or not _worth_retrying(error):
                    raise error
                reason = error.code

            await self._back_off(operation, attempt, reason)
        raise AssertionError("the last attempt returns or raises")

    async def _attempt(self, operation: str, body: bytes) -> httpx.Response:
        headers = await self._signed_headers(operation, body)
        return await self._client.post(
            self._url, headers=headers, content=body, timeout=self._timeout
        )

    async def _signed_headers(self, operation: str, body: bytes) -> dict[str, str]:
        headers = {
            "Content-Type": self._content_type,
            "X-Amz-Target": f"{self._target_prefix}.{operation}",
        }
        request = AWSRequest(method="POST", url=self._url, data=body, headers=headers)
        try:
            frozen = await frozen_credentials(self._credentials)
        except BotoCoreError as exc:
            raise AwsError(
                self._service,
                operation,
                type(exc).__name__,
                "cannot refresh the AWS credentials",
            ) from exc
        SigV4Auth(frozen, self._signing_name, self._region).add_auth(request)
        return dict(request.headers.items())

    async def _back_off(self, operation: str, attempt: int, reason: str) -> None:
        delay_s = self._retry.delay_s(attempt)
        log.info(
            "aws.retry",
            service=self._service,
            operation=operation,
            attempt=attempt + 1,
            reason=reason,
            delay_s=round(delay_s, 3),
        )
        await anyio.sleep(delay_s)

    def _unreachable(self, operation: str, exc: httpx.HTTPError) -> AwsError:
        return AwsError(
            self._service,
            operation,
            type(exc).__name__,
            f"cannot reach {self._url} ({exc})",
        )


def _answer(service: str, operation: str, response: httpx.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise AwsError(
            service,
            operation,
            "MalformedAnswer",
            "the answer is not a JSON object",
            response.status_code,
        )
    return answer


def _error(service: str, operation: str, response: httpx.Response) -> AwsError:
    code, message = _json_error(response) or _xml_error(response) or ("", "")
    code = code or _header_code(response) or str(response.status_code)
    return AwsError(service, operation, code, message, response.status_code)


def _json_error(response: httpx.Response) -> tuple[str, str] | None:
    try:
        document = response.json()
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    code = str(document.get("__type") or document.get("code") or "")
    message = document.get("message") or document.get("Message") or ""
    return _short_code(code), str(message)


def _xml_error(response: httpx.Response) -> tuple[str, str] | None:
    # Some front ends (and moto's IAM checks) answer JSON services in the
    # Query protocol's XML error format.
    try:
        root = ElementTree.fromstring(response.content)
    except ElementTree.ParseError:
        return None
    texts = {_local_name(node.tag): node.text or "" for node in root.iter()}
    return texts.get("Code", ""), texts.get("Message", "")


def _header_code(response: httpx.Response) -> str:
    return _short_code(response.headers.get("x-amzn-ErrorType", ""))


def _short_code(code: str) -> str:
    """``AccessDeniedException`` out of ``com.amazon.coral#AccessDeniedException``
    or ``AccessDeniedException:http://internal.amazon.com/...``."""
    return code.rpartition("#")[2].partition(":")[0]


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


def _worth_retrying(error: AwsError) -> bool:
    status = error.status_code or 0
    return status >= 500 or status == 429 or error.code in THROTTLED
