"""AwsJsonClient: signing, retries and error mapping.

Retries and error shapes are played by an httpx MockTransport, so every
answer is chosen by the test; signing is checked against moto, which
validates signatures (tests/s3_server.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from botocore.credentials import Credentials

from kdcube.aws import AwsError, AwsJsonClient, Retry
from tests.s3_server import S3Server

pytestmark = pytest.mark.anyio

Handler = Callable[[httpx.Request], httpx.Response]
FAST = Retry(attempts=3, base_s=0.001, max_s=0.001)


def client_for(http: httpx.AsyncClient, *, secret: str = "secret") -> AwsJsonClient:
    return AwsJsonClient(
        http,
        service="ecs",
        target_prefix="AmazonEC2ContainerServiceV20141113",
        credentials=Credentials("AKIDEXAMPLE", secret),
        region="eu-west-1",
        endpoint_url="http://ecs.test",
        retry=FAST,
    )


class Script:
    """Answers requests from a list, and keeps what it was sent."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def error(status: int, code: str, message: str = "no") -> httpx.Response:
    return httpx.Response(status, json={"__type": code, "message": message})


async def call_with(script: Script, payload: dict[str, object]) -> dict[str, object]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as http:
        return await client_for(http).call("DescribeTasks", payload)


async def test_signs_and_names_the_operation() -> None:
    script = Script(httpx.Response(200, json={"tasks": []}))

    answer = await call_with(script, {"cluster": "c"})

    assert answer == {"tasks": []}
    [request] = script.requests
    assert request.method == "POST" and str(request.url) == "http://ecs.test/"
    assert request.headers["X-Amz-Target"] == (
        "AmazonEC2ContainerServiceV20141113.DescribeTasks"
    )
    assert request.headers["Content-Type"] == "application/x-amz-json-1.1"
    authorization = request.headers["Authorization"]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/ecs/aws4_request" in authorization
    assert json.loads(request.content) == {"cluster": "c"}


async def test_retries_server_errors_and_throttling() -> None:
    script = Script(
        error(500, "ServerException"),
        error(400, "ThrottlingException", "Rate exceeded"),
        httpx.Response(200, json={"ok": True}),
    )

    assert await call_with(script, {}) == {"ok": True}
    assert len(script.requests) == 3


async def test_retries_broken_connections() -> None:
    script = Script(httpx.ConnectError("refused"), httpx.Response(200, json={}))

    assert await call_with(script, {}) == {}
    assert len(script.requests) == 2


async def test_gives_up_after_the_last_attempt() -> None:
    script = Script(*[error(503, "ServiceUnavailableException")] * 3)

    with pytest.raises(AwsError) as caught:
        await call_with(script, {})

    assert (caught.value.code, caught.value.status_code) == (
        "ServiceUnavailableException",
        503,
    )
    assert len(script.requests) == 3


async def test_unreachable_is_an_aws_error_naming_the_transport_error() -> None:
    script = Script(*[httpx.ConnectError("refused")] * 3)

    with pytest.raises(AwsError) as caught:
        await call_with(script, {})

    assert caught.value.code == "ConnectError"
    assert caught.value.status_code is None


async def test_client_errors_are_not_retried_and_keep_code_and_message() -> None:
    script = Script(
        error(400, "com.amazonaws.ecs#ClusterNotFoundException", "Cluster not found.")
    )

    with pytest.raises(AwsError) as caught:
        await call_with(script, {})

    assert len(script.requests) == 1
    assert caught.value.code == "ClusterNotFoundException"
    assert caught.value.message == "Cluster not found."
    assert str(caught.value) == (
        "ecs DescribeTasks: ClusterNotFoundException: Cluster not found."
    )


async def test_error_code_from_the_header_when_the_body_has_none() -> None:
    answer = httpx.Response(
        403,
        headers={"x-amzn-ErrorType": "AccessDeniedException:http://internal/"},
        content=b"",
    )

    with pytest.raises(AwsError) as caught:
        await call_with(Script(answer), {})

    assert (caught.value.code, caught.value.status_code) == (
        "AccessDeniedException",
        403,
    )


async def test_a_non_json_answer_is_an_aws_error() -> None:
    script = Script(httpx.Response(200, content=b"<html>proxy</html>"))

    with pytest.raises(AwsError) as caught:
        await call_with(script, {})

    assert caught.value.code == "MalformedAnswer"


def moto_client(
    http: httpx.AsyncClient, server: S3Server, secret: str
) -> AwsJsonClient:
    return AwsJsonClient(
        http,
        service="ecs",
        target_prefix="AmazonEC2ContainerServiceV20141113",
        credentials=Credentials(server.access_key, secret),
        region=server.region,
        endpoint_url=server.endpoint,
        retry=FAST,
    )


async def test_moto_checks_the_signature(s3_server: S3Server) -> None:
    if not s3_server.is_moto:
        pytest.skip("needs moto, which serves ECS")
    async with httpx.AsyncClient() as http:
        with pytest.raises(AwsError) as wrong_secret:
            await moto_client(http, s3_server, "wrong").call("ListClusters", {})
        # The session's key may only use S3: a valid signature gets as far
        # as the policy check.
        with pytest.raises(AwsError) as refused:
            await moto_client(http, s3_server, s3_server.secret_key).call(
                "ListClusters", {}
            )

    assert wrong_secret.value.code == "SignatureDoesNotMatch"
    assert refused.value.code == "AccessDenied"
    assert "ecs:ListClusters" in refused.value.message
