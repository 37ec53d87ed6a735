"""Running a program as a child process of this one, for the executors that
run code on this machine: read its output as it comes, stop it at its time
limit or on the caller's cancel, and always reap it.

The child leads a session of its own, so its process group id is its pid and
one ``killpg`` reaches whatever it forked that stayed in the group. An
executor that confines the program further (a sandbox, a cgroup) passes a
``kill`` that reaches the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog
from anyio.abc import Process

from kdcube.exec.output import Capture, pump
from kdcube.exec.ports import ExecError, ExecRequest, ExecResult, OutputSink

__all__ = ["ChildRun", "kill_group", "run_child"]

log = structlog.get_logger("kdcube.exec")

# After the program ends, output still in the pipes is read for this long; a
# straggler that left the process group and holds a pipe must not hold the run.
DRAIN_S = 1.0
# Killing and reaping, even under cancellation.
CLEANUP_S = 5.0

Kill = Callable[[Process], None]


@dataclass(frozen=True, slots=True)
class ChildRun:
    """How the child ended and what it printed."""

    exit_code: int | None
    stdout: Capture
    stderr: Capture
    duration_s: float
    timed_out: bool

    def result(
        self,
        run_id: str,
        files: dict[str, bytes],
        files_truncated: bool,
        *,
        memory_exceeded: bool = False,
    ) -> ExecResult:
        """The run's result, with the ``out/`` files the executor collected."""
        return ExecResult(
            run_id=run_id,
            exit_code=self.exit_code,
            stdout=bytes(self.stdout.data),
            stderr=bytes(self.stderr.data),
            stdout_truncated=self.stdout.truncated,
            stderr_truncated=self.stderr.truncated,
            duration_s=self.duration_s,
            timed_out=self.timed_out,
            files=files,
            files_truncated=files_truncated,
            memory_exceeded=memory_exceeded,
        )


def kill_group(process: Process) -> None:
    """SIGKILL the child's process group."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        # Nothing is left of the group (or its id went to another user's).
        pass


async def run_child(
    command: Sequence[str],
    request: ExecRequest,
    *,
    cwd: Path,
    env: Mapping[str, str],
    on_output: OutputSink | None,
    kill: Kill = kill_group,
) -> ChildRun:
    """Run ``command`` for ``request`` until it exits, its time limit passes
    or the caller cancels; the child and what it left are killed in every case."""
    process = await _start(command, cwd, env)
    started = time.monotonic()
    log.info(
        "exec.started",
        run_id=request.run_id,
        pid=process.pid,
        timeout_s=request.timeout_s,
        memory_mb=request.memory_mb,
    )
    stdout = Capture(request.max_output_bytes)
    stderr = Capture(request.max_output_bytes)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(pump, process.stdout, stdout, "stdout", on_output)
            tasks.start_soon(pump, process.stderr, stderr, "stderr", on_output)
            finished = await _wait(process, request.timeout_s)
            duration_s = time.monotonic() - started
            if not finished:
                _log_kill(request, process, "timeout")

            # Whatever the program left behind goes too, which also closes
            # their ends of the pipes.
            kill(process)
            tasks.cancel_scope.deadline = anyio.current_time() + DRAIN_S
    except anyio.get_cancelled_exc_class():
        if process.returncode is None:
            _log_kill(request, process, "cancelled")
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(process, kill)

    return ChildRun(process.returncode, stdout, stderr, duration_s, not finished)


async def _start(command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> Process:
    # Shielded: the child is spawned in a worker thread, and a cancel
    # arriving meanwhile would orphan it.
    with anyio.CancelScope(shield=True):
        try:
            process = await anyio.open_process(
                list(command),
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
            )
        except OSError as error:
            raise ExecError(f"could not start {command[0]!r}: {error}") from error
    return process


async def _wait(process: Process, timeout_s: float) -> bool:
    """Whether the program exited within ``timeout_s``."""
    with anyio.move_on_after(timeout_s):
        await process.wait()
        return True
    return False


async def _stop(process: Process, kill: Kill) -> None:
    """Kill the child and what it left, reap it and close the pipes, within
    CLEANUP_S."""
    kill(process)
    with anyio.move_on_after(CLEANUP_S):
        await process.aclose()


def _log_kill(request: ExecRequest, process: Process, reason: str) -> None:
    log.info("exec.killed", run_id=request.run_id, pid=process.pid, reason=reason)
