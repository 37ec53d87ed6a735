"""An exclusive lock on a file, shared by every process on a host, for async code.

It uses ``flock``, whose locks belong to an open file rather than a process, so
two tasks of one process exclude each other as two processes do. The lock is
tried without blocking and retried with a growing pause, because a thread
blocked in ``flock`` cannot be cancelled: a cancelled wait would leave a thread
behind that takes the lock later and holds it for nobody.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread

_FIRST_PAUSE_S = 0.02
_LONGEST_PAUSE_S = 0.5


class FileLockTimeout(Exception):
    """The lock stayed taken for longer than the caller would wait."""


@asynccontextmanager
async def hold_file_lock(path: Path, *, wait_s: float) -> AsyncIterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block.

    Raises FileLockTimeout when it cannot be had within ``wait_s`` seconds.
    """
    descriptor = await anyio.to_thread.run_sync(_open, path)
    try:
        await _acquire(descriptor, path, wait_s)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


async def _acquire(descriptor: int, path: Path, wait_s: float) -> None:
    pause = _FIRST_PAUSE_S
    with anyio.move_on_after(wait_s):
        while not await anyio.to_thread.run_sync(_try_lock, descriptor):
            await anyio.sleep(pause)
            pause = min(pause * 2, _LONGEST_PAUSE_S)
        return

    raise FileLockTimeout(f"{path} stayed locked for more than {wait_s:g} s")


def _try_lock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
