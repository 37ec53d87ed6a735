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

import math
import sys
from pathlib import Path

import anyio
import anyio.to_thread

from kdcube.exec import workspace as workspaces
from kdcube.exec.child import run_child
from kdcube.exec.ports import (
    CODE_FILE,
    OUT_FOLDER,
    ExecRequest,
    ExecResult,
    MiB,
    OutputSink,
    finished,
)
from kdcube.exec.workspace import DEFAULT_OUT_CAPS, OutCaps

__all__ = ["SubprocessExecutor"]

LAUNCHER = Path(__file__).with_name("_launcher.py")
ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


class SubprocessExecutor:
    """Runs each request with ``python`` in a child process (see the module
    docstring for what that does and does not protect).

    ``root`` is where workspaces are made (the system's temporary folder by
    default). The caps below hold for every run: ``max_file_bytes`` per file
    the program writes, ``max_open_files``, ``max_processes`` it may add,
    and ``out_caps`` on what comes back from ``out/``.
    """

    def __init__(
        self,
        *,
        python: str = sys.executable,
        root: Path | None = None,
        max_file_bytes: int = 64 * MiB,
        max_open_files: int = 256,
        max_processes: int = 64,
        out_caps: OutCaps = DEFAULT_OUT_CAPS,
    ) -> None:
        self.python = python
        self.root = root
        self.max_file_bytes = max_file_bytes
        self.max_open_files = max_open_files
        self.max_processes = max_processes
        self.out_caps = out_caps

    async def run(
        self, request: ExecRequest, *, on_output: OutputSink | None = None
    ) -> ExecResult:
        # Shielded: a cancel arriving while the worker thread writes would
        # otherwise lose the workspace's path, and with it its removal.
        with anyio.CancelScope(shield=True):
            workspace = await anyio.to_thread.run_sync(
                workspaces.prepare, self.root, request
            )
        try:
            child = await run_child(
                self._command(request),
                request,
                cwd=workspace,
                env=ENVIRONMENT,
                on_output=on_output,
            )
            files, files_truncated = await anyio.to_thread.run_sync(
                workspaces.collect, workspace / OUT_FOLDER, self.out_caps
            )
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(workspaces.remove, workspace)
        return finished(child.result(request.run_id, files, files_truncated))

    def _command(self, request: ExecRequest) -> list[str]:
        # The launcher needs no site-packages. The program ignores PYTHON*
        # variables and the user's site folder but keeps the interpreter's
        # site-packages and its own folder on sys.path, so a developer's
        # installed libraries and the input .py files can be imported.
        launcher = [self.python, "-I", "-S", str(LAUNCHER), *self._limits(request)]
        program = [self.python, "-E", "-s", "-u", "-X", "utf8", CODE_FILE]
        return [*launcher, "--", *program]

    def _limits(self, request: ExecRequest) -> list[str]:
        limits = [
            request.memory_mb * MiB,
            # CPU time is a backstop behind the wall clock, which acts first.
            math.ceil(request.timeout_s) + 1,
            self.max_file_bytes,
            self.max_open_files,
            self.max_processes,
        ]
        return [str(limit) for limit in limits]
