"""The executors a deployment offers, and which one a bundle gets.

``KDCUBE_EXEC`` names the deployment's executor; a bundle may ask for
another in its registry entry (``config.execution.runtime.mode``). Each mode's
executor is made on first use and closed with the deployment. A mode this
deployment cannot provide (Fargate without its cluster settings, say) is
still handed out, as an executor whose every run fails with an ``ExecError``
that says what is missing, so the bundle's turn reports it rather than the
registry failing to load.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import structlog

from kdcube.config import ExecMode, Settings
from kdcube.exec.ports import ExecError, ExecRequest, ExecResult, Executor, OutputSink

if TYPE_CHECKING:
    from kdcube.storage import Storage

__all__ = ["Executors", "UnavailableExecutor", "open_executors"]

log = structlog.get_logger("kdcube.exec")

# The one mode whose programs run with this process's rights.
UNSANDBOXED: frozenset[ExecMode] = frozenset({"subprocess"})


@runtime_checkable
class _Closable(Protocol):
    async def aclose(self) -> None: ...


class UnavailableExecutor:
    """Stands in for a mode this deployment cannot provide."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def run(
        self, request: ExecRequest, *, on_output: OutputSink | None = None
    ) -> ExecResult:
        raise ExecError(self.reason)


class Executors:
    def __init__(self, settings: Settings, storage: Storage | None) -> None:
        self._settings = settings
        self._storage = storage
        self._made: dict[ExecMode, Executor] = {}
        self.default_mode: ExecMode = settings.exec or "off"

    def for_mode(self, mode: ExecMode | None) -> tuple[ExecMode, Executor] | None:
        """The executor for ``mode`` (the deployment's when None), with the
        mode it is; None when running code is off."""
        chosen = mode or self.default_mode
        if chosen == "off":
            return None
        if chosen not in self._made:
            self._made[chosen] = self._make(chosen)
        return chosen, self._made[chosen]

    def _make(self, mode: ExecMode) -> Executor:
        try:
            executor = _build(mode, self._settings, self._storage)
        except ExecError as error:
            log.warning("exec.mode_unavailable", mode=mode, reason=str(error))
            return UnavailableExecutor(str(error))
        log.info("exec.mode_ready", mode=mode, sandboxed=mode not in UNSANDBOXED)
        return executor

    async def aclose(self) -> None:
        made, self._made = self._made, {}
        for executor in made.values():
            if isinstance(executor, _Closable):
                await executor.aclose()


@asynccontextmanager
async def open_executors(
    settings: Settings, storage: Storage | None
) -> AsyncIterator[Executors]:
    executors = Executors(settings, storage)
    mode = executors.default_mode
    log.info("exec.default", mode=mode)
    if mode in UNSANDBOXED:
        log.warning(
            "exec.not_sandboxed",
            mode=mode,
            detail="programs bundles run have this process's user, files and"
            " network; KDCUBE_EXEC=local sandboxes them (needs bubblewrap:"
            " ops/exec/local.sh install)",
        )
    try:
        yield executors
    finally:
        await executors.aclose()


def _build(mode: ExecMode, settings: Settings, storage: Storage | None) -> Executor:
    # Imported per mode: each pulls in what only it needs.
    if mode == "subprocess":
        from kdcube.exec.subprocess import SubprocessExecutor

        return SubprocessExecutor()
    if mode == "local":
        from kdcube.exec.local import LocalSandboxExecutor

        return LocalSandboxExecutor()
    if mode == "docker":
        from kdcube.exec.docker import DockerExecutor

        return DockerExecutor(image=settings.exec_docker_image)
    assert mode == "fargate"
    return _fargate(settings, storage)


def _fargate(settings: Settings, storage: Storage | None) -> Executor:
    if not (
        settings.exec_fargate_cluster
        and settings.exec_fargate_task_definition
        and settings.exec_fargate_subnets
    ):
        raise ExecError(
            "the fargate executor is not configured on this server: set"
            " KDCUBE_EXEC_FARGATE_CLUSTER, KDCUBE_EXEC_FARGATE_TASK_DEFINITION"
            " and KDCUBE_EXEC_FARGATE_SUBNETS"
        )
    if storage is None or not settings.storage_url().startswith("s3://"):
        raise ExecError(
            "the fargate executor needs S3 storage (KDCUBE_STORAGE_PATH=s3://...)"
        )
    from kdcube.exec.fargate import FargateExecutor

    return FargateExecutor(
        cluster=settings.exec_fargate_cluster,
        task_definition=settings.exec_fargate_task_definition,
        container_name=settings.exec_fargate_container,
        subnets=list(settings.exec_fargate_subnets),
        security_groups=list(settings.exec_fargate_security_groups),
        assign_public_ip=settings.exec_fargate_assign_public_ip,
        storage=storage,
        storage_url=settings.storage_url(),
        storage_endpoint=settings.s3_endpoint_url,
        prefix=f"exec/{settings.tenant}/{settings.project}/",
        endpoint_url=settings.exec_fargate_endpoint_url,
        region=settings.exec_fargate_region,
    )
