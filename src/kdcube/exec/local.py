"""The local sandbox: the program runs on this machine inside bubblewrap,
as an unprivileged user, within a cgroup of its own.

What the sandbox guarantees, when this process runs as root on a machine
with writable cgroups:

- No network: the program has a network namespace of its own holding only a
  private loopback, so it reaches no host port and no other machine.
- It sees only the system folders the interpreter needs (``/usr`` and the
  ``/bin``, ``/lib``, ``/lib64``, ``/sbin`` beside it), read-only, plus a
  fresh ``/proc``, a minimal ``/dev``, a private ``/tmp`` and its workspace
  at ``/workspace``, the only place it may write that outlives the run. No
  ``/etc``, ``/root``, ``/home``, project or other workspace is visible.
- It runs as an unprivileged user (``nobody``, 65534, by default) with no
  supplementary groups, no capabilities, no way to gain privileges through
  set-user-id programs and no further user namespaces; its own pid, ipc, uts
  and cgroup namespaces hide the host's processes.
- Its memory (swap included) and its number of processes are capped by the
  run's cgroup; over the memory cap the kernel kills it and the result says
  ``memory_exceeded``. File size, open files and CPU seconds are capped by
  rlimits; wall time and output by the executor.
- At the time limit, on the caller's cancel and when the program exits,
  every process in the run's cgroup is killed, the cgroup is removed, and so
  is the workspace, whatever the outcome.

What it does not guarantee:

- It shares the host's kernel: a kernel exploit escapes it. There is no
  seccomp filter beyond the kernel's defaults.
- CPU time is not shared fairly: a run may take every core until its limits
  stop it. Disk use in the workspace is capped per file, not in total.
- Runs use the same uid, so one run may signal or ptrace another run's
  processes if it can find them (the pid namespaces hide them); give the
  executor a uid no other program uses for stronger separation.
- bubblewrap reports a program that a signal ended as a shell would, 128
  plus the signal; that is read back as the negated signal (-9 for SIGKILL,
  as when the executor kills it), so a program that itself exits with 128 + n
  looks the same.

Known shortcomings: where cgroups cannot be written (not root, or a
read-only ``/sys/fs/cgroup`` in a container), memory and process limits fall
back to rlimits: RLIMIT_AS (which counts reserved address space, not memory
used), and RLIMIT_NPROC, which counts all processes of the uid, so
concurrent runs share it; the executor logs ``exec.sandbox.no_cgroups`` once
when that happens. When this process is not root it cannot change user, and
the program runs as the same user inside the namespaces. bubblewrap's own
failures (user namespaces disabled by the kernel, say) come back as exit
code 1 with bubblewrap's message on stderr.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import stat
import sys
import tempfile
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread
import structlog
from anyio.abc import Process

from kdcube.exec import cgroups
from kdcube.exec import workspace as workspaces
from kdcube.exec.cgroups import Hierarchy, RunGroup
from kdcube.exec.child import kill_group, run_child
from kdcube.exec.ports import (
    CODE_FILE,
    OUT_FOLDER,
    ExecError,
    ExecRequest,
    ExecResult,
    MiB,
    OutputSink,
    finished,
    from_shell_status,
)
from kdcube.exec.workspace import DEFAULT_OUT_CAPS, OutCaps

__all__ = ["LocalSandboxExecutor"]

log = structlog.get_logger("kdcube.exec")

LAUNCHER = Path(__file__).with_name("_launcher.py")
ENVIRONMENT = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
SYSTEM_FOLDERS = ("/usr", "/bin", "/lib", "/lib64", "/sbin")
SANDBOX_WORKSPACE = "/workspace"
# bubblewrap's monitor, the namespace's init and the program itself; the
# program's children come on top.
SANDBOX_PROCESSES = 3
# Waiting for the killed processes to leave the cgroup so it can be removed.
DISPOSE_S = 2.0
DISPOSE_POLL_S = 0.005


class LocalSandboxExecutor:
    """Runs each request with ``python`` inside bubblewrap (see the module
    docstring for what that does and does not protect).

    ``root`` is where workspaces are made (the system's temporary folder by
    default); the sandbox's user must be able to search every folder on its
    path. ``python`` must live in the system folders the sandbox shows.
    The program runs as ``uid``/``gid`` when this process is root. The caps
    below hold for every run: ``max_file_bytes`` per file the program
    writes, ``max_open_files``, ``max_processes`` it may add, and
    ``out_caps`` on what comes back from ``out/``. ``cgroup_root`` is where
    the cgroup hierarchies are mounted.
    """

    def __init__(
        self,
        *,
        python: str = "/usr/bin/python3",
        root: Path | None = None,
        uid: int = 65534,
        gid: int = 65534,
        max_file_bytes: int = 64 * MiB,
        max_open_files: int = 256,
        max_processes: int = 64,
        out_caps: OutCaps = DEFAULT_OUT_CAPS,
        cgroup_root: Path = cgroups.DEFAULT_ROOT,
    ) -> None:
        self.python = python
        self.root = root
        self.uid = uid
        self.gid = gid
        self.max_file_bytes = max_file_bytes
        self.max_open_files = max_open_files
        self.max_processes = max_processes
        self.out_caps = out_caps
        self._bwrap = shutil.which("bwrap")
        self._hierarchy = cgroups.find(cgroup_root)
        if self._hierarchy is None:
            log.warning(
                "exec.sandbox.no_cgroups",
                cgroup_root=str(cgroup_root),
                detail="cgroups are not writable here: memory and process"
                " limits fall back to rlimits (address space, processes per uid)",
            )

    @property
    def cgroups(self) -> Hierarchy | None:
        """Where the runs' cgroups go, or None when limits are rlimits only."""
        return self._hierarchy

    async def run(
        self, request: ExecRequest, *, on_output: OutputSink | None = None
    ) -> ExecResult:
        bwrap = self._tools()
        # Shielded: a cancel arriving while the worker thread writes would
        # otherwise lose the workspace's path, and with it its removal.
        with anyio.CancelScope(shield=True):
            workspace = await anyio.to_thread.run_sync(self._prepare, request)
        try:
            program = [self.python, "-E", "-s", "-u", "-X", "utf8", CODE_FILE]
            command = [bwrap, *self._sandbox(request, workspace), "--", *program]
            result = await self._run_in(workspace, command, request, on_output)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(workspaces.remove, workspace)
        return finished(result)

    def _tools(self) -> str:
        """bubblewrap's path, once bubblewrap and the interpreter are known
        to be there."""
        if self._bwrap is None:
            raise ExecError(
                "bubblewrap (bwrap) is not installed, and the local sandbox needs"
                " it: install Debian's bubblewrap package (ops/exec/local.sh install)"
            )
        if not _under_system_folders(self.python):
            raise ExecError(
                f"python {self.python!r} must be an interpreter under"
                f" {', '.join(SYSTEM_FOLDERS)}, the folders the sandbox shows"
            )
        return self._bwrap

    def _prepare(self, request: ExecRequest) -> Path:
        # bubblewrap binds the workspace as the sandbox's user, so that user
        # must be able to reach it (bwrap --bind-fd resolves the path too).
        root = self.root or Path(tempfile.gettempdir())
        if self._changes_user and not _searchable(root, self.uid, self.gid):
            raise ExecError(
                f"workspace root {str(root)!r} is not reachable by uid {self.uid}:"
                " every folder on its path must be searchable by that user"
                " (chmod o+x), or pick another root"
            )
        return workspaces.prepare(self.root, request, shared=True)

    @property
    def _changes_user(self) -> bool:
        # Changing user needs root.
        return os.geteuid() == 0

    async def _run_in(
        self,
        workspace: Path,
        sandbox: list[str],
        request: ExecRequest,
        on_output: OutputSink | None,
    ) -> ExecResult:
        group = self._group_for(request)
        try:
            child = await run_child(
                [*self._launcher(request, group), "--", *sandbox],
                request,
                cwd=workspace,
                env=ENVIRONMENT,
                on_output=on_output,
                kill=partial(_kill, group),
            )
            memory_exceeded = group is not None and group.memory_exceeded()
        finally:
            if group is not None:
                with anyio.CancelScope(shield=True):
                    await _dispose(group, request)
        if memory_exceeded:
            log.info("exec.sandbox.memory_exceeded", run_id=request.run_id)
        # The run's processes are gone by now (its cgroup is empty, its pid
        # namespace ended with bubblewrap), so none can swap out/ meanwhile.
        files, files_truncated = await anyio.to_thread.run_sync(
            workspaces.collect, workspace / OUT_FOLDER, self.out_caps
        )
        result = child.result(
            request.run_id, files, files_truncated, memory_exceeded=memory_exceeded
        )
        return dataclasses.replace(
            result, exit_code=from_shell_status(result.exit_code)
        )

    def _group_for(self, request: ExecRequest) -> RunGroup | None:
        if self._hierarchy is None:
            return None
        try:
            group = self._hierarchy.create(request.run_id)
        except OSError as error:
            raise ExecError(f"could not make the run's cgroup: {error}") from error
        try:
            group.limit(
                memory_bytes=request.memory_mb * MiB,
                processes=self.max_processes + SANDBOX_PROCESSES,
            )
        except BaseException as error:
            group.remove()
            if isinstance(error, OSError):
                raise ExecError(f"could not limit the run's cgroup: {error}") from error
            raise
        return group

    def _launcher(self, request: ExecRequest, group: RunGroup | None) -> list[str]:
        """The launcher and its arguments, up to the ``--`` before bubblewrap.
        It joins the run's cgroups first, so every process of the run starts
        inside them, and changes user last, just before bubblewrap starts."""
        launcher = [sys.executable, "-I", "-S", str(LAUNCHER)]
        if group is not None:
            for procs in group.procs_files:
                launcher += ["--join", str(procs)]
        # The user changes outside bubblewrap: bwrap --uid, run as root, only
        # names root differently inside a user namespace, so the program would
        # still be root on the host, where RLIMIT_NPROC does not apply.
        if self._changes_user:
            launcher += ["--user", f"{self.uid}:{self.gid}"]
        return [*launcher, *self._limits(request)]

    def _limits(self, request: ExecRequest) -> list[str]:
        limits = [
            # With a cgroup, memory is the cgroup's to cap: the address space
            # stays unlimited, since it counts reservations, not use.
            0 if self._hierarchy else request.memory_mb * MiB,
            # CPU time is a backstop behind the wall clock, which acts first.
            math.ceil(request.timeout_s) + 1,
            self.max_file_bytes,
            self.max_open_files,
            # With a cgroup, its pids.max caps this run alone. RLIMIT_NPROC
            # counts every process of the uid, which all runs share, so under
            # it concurrent runs would starve each other of forks.
            0 if self._hierarchy else self.max_processes + SANDBOX_PROCESSES,
        ]
        return [str(limit) for limit in limits]

    def _sandbox(self, request: ExecRequest, workspace: Path) -> list[str]:
        """bubblewrap's options for a run of ``request``."""
        namespaces = [
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
        ]
        environment = ["--clearenv"]
        for name, value in ENVIRONMENT.items():
            environment += ["--setenv", name, value]
        mounts = [
            *_system_mounts(),
            *("--proc", "/proc", "--dev", "/dev"),
            *("--size", str(request.memory_mb * MiB), "--tmpfs", "/tmp"),
            *("--bind", str(workspace), SANDBOX_WORKSPACE),
            *("--chdir", SANDBOX_WORKSPACE),
            # bubblewrap's root is a writable tmpfs; only /tmp and the
            # workspace are meant to be.
            *("--remount-ro", "/"),
        ]
        return [*namespaces, *environment, *mounts]


def _system_mounts() -> list[str]:
    """Read-only binds of the system folders; those that are symbolic links
    (``/bin`` to ``usr/bin`` on a merged-usr system) are links here too."""
    mounts: list[str] = []
    for folder in SYSTEM_FOLDERS:
        path = Path(folder)
        if path.is_symlink():
            mounts += ["--symlink", os.readlink(path), folder]
        elif path.is_dir():
            mounts += ["--ro-bind", folder, folder]
    return mounts


def _under_system_folders(python: str) -> bool:
    path = Path(python)
    return path.is_absolute() and any(
        path.is_relative_to(folder) for folder in SYSTEM_FOLDERS
    )


def _searchable(folder: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` may reach ``folder`` (and so what is in it)."""
    for step in [folder.resolve(), *folder.resolve().parents]:
        info = step.stat()
        if info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


def _kill(group: RunGroup | None, process: Process) -> None:
    """SIGKILL bubblewrap's process group and everything in the run's cgroup."""
    kill_group(process)
    if group is not None:
        group.kill()


async def _dispose(group: RunGroup, request: ExecRequest) -> None:
    """Kill what is left in the run's cgroups until they can be removed."""
    with anyio.move_on_after(DISPOSE_S):
        while True:
            group.kill()
            if group.remove():
                return
            await anyio.sleep(DISPOSE_POLL_S)
    log.warning(
        "exec.sandbox.cgroup_left",
        run_id=request.run_id,
        cgroups=[str(folder) for folder in group.folders],
        pids=sorted(group.pids()),
    )
