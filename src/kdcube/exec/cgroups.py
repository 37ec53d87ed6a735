"""Control groups for sandboxed runs: one per run, holding a memory limit and
a process limit, and the means to kill everything in it.

Each run gets a cgroup named after its run id under a ``kdcube`` parent at
the top of the hierarchy: in v1, one in the ``memory`` and one in the
``pids`` hierarchy; in v2 (unified), one cgroup with both controllers. The
parent sits at the top rather than under this process's own cgroup because
v2 forbids processes in a cgroup whose children have controllers, and this
process lives in its own cgroup; it also leaves a supervisor's cgroups as
they were.

``find`` decides once whether cgroups can be used here at all; where they
cannot (not root, a read-only ``/sys/fs/cgroup`` in a container, a
controller missing), it returns None and the caller runs with rlimits only.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["DEFAULT_ROOT", "Hierarchy", "RunGroup", "find"]

DEFAULT_ROOT = Path("/sys/fs/cgroup")
PARENT = "kdcube"
PROCS = "cgroup.procs"
V1_CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """Where the runs' cgroups go: the ``kdcube`` parent in each hierarchy
    (memory then pids in v1, the one unified folder in v2)."""

    version: Literal[1, 2]
    parents: tuple[Path, ...]

    def create(self, run_id: str) -> RunGroup:
        """A fresh cgroup (one per hierarchy) for the run ``run_id``."""
        # A random tail keeps two runs given the same id apart, and makes any
        # id (even "..") a safe folder name.
        name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id)[:64]}-{secrets.token_hex(4)}"
        folders = tuple(parent / name for parent in self.parents)
        made: list[Path] = []
        try:
            for folder in folders:
                folder.mkdir()
                made.append(folder)
        except BaseException:
            for folder in made:
                _rmdir(folder)
            raise
        return RunGroup(self.version, folders)


def find(root: Path = DEFAULT_ROOT) -> Hierarchy | None:
    """The cgroup hierarchy under ``root`` this process may use, with its
    ``kdcube`` parents made, or None when there is none."""
    try:
        if all((root / name / PROCS).is_file() for name in V1_CONTROLLERS):
            return _v1(root)
        if _controllers(root) >= set(V1_CONTROLLERS):
            return _v2(root)
    except OSError:
        return None
    return None


def _v1(root: Path) -> Hierarchy | None:
    parents = tuple(root / name / PARENT for name in V1_CONTROLLERS)
    for parent in parents:
        if not _usable(parent):
            return None
    return Hierarchy(1, parents)


def _v2(root: Path) -> Hierarchy | None:
    parent = root / PARENT
    if not _usable(parent):
        return None
    # Children get a controller only when every ancestor hands it down.
    for folder in (root, parent):
        (folder / "cgroup.subtree_control").write_text("+memory +pids")
    return Hierarchy(2, (parent,))


def _usable(parent: Path) -> bool:
    """Whether runs' cgroups can be made in ``parent``, made if need be
    (another user, root say, may have made it before)."""
    parent.mkdir(exist_ok=True)
    return os.access(parent, os.W_OK | os.X_OK)


def _controllers(root: Path) -> set[str]:
    try:
        return set((root / "cgroup.controllers").read_text().split())
    except FileNotFoundError:
        return set()


@dataclass(frozen=True, slots=True)
class RunGroup:
    """The cgroup(s) of one run."""

    version: Literal[1, 2]
    folders: tuple[Path, ...]

    @property
    def procs_files(self) -> list[Path]:
        """The files a process writes its pid into to join the run."""
        return [folder / PROCS for folder in self.folders]

    def limit(self, *, memory_bytes: int, processes: int) -> None:
        """Cap the run's memory (swap included) and its number of tasks."""
        if self.version == 1:
            memory, pids = self.folders
            _write(memory / "memory.limit_in_bytes", memory_bytes)
            # Only when the kernel accounts swap; the limit must not be below
            # memory.limit_in_bytes, hence the order.
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", memory_bytes)
            _write(pids / "pids.max", processes)
        else:
            (folder,) = self.folders
            _write(folder / "memory.max", memory_bytes)
            if (folder / "memory.swap.max").exists():
                _write(folder / "memory.swap.max", 0)
            _write(folder / "pids.max", processes)

    def pids(self) -> set[int]:
        """Every process in the run now."""
        found: set[int] = set()
        for procs in self.procs_files:
            try:
                found.update(int(line) for line in procs.read_text().split())
            except FileNotFoundError:
                continue
        return found

    def kill(self) -> bool:
        """SIGKILL every process in the run; whether there was any."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        return bool(pids)

    def memory_exceeded(self) -> bool:
        """Whether the kernel killed a process of the run for memory."""
        if self.version == 1:
            events = self.folders[0] / "memory.oom_control"
        else:
            events = self.folders[0] / "memory.events"
        try:
            lines = events.read_text().splitlines()
        except FileNotFoundError:
            return False
        counts = dict(line.split(maxsplit=1) for line in lines if " " in line)
        return int(counts.get("oom_kill", "0")) > 0

    def remove(self) -> bool:
        """Remove the run's cgroups; whether all are gone. A cgroup still
        holding a process stays (EBUSY) until a later call."""
        return all(_rmdir(folder) for folder in self.folders)


def _write(path: Path, value: int) -> None:
    path.write_text(str(value))


def _rmdir(folder: Path) -> bool:
    try:
        folder.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
