"""The Fargate executor: each run is one ECS task, started with RunTask.

The workspace goes to storage as a tar archive under ``{prefix}{run_id}/``;
the task's container (``kdcube.exec.task_runner``) fetches it, runs the
program with the local subprocess executor's limits, and writes the result
and the ``out/`` files back next to it. The executor polls DescribeTasks
every ``poll_interval_s`` until the task (or its container) has stopped,
reads the result, replays the output to ``on_output`` once per stream, and
deletes the run's keys in every case.

Guarantees: the program's own time limit is kept inside the container; the
executor allows ``startup_allowance_s`` more for Fargate to provision the
task, and past that stops it (StopTask, reason ``exec-timeout``) and answers
``timed_out`` with no exit code. On the caller's cancel, or when polling
fails, the task is stopped (reason ``exec-cancelled`` or ``exec-failed``)
under a shield with its own time limit. RunTask carries a fresh
``clientToken``, so resending it after a lost answer never starts a second
task.

A task that stops without a result is told apart by what ECS says: when it
never ran (``stopCode`` ``TaskFailedToStart``, or no container exit code: a
missing image, no capacity for the ENI) the run could not take place, and
that is an ``ExecError``. When the container ran and ended without a result
(killed for memory, stopped by someone else) the program's end was not
observed: the answer is an ``ExecResult`` with no exit code and ECS's reason
in ``stderr`` (and ``memory_exceeded`` when ECS says OutOfMemoryError), as
the port asks for failures of the program.

Known shortcomings: output reaches ``on_output`` only after the run. The
container's memory is the request's ``memory_mb`` plus ``RUNNER_MEMORY_MB``
for the runner, and must fit in the task definition's memory. The task role
is reachable from the program (see ``task_runner``). The task's keys live
under one prefix per executor, not in the turn's ``executions/`` folder,
since a request does not carry its turn (the turn keeps each run's record
there itself). A task that outlives a crash of
this process ends when its program's time is up, and its keys stay behind
until a lifecycle rule removes them. An ECS task is slow to start (tens of
seconds), so this executor suits long runs rather than quick snippets.
"""

from __future__ import annotations

import re
import tarfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import httpx
import structlog

from kdcube.aws.credentials import NoCredentials
from kdcube.aws.json_api import DEFAULT_TIMEOUT, AwsError, AwsJsonClient
from kdcube.exec.ports import (
    ExecError,
    ExecRequest,
    ExecResult,
    OutputSink,
    finished,
)
from kdcube.exec.task_runner import (
    OUT_KEY,
    RESULT_KEY,
    WORKSPACE_KEY,
    RunnerSettings,
    decode_result,
)
from kdcube.exec.workspace import DEFAULT_OUT_CAPS, OutCaps, pack, unpack_out
from kdcube.storage.keys import check_key
from kdcube.storage.ports import ObjectNotFound, Storage, StorageError

__all__ = [
    "ECS_TARGET_PREFIX",
    "FargateExecutor",
    "StoppedTask",
    "open_ecs_client",
]

log = structlog.get_logger("kdcube.exec")

ECS_TARGET_PREFIX = "AmazonEC2ContainerServiceV20141113"
RUNNER_COMMAND = ("python3", "-m", "kdcube.exec.task_runner")
RUNNER_MEMORY_MB = 128
"""Added to the request's memory for the runner that shares the container."""

STARTED_BY = "kdcube"
RUN_ID_TAG = "kdcube:run-id"
TIMEOUT_REASON = "exec-timeout"
CANCEL_REASON = "exec-cancelled"
FAILURE_REASON = "exec-failed"
# StopTask and the removal of the run's keys, even under cancellation.
STOP_TIMEOUT_S = 10.0
CLEANUP_TIMEOUT_S = 10.0
# RunTask under a shield, so a cancel never leaves a task we cannot name.
START_TIMEOUT_S = 60.0

# A run id becomes a key segment and RunTask's referenceId.
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_REFUSED = frozenset({"AccessDenied", "AccessDeniedException"})


async def open_ecs_client(
    client: httpx.AsyncClient,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> AwsJsonClient:
    """An ECS client with credentials from botocore's chain."""
    return await AwsJsonClient.from_environment(
        client,
        service="ecs",
        target_prefix=ECS_TARGET_PREFIX,
        endpoint_url=endpoint_url,
        region=region,
    )


@dataclass(frozen=True, slots=True)
class StoppedTask:
    """What DescribeTasks says of a task that stopped, reduced to why."""

    reason: str
    stop_code: str
    exit_code: int | None
    container_reason: str

    @classmethod
    def from_description(cls, task: Mapping[str, Any], container: str) -> StoppedTask:
        found = [c for c in task.get("containers", []) if c.get("name") == container]
        described = found[0] if found else {}
        exit_code = described.get("exitCode")
        return cls(
            reason=str(task.get("stoppedReason") or ""),
            stop_code=str(task.get("stopCode") or ""),
            exit_code=exit_code if isinstance(exit_code, int) else None,
            container_reason=str(described.get("reason") or ""),
        )

    @property
    def memory_exceeded(self) -> bool:
        return "OutOfMemory" in self.container_reason

    @property
    def failed_to_start(self) -> bool:
        return self.stop_code == "TaskFailedToStart" or self.exit_code is None

    def explanation(self) -> str:
        said = [self.reason or "no reason given"]
        if self.stop_code:
            said.append(f"stop code {self.stop_code}")
        if self.exit_code is not None:
            said.append(f"container exit code {self.exit_code}")
        if self.container_reason:
            said.append(self.container_reason)
        return "; ".join(said)


class FargateExecutor:
    """Runs each request as one Fargate task of ``task_definition`` on
    ``cluster`` (see the module docstring for the guarantees).

    ``storage`` carries the workspace and the result, and ``storage_url``
    (with ``storage_endpoint`` for an S3-compatible server) is how the
    container opens the same storage. ECS is reached through ``ecs`` when
    given; otherwise through a client of the executor's own at
    ``endpoint_url`` (AWS's by default) in ``region``, with credentials from
    botocore's chain, closed by ``aclose``. ``container_name`` is the task
    definition's container that runs ``command``; ``subnets``, ``security_groups`` and
    ``assign_public_ip`` place the task's network interface.
    """

    def __init__(
        self,
        *,
        cluster: str,
        task_definition: str,
        subnets: Sequence[str],
        security_groups: Sequence[str],
        storage: Storage,
        storage_url: str,
        storage_endpoint: str | None = None,
        container_name: str = "exec",
        assign_public_ip: bool = False,
        ecs: AwsJsonClient | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        prefix: str = "exec/",
        poll_interval_s: float = 2.0,
        startup_allowance_s: float = 120.0,
        command: Sequence[str] = RUNNER_COMMAND,
        out_caps: OutCaps = DEFAULT_OUT_CAPS,
    ) -> None:
        if not subnets:
            raise ValueError("subnets must name at least one subnet for the task")
        if not prefix.endswith("/"):
            raise ValueError(f"prefix must end with '/', got {prefix!r}")
        check_key(prefix, prefix=True)
        if not poll_interval_s > 0:
            raise ValueError(
                f"poll_interval_s must be positive, got {poll_interval_s!r}"
            )

        self.cluster = cluster
        self.task_definition = task_definition
        self.subnets = list(subnets)
        self.security_groups = list(security_groups)
        self.storage = storage
        self.storage_url = storage_url
        self.storage_endpoint = storage_endpoint
        self.container_name = container_name
        self.assign_public_ip = assign_public_ip
        self.prefix = prefix
        self.poll_interval_s = poll_interval_s
        self.startup_allowance_s = startup_allowance_s
        self.command = list(command)
        self.out_caps = out_caps
        self._ecs = ecs
        self._endpoint_url = endpoint_url
        self._region = region
        # Only a client this executor made is its to close.
        self._http = (
            None if ecs is not None else httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)
        )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def _ecs_client(self) -> AwsJsonClient:
        if self._ecs is None:
            assert self._http is not None, "made with no ECS client of its own"
            try:
                self._ecs = await open_ecs_client(
                    self._http, endpoint_url=self._endpoint_url, region=self._region
                )
            except NoCredentials as exc:
                raise ExecError(f"cannot call ECS: {exc}") from exc
        return self._ecs

    async def run(
        self, request: ExecRequest, *, on_output: OutputSink | None = None
    ) -> ExecResult:
        folder = self._folder(request)
        try:
            await self._upload(folder, request)
            result = await self._run_task(folder, request)
        finally:
            await self._forget(folder, request)
        await _replay(result, on_output)
        return finished(result)

    def _folder(self, request: ExecRequest) -> str:
        if not _RUN_ID.fullmatch(request.run_id):
            raise ExecError(
                f"run id {request.run_id!r} cannot name an ECS task: use 1 to 64"
                " letters, digits, '-' or '_'"
            )
        return f"{self.prefix}{request.run_id}/"

    async def _upload(self, folder: str, request: ExecRequest) -> None:
        archive = await anyio.to_thread.run_sync(pack, request)
        with _storage_errors("upload the workspace of", request):
            await self.storage.put(folder + WORKSPACE_KEY, archive)

    async def _run_task(self, folder: str, request: ExecRequest) -> ExecResult:
        started = time.monotonic()
        arn = await self._start(folder, request)
        try:
            task = await self._wait(arn, request)
        except anyio.get_cancelled_exc_class():
            await self._stop(arn, request, CANCEL_REASON)
            raise
        except BaseException:
            await self._stop(arn, request, FAILURE_REASON)
            raise

        elapsed_s = time.monotonic() - started
        if task is None:
            return _timed_out(request, elapsed_s)
        return await self._outcome(folder, request, task, elapsed_s)

    async def _start(self, folder: str, request: ExecRequest) -> str:
        payload = self._run_task_payload(folder, request)
        with anyio.move_on_after(START_TIMEOUT_S, shield=True):
            try:
                ecs = await self._ecs_client()
                answer = await ecs.call("RunTask", payload)
            except AwsError as exc:
                raise ExecError(self._refusal(request, exc)) from exc
            tasks = answer.get("tasks") or []
            if not tasks:
                raise ExecError(self._failure(request, answer.get("failures") or []))
            arn = str(tasks[0]["taskArn"])
            log.info(
                "exec.started",
                run_id=request.run_id,
                task=arn,
                timeout_s=request.timeout_s,
                memory_mb=request.memory_mb,
            )
            return arn
        raise ExecError(
            f"ECS did not answer RunTask for run {request.run_id} within"
            f" {START_TIMEOUT_S:g}s; check the ECS endpoint and the network"
        )

    def _run_task_payload(self, folder: str, request: ExecRequest) -> dict[str, Any]:
        settings = RunnerSettings(
            storage_url=self.storage_url,
            storage_endpoint=self.storage_endpoint,
            run_prefix=folder,
            run_id=request.run_id,
            timeout_s=request.timeout_s,
            memory_mb=request.memory_mb,
            max_output_bytes=request.max_output_bytes,
            out_files=self.out_caps.files,
            out_bytes=self.out_caps.bytes,
        )
        environment = [
            {"name": name, "value": value}
            for name, value in settings.environment().items()
        ]
        container = {
            "name": self.container_name,
            "command": self.command,
            "environment": environment,
            "memory": request.memory_mb + RUNNER_MEMORY_MB,
        }
        network = {
            "subnets": self.subnets,
            "securityGroups": self.security_groups,
            "assignPublicIp": "ENABLED" if self.assign_public_ip else "DISABLED",
        }
        return {
            "cluster": self.cluster,
            "taskDefinition": self.task_definition,
            "launchType": "FARGATE",
            "count": 1,
            "startedBy": STARTED_BY,
            "referenceId": request.run_id,
            "clientToken": uuid.uuid4().hex,
            "tags": [{"key": RUN_ID_TAG, "value": request.run_id}],
            "networkConfiguration": {"awsvpcConfiguration": network},
            "overrides": {"containerOverrides": [container]},
        }

    def _refusal(self, request: ExecRequest, error: AwsError) -> str:
        where = f"ECS refused to start the task for run {request.run_id}"
        if error.code in _REFUSED:
            hint = (
                "the caller needs ecs:RunTask and ecs:TagResource on the task"
                " definition and iam:PassRole on its roles"
            )
        elif error.code == "ClusterNotFoundException":
            hint = f"check the cluster name ({self.cluster!r})"
        elif error.code in ("ClientException", "InvalidParameterException"):
            hint = (
                f"check the task definition ({self.task_definition!r}), the"
                f" container name ({self.container_name!r}), the subnets and"
                " security groups, and that the memory fits the task definition"
            )
        else:
            hint = "see the error above"
        return f"{where} ({error.code}: {error.message}); {hint}"

    def _failure(self, request: ExecRequest, failures: list[dict[str, Any]]) -> str:
        reasons = [
            f"{f.get('reason', 'unknown')}"
            + (f" ({f['detail']})" if f.get("detail") else "")
            for f in failures
        ]
        said = ", ".join(reasons) or "no task and no failure in the answer"
        where = f"ECS could not start the task for run {request.run_id}: {said}"
        if any(r.startswith("RESOURCE:") for r in reasons):
            return f"{where}; Fargate has no capacity for it now, try again later"
        return where

    async def _wait(self, arn: str, request: ExecRequest) -> dict[str, Any] | None:
        """The task's description once it stopped, or None when it ran past
        its deadline and was stopped."""
        with anyio.move_on_after(request.timeout_s + self.startup_allowance_s):
            return await self._until_stopped(arn, request)
        log.info("exec.killed", run_id=request.run_id, task=arn, reason="timeout")
        await self._stop(arn, request, TIMEOUT_REASON)
        return None

    async def _until_stopped(self, arn: str, request: ExecRequest) -> dict[str, Any]:
        while True:
            await anyio.sleep(self.poll_interval_s)
            task = await self._describe(arn, request)
            # Missing: ECS may not list a task just started; keep asking
            # until the deadline.
            if task is not None and self._has_stopped(task):
                return task

    async def _describe(self, arn: str, request: ExecRequest) -> dict[str, Any] | None:
        try:
            ecs = await self._ecs_client()
            answer = await ecs.call(
                "DescribeTasks", {"cluster": self.cluster, "tasks": [arn]}
            )
        except AwsError as exc:
            raise ExecError(
                f"lost track of the ECS task of run {request.run_id} ({exc})"
            ) from exc
        tasks = answer.get("tasks") or []
        return dict(tasks[0]) if tasks else None

    def _has_stopped(self, task: Mapping[str, Any]) -> bool:
        # The container stops well before the task does (ECS still detaches
        # its network interface), and by then the result is written.
        if task.get("lastStatus") == "STOPPED":
            return True
        containers = task.get("containers", [])
        return any(
            c.get("name") == self.container_name and c.get("lastStatus") == "STOPPED"
            for c in containers
        )

    async def _stop(self, arn: str, request: ExecRequest, reason: str) -> None:
        payload = {"cluster": self.cluster, "task": arn, "reason": reason}
        with anyio.move_on_after(STOP_TIMEOUT_S, shield=True) as scope:
            try:
                ecs = await self._ecs_client()
                await ecs.call("StopTask", payload)
            except AwsError as exc:
                _stop_failed(request, arn, str(exc))
        if scope.cancelled_caught:
            _stop_failed(request, arn, "timed out")

    async def _outcome(
        self,
        folder: str,
        request: ExecRequest,
        task: Mapping[str, Any],
        elapsed_s: float,
    ) -> ExecResult:
        with _storage_errors("read the result of", request):
            raw = await _read_if_there(self.storage, folder + RESULT_KEY)
            if raw is None:
                return self._without_result(request, task, elapsed_s)
            archive = await _read(self.storage, folder + OUT_KEY)
        try:
            files, truncated = await anyio.to_thread.run_sync(
                unpack_out, archive, self.out_caps
            )
        except tarfile.TarError as exc:
            raise ExecError(
                f"the out/ archive of run {request.run_id} is malformed ({exc})"
            ) from exc
        return decode_result(raw, request.run_id, files, truncated)

    def _without_result(
        self, request: ExecRequest, task: Mapping[str, Any], elapsed_s: float
    ) -> ExecResult:
        stopped = StoppedTask.from_description(task, self.container_name)
        if stopped.failed_to_start:
            raise ExecError(
                f"the ECS task of run {request.run_id} stopped before the program"
                f" ran: {stopped.explanation()}"
            )
        note = f"kdcube: the task stopped without a result: {stopped.explanation()}\n"
        return ExecResult(
            run_id=request.run_id,
            exit_code=None,
            stdout=b"",
            stderr=note.encode(),
            stdout_truncated=False,
            stderr_truncated=False,
            duration_s=elapsed_s,
            timed_out=False,
        )

    async def _forget(self, folder: str, request: ExecRequest) -> None:
        with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True) as scope:
            try:
                await self.storage.delete_prefix(folder)
            except StorageError as exc:
                _cleanup_failed(request, folder, str(exc))
        if scope.cancelled_caught:
            _cleanup_failed(request, folder, "timed out")


def _timed_out(request: ExecRequest, elapsed_s: float) -> ExecResult:
    return ExecResult(
        run_id=request.run_id,
        exit_code=None,
        stdout=b"",
        stderr=b"",
        stdout_truncated=False,
        stderr_truncated=False,
        duration_s=elapsed_s,
        timed_out=True,
    )


async def _read(storage: Storage, key: str) -> bytes:
    content = bytearray()
    async for chunk in storage.get(key):
        content += chunk
    return bytes(content)


async def _read_if_there(storage: Storage, key: str) -> bytes | None:
    try:
        return await _read(storage, key)
    except ObjectNotFound:
        return None


async def _replay(result: ExecResult, on_output: OutputSink | None) -> None:
    if on_output is None:
        return
    if result.stdout:
        await on_output("stdout", result.stdout)
    if result.stderr:
        await on_output("stderr", result.stderr)


@contextmanager
def _storage_errors(doing: str, request: ExecRequest) -> Iterator[None]:
    try:
        yield
    except StorageError as exc:
        raise ExecError(f"could not {doing} run {request.run_id}: {exc}") from exc


def _stop_failed(request: ExecRequest, arn: str, error: str) -> None:
    # The task then ends by itself when its program's time is up.
    log.warning("exec.stop_failed", run_id=request.run_id, task=arn, error=error)


def _cleanup_failed(request: ExecRequest, folder: str, error: str) -> None:
    log.warning(
        "exec.cleanup_failed", run_id=request.run_id, prefix=folder, error=error
    )
