"""A run's workspace: the folder the program starts in, and what comes back.

The workspace holds the program (``main.py``), the request's input files and
an empty ``out/``. Executors that run the program on this machine make it as
a folder (``prepare``) and read ``out/`` back from it (``collect``); those
that ship it elsewhere (a container, a cloud task) send it as a tar archive
(``pack``) and read ``out/`` from the archive that comes back
(``unpack_out``). Either way only regular files come back, within the
executor's ``OutCaps``: a symbolic link, a device or a path that climbs out
of ``out/`` is skipped, never followed.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kdcube.exec.ports import CODE_FILE, OUT_FOLDER, ExecRequest, MiB

__all__ = [
    "DEFAULT_OUT_CAPS",
    "OutCaps",
    "collect",
    "pack",
    "prepare",
    "remove",
    "unpack_out",
]

# Owner, group and others may read and write: the program may run as an
# unprivileged user other than the one that made the workspace.
SHARED_FOLDER_MODE = 0o777
SHARED_FILE_MODE = 0o666


@dataclass(frozen=True, slots=True)
class OutCaps:
    """How much of ``out/`` comes back: at most ``files`` files and ``bytes``
    bytes in all. Files past either cap are left out and the result says so."""

    files: int = 100
    bytes: int = 16 * MiB


DEFAULT_OUT_CAPS = OutCaps()


class _Gathered:
    """The ``out/`` files taken so far, within the caps."""

    def __init__(self, caps: OutCaps) -> None:
        self.caps = caps
        self.files: dict[str, bytes] = {}
        self.total = 0
        self.truncated = False

    @property
    def room(self) -> int:
        return self.caps.bytes - self.total

    def add(self, name: str, content: bytes) -> None:
        if len(self.files) >= self.caps.files or len(content) > self.room:
            self.truncated = True
            return
        self.files[name] = content
        self.total += len(content)


def prepare(root: Path | None, request: ExecRequest, *, shared: bool = False) -> Path:
    """Make a fresh workspace for ``request`` under ``root`` (the system's
    temporary folder when None) and return its path. ``shared`` opens it to
    every user, for a program that runs as another user."""
    workspace = Path(
        tempfile.mkdtemp(prefix=f"kdcube-exec-{request.run_id[:16]}-", dir=root)
    )
    try:
        _write(workspace, request)
        if shared:
            _share(workspace)
    except BaseException:
        shutil.rmtree(workspace, ignore_errors=True)
        raise
    return workspace


def _write(workspace: Path, request: ExecRequest) -> None:
    (workspace / OUT_FOLDER).mkdir()
    (workspace / CODE_FILE).write_text(request.code, encoding="utf-8")
    for name, content in request.files.items():
        target = workspace / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def _share(workspace: Path) -> None:
    for folder, _, names in os.walk(workspace):
        os.chmod(folder, SHARED_FOLDER_MODE)
        for name in names:
            os.chmod(Path(folder) / name, SHARED_FILE_MODE)


def remove(workspace: Path) -> None:
    shutil.rmtree(workspace, ignore_errors=True)


def collect(out: Path, caps: OutCaps) -> tuple[dict[str, bytes], bool]:
    """The regular files under the folder ``out``, keyed by their path
    relative to it, and whether some were left out."""
    gathered = _Gathered(caps)
    # The program may have swapped out/ for a link to a folder of the host;
    # this runs with more rights than the program had, so it must not follow.
    if out.is_symlink() or not out.is_dir():
        return gathered.files, gathered.truncated
    for folder, subfolders, names in os.walk(out):
        subfolders.sort()
        for name in sorted(names):
            path = Path(folder) / name
            content = _read_regular(path, gathered.room)
            if content is not None:
                gathered.add(path.relative_to(out).as_posix(), content)
    return gathered.files, gathered.truncated


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


def pack(request: ExecRequest, *, owner: tuple[int, int] | None = None) -> bytes:
    """The workspace of ``request`` as an uncompressed tar archive, its
    members relative to the workspace. ``owner`` (uid, gid) owns every member;
    by default root does, with modes open to every user."""
    uid, gid = owner or (0, 0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folders = {OUT_FOLDER}
        for name in request.files:
            folders.update(str(p) for p in PurePosixPath(name).parents if str(p) != ".")
        for folder in sorted(folders):
            tar.addfile(_member(folder, tarfile.DIRTYPE, SHARED_FOLDER_MODE, uid, gid))
        entries = {CODE_FILE: request.code.encode("utf-8"), **request.files}
        for name, content in entries.items():
            member = _member(name, tarfile.REGTYPE, SHARED_FILE_MODE, uid, gid)
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
    return buffer.getvalue()


def _member(name: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.mode = mode
    member.uid, member.gid = uid, gid
    return member


def unpack_out(
    archive: bytes, caps: OutCaps, *, top: str = OUT_FOLDER
) -> tuple[dict[str, bytes], bool]:
    """The regular files of a tar ``archive`` of the ``out/`` folder, whose
    members are named ``{top}/...`` (Docker names them after the folder it
    archived), and whether some were left out. Malformed archives are an
    ``tarfile.TarError`` for the caller to report."""
    gathered = _Gathered(caps)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
        for member in tar:
            name = _inside(member.name, top)
            if name is None or not member.isreg():
                continue
            if member.size > gathered.room:
                gathered.truncated = True
                continue
            source = tar.extractfile(member)
            if source is not None:
                gathered.add(name, source.read())
    return gathered.files, gathered.truncated


def _inside(name: str, top: str) -> str | None:
    """``name`` relative to ``top``, or None when it is not safely under it."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        return None
    parts = [part for part in path.parts if part != "."]
    if len(parts) < 2 or parts[0] != top:
        return None
    return "/".join(parts[1:])
