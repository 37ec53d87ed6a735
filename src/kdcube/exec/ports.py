"""The executor port: run a piece of Python somewhere and get its outcome back.

Every exec mode implements ``Executor``: the local subprocess one here, and the
sandboxed ones (bubblewrap, Docker, Fargate) that come with the exec runtime.
A run gets a fresh workspace holding the request's ``files``; it is the code's
working directory, and whatever the code leaves in the workspace's ``out/``
folder comes back in ``ExecResult.files``.

A failing program is not an error of the executor: a non-zero exit, a timeout
or a memory limit all come back as an ``ExecResult``. ``ExecError`` means the
run could not happen at all (a bad request, an interpreter that will not
start). Cancelling the awaiting task stops the program at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal, Protocol

import structlog

__all__ = [
    "MiB",
    "ExecError",
    "ExecRequest",
    "ExecResult",
    "Executor",
    "OutputSink",
    "StreamName",
    "finished",
    "from_shell_status",
]

log = structlog.get_logger("kdcube.exec")

MiB = 1024 * 1024
CODE_FILE = "main.py"
OUT_FOLDER = "out"

StreamName = Literal["stdout", "stderr"]

OutputSink = Callable[[StreamName, bytes], Awaitable[None]]
"""Receives the program's output while it runs, chunk by chunk, within the
output cap: what it receives is exactly what ``ExecResult`` will hold. An
executor that cannot stream live calls it once per stream after the run."""


class ExecError(Exception):
    """The run could not take place; the message says why."""


def _new_run_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """One program to run: its source, its input files and its limits.

    ``files`` maps relative POSIX paths in the workspace to their bytes.
    """

    code: str
    files: Mapping[str, bytes] = field(default_factory=dict)
    timeout_s: float = 30.0
    memory_mb: int = 256
    max_output_bytes: int = MiB
    run_id: str = field(default_factory=_new_run_id)

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s!r}")
        if self.memory_mb < 32:
            raise ValueError(
                f"memory_mb must be at least 32 (an interpreter needs that much),"
                f" got {self.memory_mb!r}"
            )
        if self.max_output_bytes < 0:
            raise ValueError(
                f"max_output_bytes must not be negative, got {self.max_output_bytes!r}"
            )
        for name in self.files:
            check_input_name(name)


def check_input_name(name: str) -> None:
    """Refuse an input file name that would land outside the workspace or
    over the program itself."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or name.endswith("/"):
        raise ExecError(
            f"input file {name!r} must be a relative path inside the workspace"
        )
    if path.parts[0] == CODE_FILE:
        raise ExecError(f"input file {name!r} would replace the program; rename it")


@dataclass(frozen=True, slots=True)
class ExecResult:
    """How a run ended.

    ``exit_code`` is the program's exit status, the negated signal number when
    a signal ended it (``-9`` after a kill), or None when its end could not be
    observed. ``files`` holds what the program wrote under ``out/``, keyed by
    the path relative to it; ``files_truncated`` says some were left out to
    keep within the executor's caps. ``memory_exceeded`` says the kernel
    killed the program for going over its memory limit, where the executor
    can tell.
    """

    run_id: str
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration_s: float
    timed_out: bool
    files: dict[str, bytes] = field(default_factory=dict)
    files_truncated: bool = False
    memory_exceeded: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class Executor(Protocol):
    async def run(
        self, request: ExecRequest, *, on_output: OutputSink | None = None
    ) -> ExecResult:
        """Run ``request`` to its end, its time limit or the caller's cancel."""
        ...


def finished(result: ExecResult) -> ExecResult:
    """Log the end of a run and hand its result back."""
    log.info(
        "exec.finished",
        run_id=result.run_id,
        exit_code=result.exit_code,
        duration_s=round(result.duration_s, 3),
        timed_out=result.timed_out,
        stdout_bytes=len(result.stdout),
        stderr_bytes=len(result.stderr),
        truncated=result.stdout_truncated or result.stderr_truncated,
        files=len(result.files),
    )
    return result


def from_shell_status(status: int | None) -> int | None:
    """An exit status as a shell (or a sandbox acting like one) reports it,
    in the port's terms: a status above 128 is read as the signal ``n`` that
    ended the program, ``-n``. A program that itself exits with 128 + n looks
    the same; no wrapper can tell them apart."""
    if status is not None and status > 128:
        return 128 - status
    return status
