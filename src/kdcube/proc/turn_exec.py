"""A turn's view of the executor: each run is logged with the turn it
belongs to, its record is kept in storage, and the files it wrote into
``out/`` become the turn's artifacts.

The record of a run lies under the turn's ``executions`` folder of the
storage layout, ``{run_id}/result.json`` (how it ended) beside
``stdout.txt`` and ``stderr.txt`` (what was kept of its output), so an
operator can see what a bundle ran after the fact.
"""

from __future__ import annotations

import json
import mimetypes

import structlog

from kdcube.exec import ExecRequest, ExecResult, Executor, OutputSink
from kdcube.sdk import ArtifactSaver
from kdcube.storage import Storage

__all__ = ["TurnExecutor"]

log = structlog.get_logger("kdcube.exec")

DEFAULT_MIME = "application/octet-stream"


class TurnExecutor:
    """Runs a turn's programs on ``executor`` (chosen as ``mode``) and keeps
    their results: the record under ``record_prefix`` in ``storage``, the
    ``out/`` files through ``save_artifact``."""

    def __init__(
        self,
        executor: Executor,
        *,
        mode: str,
        turn_id: str,
        bundle_id: str,
        storage: Storage | None,
        record_prefix: str,
        save_artifact: ArtifactSaver,
    ) -> None:
        self._executor = executor
        self._mode = mode
        self._turn_id = turn_id
        self._bundle_id = bundle_id
        self._storage = storage
        self._record_prefix = record_prefix
        self._save_artifact = save_artifact

    async def run(
        self, request: ExecRequest, *, on_output: OutputSink | None = None
    ) -> ExecResult:
        log.info(
            "exec.turn_run",
            run_id=request.run_id,
            turn_id=self._turn_id,
            bundle_id=self._bundle_id,
            mode=self._mode,
        )
        result = await self._executor.run(request, on_output=on_output)
        await self._keep_record(result)
        for name, content in sorted(result.files.items()):
            await self._save_artifact(name, content, _mime_of(name))
        return result

    async def _keep_record(self, result: ExecResult) -> None:
        if self._storage is None:
            return
        folder = f"{self._record_prefix}{result.run_id}/"
        await self._storage.put(folder + "stdout.txt", result.stdout)
        await self._storage.put(folder + "stderr.txt", result.stderr)
        await self._storage.put(folder + "result.json", _record(self._mode, result))


def _record(mode: str, result: ExecResult) -> bytes:
    record = {
        "run_id": result.run_id,
        "mode": mode,
        "exit_code": result.exit_code,
        "timed_out": result.timed_out,
        "memory_exceeded": result.memory_exceeded,
        "duration_s": round(result.duration_s, 3),
        "stdout_bytes": len(result.stdout),
        "stderr_bytes": len(result.stderr),
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated,
        "files": sorted(result.files),
        "files_truncated": result.files_truncated,
    }
    return json.dumps(record, indent=2).encode()


def _mime_of(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name)
    return guessed or DEFAULT_MIME
