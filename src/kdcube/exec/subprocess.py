"""The simplest executor: the program runs as a child process of this one.

This executor is NOT a sandbox: the program has the network, can read and
write every file this process can, and runs as the same user; it is meant for
``kdcube run`` on a developer's machine, and the sandboxed executors come with
the exec runtime.

What it does give is containment of mistakes. Each run gets a fresh temporary
workspace (its working directory, holding the input files and an empty
``out/``) that is removed afterwards. The program runs in a session and process
group of its own, with an environment of only PATH and LANG, under resource
limits set by a tiny launcher before it becomes the interpreter (address
space, CPU seconds, file size, open files, processes). Its output is read as
it comes and kept up to the request's cap; the rest is read and dropped, so
the program never stalls on a full pipe. At the time limit, on the caller's
cancel, and when the program exits, the whole process group gets SIGKILL, so
children it forked go with it.

Known shortcomings: a child that starts a session of its own (``setsid``)
leaves the process group and survives the run. RLIMIT_NPROC does not apply to
root, so a fork bomb run as root is stopped only by the time limit. RLIMIT_AS
counts reserved address space, so programs that map much more than they touch
(some numeric libraries) fail below ``memory_mb`` of real use. The workspace's
total size is not capped, only each file's. The input files are written and
the ``out/`` files read in a worker thread, all held in memory.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import structlog
from anyio.abc import ByteReceiveStream, Process

from kdcube.exec.ports import (
    CODE_FILE,
    OUT_FOLDER,
    ExecError,
    ExecRequest,
    ExecResult,
    MiB,
    OutputSink,
    StreamName,
)

__all__ = ["SubprocessExecutor"]

log = structlog.get_logger("kdcube.exec")

LAUNCHER = Path(__file__).with_name("_launcher.py")
ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

# After the program ends, output still in the pipes is read for this long; a
# straggler that left the process group and holds a pipe must not hold the run.
DRAIN_S = 1.0
# Killing, reaping and removing the workspace, even under cancellation.
CLEANUP_S = 5.0


class SubprocessExecutor:
    """Runs each request with ``python`` in a child process (see the module
    docstring for what that does and does not protect).

    ``root`` is where workspaces are made (the system's temporary folder by
    default). The caps below hold for every run: ``max_file_bytes`` per file
    the program writes, ``max_open_files``, ``max_processes`` it may add,
    and at most ``max_out_files`` files of ``max_out_bytes`` in all returned
    from ``out/``.
    """

    def __init__(
        self,
        *,
        python: str = sys.executable,
        root: Path | None = None,
        max_file_bytes: int = 64 * MiB,
        max_open_files: int = 256,
        max_processes: int = 64,
        max_out_files: int = 100,
        max_out_bytes: int = 16 * MiB,
    ) -> None:
        self.python = python
        self.root = root
        self.max_file_bytes = max_file_bytes
        self.max_open_files = max_open_files
        self.max_processes = max_processes
        self.max_out_files = max_out_files
        self.max_out_bytes = max_out_bytes

    async def run(
        self, request: ExecRequest, *, on_output: OutputSink | None = None
    ) -> ExecResult:
        # Shielded: a cancel arriving while the worker thread writes would
        # otherwise lose the workspace's path, and with it its removal.
        with anyio.CancelScope(shield=True):
            workspace = await anyio.to_thread.run_sync(self._prepare, request)
        try:
            return await self._run_in(workspace, request, on_output)
        finally:
            with anyio.CancelScope(shield=True):
                remove = functools.partial(shutil.rmtree, workspace, ignore_errors=True)
                await anyio.to_thread.run_sync(remove)

    def _prepare(self, request: ExecRequest) -> Path:
        workspace = Path(
            tempfile.mkdtemp(
                prefix=f"kdcube-exec-{request.run_id[:16]}-", dir=self.root
            )
        )
        try:
            (workspace / OUT_FOLDER).mkdir()
            (workspace / CODE_FILE).write_text(request.code, encoding="utf-8")
            for name, content in request.files.items():
                target = workspace / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
        except BaseException:
            shutil.rmtree(workspace, ignore_errors=True)
            raise
        return workspace

    async def _run_in(
        self, workspace: Path, request: ExecRequest, on_output: OutputSink | None
    ) -> ExecResult:
        process = await self._start(workspace, request)
        started = time.monotonic()
        log.info(
            "exec.started",
            run_id=request.run_id,
            pid=process.pid,
            timeout_s=request.timeout_s,
            memory_mb=request.memory_mb,
        )
        stdout = _Capture(request.max_output_bytes)
        stderr = _Capture(request.max_output_bytes)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_pump, process.stdout, stdout, "stdout", on_output)
                tasks.start_soon(_pump, process.stderr, stderr, "stderr", on_output)
                finished = await _wait(process, request.timeout_s)
                duration_s = time.monotonic() - started
                if not finished:
                    log.info(
                        "exec.killed",
                        run_id=request.run_id,
                        pid=process.pid,
                        reason="timeout",
                    )

                # Children the program left behind go too, which also closes
                # their ends of the pipes.
                _kill_group(process.pid)
                tasks.cancel_scope.deadline = anyio.current_time() + DRAIN_S
        except anyio.get_cancelled_exc_class():
            if process.returncode is None:
                log.info(
                    "exec.killed",
                    run_id=request.run_id,
                    pid=process.pid,
                    reason="cancelled",
                )
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await _stop(process)

        files, files_truncated = await anyio.to_thread.run_sync(
            self._collect, workspace / OUT_FOLDER
        )
        result = ExecResult(
            run_id=request.run_id,
            exit_code=process.returncode,
            stdout=bytes(stdout.data),
            stderr=bytes(stderr.data),
            stdout_truncated=stdout.truncated,
            stderr_truncated=stderr.truncated,
            duration_s=duration_s,
            timed_out=not finished,
            files=files,
            files_truncated=files_truncated,
        )
        log.info(
            "exec.finished",
            run_id=request.run_id,
            exit_code=result.exit_code,
            duration_s=round(duration_s, 3),
            timed_out=result.timed_out,
            stdout_bytes=len(result.stdout),
            stderr_bytes=len(result.stderr),
            truncated=result.stdout_truncated or result.stderr_truncated,
            files=len(files),
        )
        return result

    async def _start(self, workspace: Path, request: ExecRequest) -> Process:
        # Shielded for the same reason: the child is spawned in a worker
        # thread, and a cancel arriving meanwhile would orphan it.
        with anyio.CancelScope(shield=True):
            try:
                process = await anyio.open_process(
                    self._command(request),
                    stdin=subprocess.DEVNULL,
                    cwd=workspace,
                    env=ENVIRONMENT,
                    start_new_session=True,
                )
            except OSError as error:
                raise ExecError(
                    f"could not start the interpreter {self.python!r}: {error}"
                ) from error
        return process

    def _command(self, request: ExecRequest) -> list[str]:
        limits = [
            request.memory_mb * MiB,
            # CPU time is a backstop behind the wall clock, which acts first.
            math.ceil(request.timeout_s) + 1,
            self.max_file_bytes,
            self.max_open_files,
            self.max_processes,
        ]
        # The launcher needs no site-packages. The program ignores PYTHON*
        # variables and the user's site folder but keeps the interpreter's
        # site-packages and its own folder on sys.path, so a developer's
        # installed libraries and the input .py files can be imported.
        launcher = [self.python, "-I", "-S", str(LAUNCHER), *map(str, limits), "--"]
        program = [self.python, "-E", "-s", "-u", "-X", "utf8", CODE_FILE]
        return launcher + program

    def _collect(self, out: Path) -> tuple[dict[str, bytes], bool]:
        """The regular files under ``out``, within the caps; symbolic links
        and special files are skipped."""
        files: dict[str, bytes] = {}
        total, truncated = 0, False
        for folder, subfolders, names in os.walk(out):
            subfolders.sort()
            for name in sorted(names):
                path = Path(folder) / name
                content = _read_regular(path, self.max_out_bytes - total)
                if content is None:
                    continue
                if len(files) >= self.max_out_files or len(content) > (
                    self.max_out_bytes - total
                ):
                    truncated = True
                    continue

                files[path.relative_to(out).as_posix()] = content
                total += len(content)
        return files, truncated


@dataclass
class _Capture:
    """What is kept of one output stream."""

    cap: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def keep(self, chunk: bytes) -> bytes:
        kept = chunk[: max(self.cap - len(self.data), 0)]
        if len(kept) < len(chunk):
            self.truncated = True
        self.data += kept
        return kept


async def _pump(
    stream: ByteReceiveStream | None,
    capture: _Capture,
    name: StreamName,
    on_output: OutputSink | None,
) -> None:
    assert stream is not None, "open_process was asked for a pipe"
    async for chunk in stream:
        kept = capture.keep(chunk)
        if kept and on_output is not None:
            await on_output(name, kept)


async def _wait(process: Process, timeout_s: float) -> bool:
    """Whether the program exited within ``timeout_s``."""
    with anyio.move_on_after(timeout_s):
        await process.wait()
        return True
    return False


def _kill_group(pid: int) -> None:
    # The program leads its own session, so its process group id is its pid.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        # Nothing is left of the group (or its id went to another user's).
        pass


async def _stop(process: Process) -> None:
    """Kill the program's group, reap it and close the pipes, within CLEANUP_S."""
    _kill_group(process.pid)
    with anyio.move_on_after(CLEANUP_S):
        await process.aclose()


def _read_regular(path: Path, limit: int) -> bytes | None:
    """The file's bytes (at most ``limit + 1`` of them, enough to tell it is
    over), or None when it is not a regular file."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with open(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return None
        return file.read(max(limit, 0) + 1)
