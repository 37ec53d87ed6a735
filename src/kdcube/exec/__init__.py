"""Running code: the executor port and its implementations.

The deployment chooses its executor (``KDCUBE_EXEC``: ``subprocess``,
``local``, ``docker`` or ``fargate``) and a bundle may ask for another;
bundles reach it as ``ctx.exec``, which is None where running code is off.
"""

from __future__ import annotations

from kdcube.exec.executors import Executors, open_executors
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
    "Executors",
    "open_executors",
]
