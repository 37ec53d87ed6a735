"""FargateExecutor against moto's ECS, EC2 and S3 in one server.

moto runs no containers, so the test plays the container: it waits for the
task RunTask made, reads the task's container overrides back through
DescribeTasks, runs ``kdcube.exec.task_runner`` as a child process with that
environment against moto's S3, then stops the task through StopTask, which is
what makes it STOPPED. Left alone, moto would move a task towards STOPPED one
state per DescribeTasks; the module pins tasks at RUNNING (moto's state
manager) so only StopTask ends them, as on AWS.

moto's quirks met here: a task in ``awsvpc`` mode needs a VPC with DNS
hostnames on (its network interface has no DNS name otherwise, and RunTask
fails with a 500), and a container definition with ``memory``; it keeps neither ``referenceId`` nor ``clientToken``, sets
no ``stopCode`` and reports every container with exit code 0.

Time is real here: the executor polls moto over HTTP, and the runner is a
child process. Each test needs moto, as the S3 server.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from botocore.credentials import Credentials

from kdcube.aws import AwsJsonClient, Retry
from kdcube.exec import ExecError, ExecRequest, StreamName
from kdcube.exec.fargate import ECS_TARGET_PREFIX, FargateExecutor, StoppedTask
from kdcube.storage.s3 import S3Storage
from tests.s3_server import S3Server, _client

pytestmark = pytest.mark.anyio

FAMILY = "kdcube-exec-test"
CONTAINER = "exec"
_PINNED = {"progression": "manual", "times": 10**9}


@dataclass(frozen=True)
class Aws:
    """moto, a key allowed ECS, EC2 and S3, and the task's network."""

    server: S3Server
    access_key: str
    secret_key: str
    subnet: str
    security_group: str

    def client(self, service: str) -> Any:
        return _client(
            service,
            self.server.endpoint,
            self.server.region,
            self.access_key,
            self.secret_key,
        )

    def credentials(self) -> Credentials:
        return Credentials(self.access_key, self.secret_key)

    def env(self) -> dict[str, str]:
        return {
            **self.server.env(),
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    if request.param == "trio":
        return "trio", {}
    # Explicit: once trio-asyncio is imported, asyncio's default loop is its own.
    return "asyncio", {"loop_factory": asyncio.SelectorEventLoop}


def _moto_api(server: S3Server, path: str, **kwargs: Any) -> None:
    httpx.post(
        f"{server.endpoint}/moto-api/{path}", timeout=10, **kwargs
    ).raise_for_status()


@pytest.fixture(name="aws", scope="module")
def _aws(s3_server: S3Server) -> Iterator[Aws]:
    if not s3_server.is_moto:
        pytest.skip("the ECS tests need moto, which serves ECS beside S3")
    access_key, secret_key = s3_server.key_allowed(["ecs:*", "ec2:*", "s3:*"])
    ec2 = _client("ec2", s3_server.endpoint, s3_server.region, access_key, secret_key)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]
    group = ec2.create_security_group(
        GroupName="kdcube-exec", Description="exec tasks", VpcId=vpc
    )
    aws = Aws(s3_server, access_key, secret_key, subnet["SubnetId"], group["GroupId"])
    aws.client("ecs").register_task_definition(
        family=FAMILY,
        networkMode="awsvpc",
        requiresCompatibilities=["FARGATE"],
        cpu="256",
        memory="1024",
        # moto needs the container's memory, which Fargate leaves optional.
        containerDefinitions=[
            {
                "name": CONTAINER,
                "image": "kdcube-exec:test",
                "memory": 1024,
                "essential": True,
            }
        ],
    )
    _moto_api(s3_server, "state-manager/set-transition", json=_transition(_PINNED))
    yield aws
    _moto_api(s3_server, "state-manager/unset-transition", json=_transition(None))


def _transition(transition: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": "ecs::task"}
    if transition is not None:
        body["transition"] = transition
    return body


@pytest.fixture(name="cluster")
def _cluster(aws: Aws) -> str:
    name = f"exec-{uuid.uuid4().hex[:12]}"
    aws.client("ecs").create_cluster(clusterName=name)
    return name


@pytest.fixture(name="executor")
async def _executor(aws: Aws, cluster: str) -> AsyncIterator[FargateExecutor]:
    async with httpx.AsyncClient() as http:
        yield FargateExecutor(**executor_options(http, aws, cluster))


def executor_options(
    http: httpx.AsyncClient, aws: Aws, cluster: str, /, **overrides: Any
) -> dict[str, Any]:
    server = aws.server
    storage = S3Storage(
        http,
        bucket=server.bucket,
        credentials=aws.credentials(),
        region=server.region,
        endpoint_url=server.endpoint,
    )
    ecs = AwsJsonClient(
        http,
        service="ecs",
        target_prefix=ECS_TARGET_PREFIX,
        credentials=aws.credentials(),
        region=server.region,
        endpoint_url=server.endpoint,
        retry=Retry(attempts=2, base_s=0.01),
    )
    options: dict[str, Any] = {
        "cluster": cluster,
        "task_definition": FAMILY,
        "subnets": [aws.subnet],
        "security_groups": [aws.security_group],
        "storage": storage,
        "storage_url": server.storage_url(),
        "storage_endpoint": server.endpoint,
        "container_name": CONTAINER,
        "ecs": ecs,
        "poll_interval_s": 0.05,
        "startup_allowance_s": 30.0,
    }
    return {**options, **overrides}


async def tasks_of(aws: Aws, cluster: str) -> list[dict[str, Any]]:
    def describe() -> list[dict[str, Any]]:
        ecs = aws.client("ecs")
        arns = ecs.list_tasks(cluster=cluster)["taskArns"]
        if not arns:
            return []
        found = ecs.describe_tasks(cluster=cluster, tasks=arns, include=["TAGS"])
        return list(found["tasks"])

    return await anyio.to_thread.run_sync(describe)


async def started_task(aws: Aws, cluster: str) -> dict[str, Any]:
    """The one task RunTask started on ``cluster``, once it shows."""
    with anyio.fail_after(10):
        while True:
            tasks = await tasks_of(aws, cluster)
            if tasks:
                [task] = tasks
                return task
            # moto tells of nothing; asking again is all there is.
            await anyio.sleep(0.02)


async def stop(aws: Aws, cluster: str, task: dict[str, Any], reason: str) -> None:
    def stop_task() -> None:
        aws.client("ecs").stop_task(
            cluster=cluster, task=task["taskArn"], reason=reason
        )

    await anyio.to_thread.run_sync(stop_task)


def override_of(task: dict[str, Any]) -> dict[str, Any]:
    [override] = task["overrides"]["containerOverrides"]
    return dict(override)


async def play_container(aws: Aws, cluster: str) -> dict[str, Any]:
    """Do what Fargate would: run the task's command with its environment,
    then let the task stop."""
    task = await started_task(aws, cluster)
    variables = {v["name"]: v["value"] for v in override_of(task)["environment"]}
    env = {"PATH": os.environ["PATH"], **aws.env(), **variables}
    done = await anyio.run_process(
        [sys.executable, "-m", "kdcube.exec.task_runner"], env=env, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    await stop(aws, cluster, task, "Essential container in task exited")
    return task


async def keys_under(aws: Aws, prefix: str) -> list[str]:
    def listed() -> list[str]:
        answer = aws.server.client().list_objects_v2(
            Bucket=aws.server.bucket, Prefix=prefix
        )
        return [item["Key"] for item in answer.get("Contents", [])]

    return await anyio.to_thread.run_sync(listed)


PROGRAM = """\
import sys
data = open('data/in.txt').read()
print('read', data)
open('out/report.txt', 'w').write(data.upper())
print('oops', file=sys.stderr)
sys.exit(3)
"""


async def test_a_run_goes_through_a_task_and_storage(
    executor: FargateExecutor, aws: Aws, cluster: str
) -> None:
    request = ExecRequest(
        PROGRAM, {"data/in.txt": b"hello"}, memory_mb=300, timeout_s=20
    )
    seen: list[tuple[StreamName, bytes]] = []

    async def on_output(name: StreamName, chunk: bytes) -> None:
        seen.append((name, chunk))

    played: list[dict[str, Any]] = []

    async def container() -> None:
        played.append(await play_container(aws, cluster))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(container)
        result = await executor.run(request, on_output=on_output)

    assert (result.exit_code, result.stdout, result.stderr) == (
        3,
        b"read hello\n",
        b"oops\n",
    )
    assert not result.timed_out and not result.stdout_truncated
    assert result.files == {"report.txt": b"HELLO"}
    assert seen == [("stdout", b"read hello\n"), ("stderr", b"oops\n")]
    assert await keys_under(aws, f"exec/{request.run_id}/") == []
    await check_run_task(aws, played[0], request)


async def check_run_task(aws: Aws, task: dict[str, Any], request: ExecRequest) -> None:
    assert task["taskDefinitionArn"].endswith(f"task-definition/{FAMILY}:1")
    assert task["launchType"] == "FARGATE"
    assert task["startedBy"] == "kdcube"
    assert {"key": "kdcube:run-id", "value": request.run_id} in task["tags"]
    override = override_of(task)
    assert override["name"] == CONTAINER
    assert override["command"] == ["python3", "-m", "kdcube.exec.task_runner"]
    assert override["memory"] == request.memory_mb + 128
    variables = {v["name"]: v["value"] for v in override["environment"]}
    assert variables["KDCUBE_EXEC_RUN_PREFIX"] == f"exec/{request.run_id}/"
    assert variables["KDCUBE_EXEC_TIMEOUT_S"] == "20"
    await check_network(aws, task)


async def check_network(aws: Aws, task: dict[str, Any]) -> None:
    [attachment] = task["attachments"]
    details = {d["name"]: d["value"] for d in attachment["details"]}
    assert details["subnetId"] == aws.subnet

    def groups() -> list[str]:
        eni = aws.client("ec2").describe_network_interfaces(
            NetworkInterfaceIds=[details["networkInterfaceId"]]
        )["NetworkInterfaces"][0]
        return [group["GroupId"] for group in eni["Groups"]]

    assert await anyio.to_thread.run_sync(groups) == [aws.security_group]


async def test_past_the_deadline_the_task_is_stopped(aws: Aws, cluster: str) -> None:
    async with httpx.AsyncClient() as http:
        executor = FargateExecutor(
            **executor_options(http, aws, cluster, startup_allowance_s=0)
        )
        result = await executor.run(ExecRequest("print(1)", timeout_s=0.3))

    assert result.timed_out and result.exit_code is None
    assert 0.3 <= result.duration_s < 5
    [task] = await tasks_of(aws, cluster)
    assert (task["lastStatus"], task["stoppedReason"]) == ("STOPPED", "exec-timeout")
    assert await keys_under(aws, f"exec/{result.run_id}/") == []


async def test_cancel_stops_the_task_at_once(
    executor: FargateExecutor, aws: Aws, cluster: str
) -> None:
    request = ExecRequest("print(1)")
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(executor.run, request)
        await started_task(aws, cluster)
        cancelled_at = time.monotonic()
        tasks.cancel_scope.cancel()

    # The run has stopped the task by the time the cancel is through; the
    # margin over moto's few milliseconds is for a busy machine.
    assert time.monotonic() - cancelled_at < 1.5
    [task] = await tasks_of(aws, cluster)
    assert (task["lastStatus"], task["stoppedReason"]) == ("STOPPED", "exec-cancelled")
    assert await keys_under(aws, f"exec/{request.run_id}/") == []


async def test_a_task_stopped_without_a_result_says_why(
    executor: FargateExecutor, aws: Aws, cluster: str
) -> None:
    async def kill_container() -> None:
        task = await started_task(aws, cluster)
        await stop(aws, cluster, task, "OutOfMemoryError: Container killed")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(kill_container)
        result = await executor.run(ExecRequest("print(1)"))

    assert result.exit_code is None and not result.timed_out
    assert b"stopped without a result: OutOfMemoryError" in result.stderr
    assert await keys_under(aws, f"exec/{result.run_id}/") == []


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("cluster", "no-such-cluster", "ClusterNotFoundException"),
        ("task_definition", "no-such-family", "check the task definition"),
    ],
)
async def test_run_task_refusals_are_exec_errors(
    aws: Aws, cluster: str, option: str, value: str, said: str
) -> None:
    request = ExecRequest("print(1)")
    async with httpx.AsyncClient() as http:
        executor = FargateExecutor(
            **executor_options(http, aws, cluster, **{option: value})
        )
        with pytest.raises(ExecError, match="ECS refused to start the task") as caught:
            await executor.run(request)

    assert said in str(caught.value)
    assert await keys_under(aws, f"exec/{request.run_id}/") == []


async def test_a_run_id_that_cannot_name_a_task_is_refused(
    executor: FargateExecutor,
) -> None:
    with pytest.raises(ExecError, match="cannot name an ECS task"):
        await executor.run(ExecRequest("print(1)", run_id="a/b"))


def test_a_task_that_never_ran_failed_to_start() -> None:
    task = {
        "stoppedReason": "CannotPullContainerError: pull access denied",
        "stopCode": "TaskFailedToStart",
        "containers": [{"name": CONTAINER, "lastStatus": "STOPPED"}],
    }

    stopped = StoppedTask.from_description(task, CONTAINER)

    assert stopped.failed_to_start and not stopped.memory_exceeded
    assert stopped.explanation().startswith("CannotPullContainerError")


def test_a_container_killed_for_memory_ran() -> None:
    task = {
        "stoppedReason": "Essential container in task exited",
        "stopCode": "EssentialContainerExited",
        "containers": [
            {
                "name": CONTAINER,
                "exitCode": 137,
                "reason": "OutOfMemoryError: Container killed due to memory usage",
            }
        ],
    }

    stopped = StoppedTask.from_description(task, CONTAINER)

    assert not stopped.failed_to_start and stopped.memory_exceeded
    assert "container exit code 137" in stopped.explanation()
