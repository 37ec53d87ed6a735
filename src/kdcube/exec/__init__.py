"""Running code: the executor port and its local subprocess implementation.

The deployment chooses its executor (``KDCUBE_EXEC``); bundles reach it as
``ctx.exec``, which is None where running code is off.
"""

from __future__ import annotations

from kdcube.exec.ports import (
    ExecError,
    ExecRequest,
    ExecResult,
    Executor,
    OutputSink,
    StreamName,
)
from kdcube.exec.subprocess import SubprocessExecutor

__all__ = [
    "ExecError",
    "ExecRequest",
    "ExecResult",
    "Executor",
    "OutputSink",
    "StreamName",
    "SubprocessExecutor",
    "executor_for",
]


def executor_for(mode: str | None) -> Executor | None:
    """The executor ``KDCUBE_EXEC`` names: ``subprocess``, or None for ``off``."""
    if mode == "subprocess":
        return SubprocessExecutor()
    return None
