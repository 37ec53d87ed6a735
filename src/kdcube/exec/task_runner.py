"""The Fargate executor's container entry point: ``python -m kdcube.exec.task_runner``.

The executor hands a run over through storage and the environment
(``RunnerSettings``): the runner downloads the workspace archive from
``{run}input/workspace.tar``, runs ``main.py`` with the local subprocess
executor (so time limit, output caps, resource limits and the bare
environment are the same as for a local run), then uploads ``out/`` as
``{run}output/out.tar`` and, last, ``{run}output/result.json``. The result
is written last so that its presence means the run is complete. When the
run cannot take place (an unreadable archive, a bad input name) the result
holds ``error`` instead, for the executor to raise as ``ExecError``.

The archive is never extracted as is: each member must be a regular file or
a folder with a relative name inside the workspace, and its bytes go through
the same checks as a request's input files.

Known shortcomings: the program runs in the runner's container, as the same
user; its environment holds no AWS credentials, but the task role's
credentials remain reachable from inside the container, so the role should
allow nothing beyond the executor's storage prefix. The container's memory
limit covers the runner as well as the program.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import anyio
import structlog

from kdcube.exec.ports import CODE_FILE, OUT_FOLDER, ExecError, ExecRequest, ExecResult
from kdcube.exec.subprocess import SubprocessExecutor
from kdcube.exec.workspace import OutCaps
from kdcube.storage.open import open_storage
from kdcube.storage.ports import Storage, StorageError

__all__ = [
    "OUT_KEY",
    "RESULT_KEY",
    "WORKSPACE_KEY",
    "RunnerSettings",
    "decode_result",
    "main",
]

log = structlog.get_logger("kdcube.exec")

WORKSPACE_KEY = "input/workspace.tar"
OUT_KEY = "output/out.tar"
RESULT_KEY = "output/result.json"

_PREFIX = "KDCUBE_EXEC_"


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """What the runner needs to know, passed as ``KDCUBE_EXEC_*`` variables.

    ``run_prefix`` is the run's folder (ending in ``/``) in the storage that
    ``storage_url`` names; ``storage_endpoint`` points ``s3://`` at an
    S3-compatible server.
    """

    storage_url: str
    run_prefix: str
    run_id: str
    timeout_s: float
    memory_mb: int
    max_output_bytes: int
    out_files: int
    out_bytes: int
    storage_endpoint: str | None = None

    def environment(self) -> dict[str, str]:
        variables = {
            "STORAGE_URL": self.storage_url,
            "RUN_PREFIX": self.run_prefix,
            "RUN_ID": self.run_id,
            "TIMEOUT_S": repr(self.timeout_s),
            "MEMORY_MB": str(self.memory_mb),
            "MAX_OUTPUT_BYTES": str(self.max_output_bytes),
            "OUT_FILES": str(self.out_files),
            "OUT_BYTES": str(self.out_bytes),
        }
        if self.storage_endpoint:
            variables["STORAGE_ENDPOINT"] = self.storage_endpoint
        return {_PREFIX + name: value for name, value in variables.items()}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> RunnerSettings:
        def get(name: str) -> str:
            try:
                return environ[_PREFIX + name]
            except KeyError:
                raise SystemExit(f"task_runner: {_PREFIX}{name} is not set") from None

        return cls(
            storage_url=get("STORAGE_URL"),
            run_prefix=get("RUN_PREFIX"),
            run_id=get("RUN_ID"),
            timeout_s=float(get("TIMEOUT_S")),
            memory_mb=int(get("MEMORY_MB")),
            max_output_bytes=int(get("MAX_OUTPUT_BYTES")),
            out_files=int(get("OUT_FILES")),
            out_bytes=int(get("OUT_BYTES")),
            storage_endpoint=environ.get(_PREFIX + "STORAGE_ENDPOINT") or None,
        )


def main() -> int:
    settings = RunnerSettings.from_environment(os.environ)
    return anyio.run(_serve, settings)


async def _serve(settings: RunnerSettings) -> int:
    async with open_storage(
        settings.storage_url, endpoint_url=settings.storage_endpoint
    ) as storage:
        try:
            result = await _run(storage, settings)
        except (ExecError, StorageError, tarfile.TarError, UnicodeDecodeError) as exc:
            log.warning("exec.runner_failed", run_id=settings.run_id, error=str(exc))
            await _put_result(storage, settings, {"error": str(exc)})
            return 1
        await storage.put(settings.run_prefix + OUT_KEY, _pack_out(result.files))
        await _put_result(storage, settings, _encode_result(result))
    return 0


async def _run(storage: Storage, settings: RunnerSettings) -> ExecResult:
    archive = bytearray()
    async for chunk in storage.get(settings.run_prefix + WORKSPACE_KEY):
        archive += chunk
    request = _request_from(bytes(archive), settings)
    caps = OutCaps(files=settings.out_files, bytes=settings.out_bytes)
    return await SubprocessExecutor(out_caps=caps).run(request)


def _request_from(archive: bytes, settings: RunnerSettings) -> ExecRequest:
    code: str | None = None
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        for member in tar:
            if member.isdir():
                continue
            name = _member_name(member)
            content = _read_member(tar, member)
            if name == CODE_FILE:
                code = content.decode("utf-8")
            else:
                files[name] = content
    if code is None:
        raise ExecError(f"the workspace archive has no {CODE_FILE}")
    return ExecRequest(
        code,
        files,
        timeout_s=settings.timeout_s,
        memory_mb=settings.memory_mb,
        max_output_bytes=settings.max_output_bytes,
        run_id=settings.run_id,
    )


def _member_name(member: tarfile.TarInfo) -> str:
    if not member.isreg():
        raise ExecError(f"workspace member {member.name!r} is not a regular file")
    # ExecRequest checks the name stays inside the workspace.
    return PurePosixPath(member.name).as_posix()


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = tar.extractfile(member)
    assert source is not None, "a regular member has content"
    return source.read()


def _pack_out(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            member = tarfile.TarInfo(f"{OUT_FOLDER}/{name}")
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
    return buffer.getvalue()


async def _put_result(
    storage: Storage, settings: RunnerSettings, document: dict[str, Any]
) -> None:
    await storage.put(settings.run_prefix + RESULT_KEY, json.dumps(document).encode())


def _encode_result(result: ExecResult) -> dict[str, Any]:
    return {
        "exit_code": result.exit_code,
        "stdout": base64.b64encode(result.stdout).decode(),
        "stderr": base64.b64encode(result.stderr).decode(),
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated,
        "duration_s": result.duration_s,
        "timed_out": result.timed_out,
        "files_truncated": result.files_truncated,
        "memory_exceeded": result.memory_exceeded,
    }


def decode_result(
    raw: bytes, run_id: str, files: dict[str, bytes], files_truncated: bool
) -> ExecResult:
    """The ``ExecResult`` of a ``result.json``, with the ``out/`` files read
    apart; raises ExecError for a runner's error or a malformed document."""
    try:
        document = json.loads(raw)
        if "error" in document:
            raise ExecError(
                f"the task runner could not run {run_id}: {document['error']}"
            )
        return ExecResult(
            run_id=run_id,
            exit_code=_optional_int(document["exit_code"]),
            stdout=base64.b64decode(document["stdout"], validate=True),
            stderr=base64.b64decode(document["stderr"], validate=True),
            stdout_truncated=bool(document["stdout_truncated"]),
            stderr_truncated=bool(document["stderr_truncated"]),
            duration_s=float(document["duration_s"]),
            timed_out=bool(document["timed_out"]),
            files=files,
            files_truncated=files_truncated or bool(document["files_truncated"]),
            memory_exceeded=bool(document.get("memory_exceeded", False)),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ExecError(
            f"the task runner's result for {run_id} is malformed ({exc!r})"
        ) from exc


def _optional_int(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"exit_code must be an integer or null, got {value!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
