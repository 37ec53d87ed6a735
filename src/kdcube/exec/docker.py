"""The Docker executor: each run is a fresh container, removed afterwards.

The executor talks to the Docker Engine API (version 1.41, Docker 20.10 and
later) directly over HTTP, on a unix socket or a plain TCP address, so it runs
natively on Trio and on asyncio alike.

Guarantees. Each run gets a container of its own, started from ``image`` with
no network at all (no interface but ``lo``), a read-only root file system, all
capabilities dropped, ``no-new-privileges``, a non-root user, and limits on
memory (``memory_mb``, swap included), CPU (``cpus``) and processes
(``max_processes``). The workspace is a size-capped tmpfs volume at
``/workspace``, owned by that user; ``/tmp`` is a size-capped tmpfs that
allows no executables. Both count against the memory limit. The program's
output is streamed to ``on_output`` as it comes, kept up to the request's cap,
and the rest read and dropped, so the program never stalls on a full pipe.
When the program ends, whatever it left running in the container is killed.
At the time limit and on the caller's cancel the container is killed at once;
in every case it is removed, with its volume, under a shield with its own
time limit. A program the kernel killed for going over its memory limit is
reported with ``memory_exceeded``, read from the container's memory cgroup.
Should this process die mid-run, the container still ends itself a little
after the run's time limit and removes itself.

How a run goes: the container's main process only sleeps; the workspace is
copied in as a tar archive, the program runs beside it (``docker exec``),
and ``out/`` is read back as a tar archive before the container is removed.
The workspace is a volume, not a plain tmpfs mount, because Docker 20.10
copies archives only into the root file system or a volume.

Known shortcomings: a program ended by a signal and one that exits with
status 128 + n look the same to Docker; both are reported as ``-n``. After a
timeout the container is killed before ``out/`` is read, so a run that timed
out returns no files. Docker keeps no size cap on the archive it sends back,
so ``out/`` is read whole (it is at most ``workspace_mb``) before
``out_caps`` are applied. A container outlives a crash of this process by up
to the run's time limit plus a minute. The image must hold ``sh``, ``sleep``,
``timeout`` and ``python3`` (``ops/exec/docker.sh image`` builds one).
"""

from __future__ import annotations

import math
import os
import struct
import tarfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import httpx
import structlog

from kdcube.exec.output import Capture
from kdcube.exec.ports import (
    CODE_FILE,
    OUT_FOLDER,
    ExecError,
    ExecRequest,
    ExecResult,
    MiB,
    OutputSink,
    StreamName,
    finished,
    from_shell_status,
)
from kdcube.exec.workspace import DEFAULT_OUT_CAPS, OutCaps, pack, unpack_out

__all__ = ["DEFAULT_IMAGE", "RUN_ID_LABEL", "DockerExecutor"]

log = structlog.get_logger("kdcube.exec")

DEFAULT_IMAGE = "kdcube/exec-python:bookworm"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
API_VERSION = "v1.41"
RUN_ID_LABEL = "kdcube.exec.run_id"
EXECUTOR_LABEL = "kdcube.exec.executor"
WORKSPACE = "/workspace"
ENVIRONMENT = ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "HOME=/tmp"]

# Killing and removing the container, even under cancellation.
CLEANUP_S = 10.0
# Each API call but the program's output stream.
API_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
STREAM_TIMEOUT = httpx.Timeout(None, connect=5.0)
# How long the daemon may take to record the end of a program whose output
# has already ended.
EXIT_RECORDED_S = 5.0
# How long a container lives past the run's time limit when nobody removes
# it: enough for reading out/ back, short enough not to linger.
ORPHAN_GRACE_S = 60

# The program runs under an inner time limit, a backstop should this process
# die; once it ends, the kill reaches what it left behind (init, the sleeper,
# is spared), so no straggler holds the output stream open.
RUN_PROGRAM = (
    # dash reports a job killed by a signal ("Killed") on its own stderr,
    # with a foreground job's redirections still in place: the shell's stderr
    # goes nowhere, and the program, started in the background, gets the
    # real one.
    "exec 3>&2 2>/dev/null;"
    ' timeout -s KILL "$0" python3 -u -X utf8 "$1" 2>&3 3>&- & wait $!;'
    " status=$?; kill -KILL -1; exit $status"
)

# The kernel's count of processes it killed in the container's memory
# cgroup, on cgroup v1 and v2; the program cannot change either file.
READ_OOM_KILLS = [
    "sh",
    "-c",
    "cat /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events"
    " 2>/dev/null",
]
SIGKILL_EXIT = -9

STDOUT_FRAME, STDERR_FRAME = 1, 2
FRAME_HEADER = struct.Struct(">BxxxI")

STREAM_NAMES: dict[int, StreamName] = {STDOUT_FRAME: "stdout", STDERR_FRAME: "stderr"}


@dataclass(frozen=True, slots=True)
class _Outcome:
    exit_code: int | None
    duration_s: float
    timed_out: bool


class DockerExecutor:
    """Runs each request in a container of its own (see the module docstring
    for what that does and does not protect).

    ``docker_host`` is the daemon's URL (``unix:///path`` or
    ``tcp://host:port``), by default ``DOCKER_HOST`` or the standard socket.
    ``user`` (``uid:gid``, not root) runs the program. Every run gets
    ``cpus`` CPUs, at most ``max_processes`` processes, a ``tmp_mb`` MiB
    ``/tmp`` and a ``workspace_mb`` MiB workspace (the input files included);
    ``out_caps`` caps what comes back from ``out/``.
    """

    def __init__(
        self,
        *,
        image: str = DEFAULT_IMAGE,
        docker_host: str | None = None,
        user: str = "65534:65534",
        cpus: float = 1.0,
        max_processes: int = 64,
        tmp_mb: int = 16,
        workspace_mb: int = 64,
        out_caps: OutCaps = DEFAULT_OUT_CAPS,
    ) -> None:
        self.image = image
        self.docker_host = docker_host or os.environ.get(
            "DOCKER_HOST", DEFAULT_DOCKER_HOST
        )
        self.uid, self.gid = _parse_user(user)
        if not cpus > 0:
            raise ValueError(f"cpus must be positive, got {cpus!r}")
        self.cpus = cpus
        self.max_processes = max_processes
        self.tmp_mb = tmp_mb
        self.workspace_mb = workspace_mb
        self.out_caps = out_caps
        _check_host(self.docker_host)

    async def run(
        self, request: ExecRequest, *, on_output: OutputSink | None = None
    ) -> ExecResult:
        archive = await anyio.to_thread.run_sync(self._pack, request)
        stdout = Capture(request.max_output_bytes)
        stderr = Capture(request.max_output_bytes)
        async with _open_engine(self.docker_host) as engine:
            container = await self._create(engine, request)
            try:
                outcome = await self._run_in(
                    engine, container, request, archive, (stdout, stderr), on_output
                )
                memory_exceeded = await _memory_exceeded(engine, container, outcome)
                files, files_truncated = await self._collect(engine, container, outcome)
            except anyio.get_cancelled_exc_class():
                _log_kill(request, container, "cancelled")
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    await _remove(engine, container, request)
        return finished(
            ExecResult(
                run_id=request.run_id,
                exit_code=outcome.exit_code,
                stdout=bytes(stdout.data),
                stderr=bytes(stderr.data),
                stdout_truncated=stdout.truncated,
                stderr_truncated=stderr.truncated,
                duration_s=outcome.duration_s,
                timed_out=outcome.timed_out,
                files=files,
                files_truncated=files_truncated,
                memory_exceeded=memory_exceeded,
            )
        )

    def _pack(self, request: ExecRequest) -> bytes:
        archive = pack(request, owner=(self.uid, self.gid))
        if len(archive) > self.workspace_mb * MiB:
            raise ExecError(
                f"the input files ({len(archive) // MiB} MiB) do not fit in the"
                f" {self.workspace_mb} MiB workspace; send less or raise workspace_mb"
            )
        return archive

    async def _create(self, engine: _Engine, request: ExecRequest) -> str:
        # Shielded: a cancel arriving while the daemon creates the container
        # would leave one this run cannot name, and so cannot remove.
        with anyio.CancelScope(shield=True):
            container = await engine.create(self._container_config(request))
        return container

    async def _run_in(
        self,
        engine: _Engine,
        container: str,
        request: ExecRequest,
        archive: bytes,
        captures: tuple[Capture, Capture],
        on_output: OutputSink | None,
    ) -> _Outcome:
        await engine.start(container)
        await engine.put_archive(container, WORKSPACE, archive)
        execution = await engine.create_exec(container, self._program(request))
        log.info(
            "exec.started",
            run_id=request.run_id,
            container=container[:12],
            image=self.image,
            timeout_s=request.timeout_s,
            memory_mb=request.memory_mb,
        )
        started = time.monotonic()
        with anyio.move_on_after(request.timeout_s) as deadline:
            await _stream(engine, execution, captures, on_output)
        duration_s = time.monotonic() - started
        if deadline.cancelled_caught:
            _log_kill(request, container, "timeout")
            await engine.kill(container)
            return _Outcome(SIGKILL_EXIT, duration_s, timed_out=True)

        exit_code = await engine.exit_code(execution)
        return _Outcome(exit_code, duration_s, timed_out=False)

    async def _collect(
        self, engine: _Engine, container: str, outcome: _Outcome
    ) -> tuple[dict[str, bytes], bool]:
        if outcome.timed_out:
            return {}, False
        archive = await engine.get_archive(container, f"{WORKSPACE}/{OUT_FOLDER}")
        if archive is None:
            return {}, False
        try:
            return await anyio.to_thread.run_sync(self._unpack, archive)
        except tarfile.TarError as error:
            raise ExecError(f"the out/ folder came back unreadable: {error}") from error

    def _unpack(self, archive: bytes) -> tuple[dict[str, bytes], bool]:
        return unpack_out(archive, self.out_caps, top=OUT_FOLDER)

    def _container_config(self, request: ExecRequest) -> dict[str, Any]:
        lifetime_s = math.ceil(request.timeout_s) + ORPHAN_GRACE_S
        return {
            "Image": self.image,
            "Cmd": ["sleep", str(lifetime_s)],
            "User": f"{self.uid}:{self.gid}",
            "WorkingDir": WORKSPACE,
            "Env": ENVIRONMENT,
            "Labels": {RUN_ID_LABEL: request.run_id, EXECUTOR_LABEL: "docker"},
            "NetworkDisabled": True,
            "HostConfig": self._host_config(request),
        }

    def _host_config(self, request: ExecRequest) -> dict[str, Any]:
        memory = request.memory_mb * MiB
        return {
            "NetworkMode": "none",
            "ReadonlyRootfs": True,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "Memory": memory,
            "MemorySwap": memory,
            "NanoCpus": round(self.cpus * 1e9),
            "PidsLimit": self.max_processes,
            "IpcMode": "private",
            "ShmSize": self.tmp_mb * MiB,
            "Tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={self.tmp_mb}m"},
            "Mounts": [self._workspace_mount()],
            "LogConfig": {"Type": "none", "Config": {}},
            # A backstop for a crash of this process: the sleeper ends and
            # the daemon removes the container and its volume.
            "AutoRemove": True,
        }

    def _workspace_mount(self) -> dict[str, Any]:
        options = (
            f"size={self.workspace_mb}m,uid={self.uid},gid={self.gid},mode=0700,"
            "nosuid,nodev,noexec"
        )
        local_tmpfs = {"type": "tmpfs", "device": "tmpfs", "o": options}
        return {
            "Type": "volume",
            "Target": WORKSPACE,
            "VolumeOptions": {
                "DriverConfig": {"Name": "local", "Options": local_tmpfs}
            },
        }

    def _program(self, request: ExecRequest) -> list[str]:
        # The inner limit trails the executor's own, which acts first.
        inner_limit_s = math.ceil(request.timeout_s) + 1
        return ["sh", "-c", RUN_PROGRAM, str(inner_limit_s), CODE_FILE]


def _parse_user(user: str) -> tuple[int, int]:
    uid, _, gid = user.partition(":")
    if not (uid.isdigit() and gid.isdigit()):
        raise ValueError(f"user must be numeric 'uid:gid', got {user!r}")
    if int(uid) == 0 or int(gid) == 0:
        raise ValueError(f"user must not be root, got {user!r}")
    return int(uid), int(gid)


def _check_host(docker_host: str) -> None:
    if not docker_host.startswith(("unix://", "tcp://", "http://")):
        raise ExecError(
            f"docker host {docker_host!r} is not supported: use unix:///path or"
            " tcp://host:port (TLS is not supported)"
        )


def _log_kill(request: ExecRequest, container: str, reason: str) -> None:
    log.info(
        "exec.killed", run_id=request.run_id, container=container[:12], reason=reason
    )


async def _stream(
    engine: _Engine,
    execution: str,
    captures: tuple[Capture, Capture],
    on_output: OutputSink | None,
) -> None:
    """Run the program and read its output to the end, into ``captures``."""
    stdout, stderr = captures
    frames = _Frames()
    async with engine.start_exec(execution) as output:
        async for chunk in output:
            for kind, payload in frames.feed(chunk):
                name = STREAM_NAMES.get(kind)
                if name is not None:
                    capture = stdout if name == "stdout" else stderr
                    await capture.feed(payload, name, on_output)


async def _memory_exceeded(engine: _Engine, container: str, outcome: _Outcome) -> bool:
    """Whether the kernel killed the program for its memory. Docker's own
    OOMKilled flag covers only the container's main process, the sleeper."""
    if outcome.timed_out or outcome.exit_code != SIGKILL_EXIT:
        return False
    execution = await engine.create_exec(container, READ_OOM_KILLS)
    counters = Capture(4096)
    await _stream(engine, execution, (counters, counters), None)
    for line in counters.data.decode("ascii", "replace").splitlines():
        name, _, count = line.partition(" ")
        if name == "oom_kill" and count.strip().isdigit():
            return int(count) > 0
    return False


async def _remove(engine: _Engine, container: str, request: ExecRequest) -> None:
    with anyio.move_on_after(CLEANUP_S) as cleanup:
        try:
            await engine.kill(container)
            await engine.remove(container)
            return
        except ExecError as error:
            reason = str(error)
    if cleanup.cancelled_caught:
        reason = f"the daemon took longer than {CLEANUP_S} s"
    log.warning(
        "exec.cleanup_failed",
        run_id=request.run_id,
        container=container[:12],
        reason=reason,
    )


class _Frames:
    """Splits Docker's multiplexed output into (stream, payload) frames: each
    frame is an 8-byte header (stream kind, three zero bytes, payload length
    as a big-endian 32-bit number) followed by the payload."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        self._pending += chunk
        frames: list[tuple[int, bytes]] = []
        while len(self._pending) >= FRAME_HEADER.size:
            kind, size = FRAME_HEADER.unpack_from(self._pending)
            end = FRAME_HEADER.size + size
            if len(self._pending) < end:
                break
            frames.append((kind, bytes(self._pending[FRAME_HEADER.size : end])))
            del self._pending[:end]
        return frames


@asynccontextmanager
async def _open_engine(docker_host: str) -> AsyncIterator[_Engine]:
    if docker_host.startswith("unix://"):
        socket = docker_host.removeprefix("unix://")
        # No TLS on a unix socket; verify=False spares building a TLS context
        # with the system's certificates, which costs about 25 ms per run.
        transport = httpx.AsyncHTTPTransport(uds=socket, verify=False)
        base_url = "http://docker"
    else:
        transport = httpx.AsyncHTTPTransport(verify=False)
        base_url = "http://" + docker_host.split("://", 1)[1]
    async with httpx.AsyncClient(
        transport=transport,
        base_url=f"{base_url}/{API_VERSION}",
        timeout=API_TIMEOUT,
    ) as client:
        yield _Engine(client, docker_host)


class _Engine:
    """The few Docker Engine API calls a run needs, their failures turned
    into ``ExecError``s that say what to do."""

    def __init__(self, client: httpx.AsyncClient, docker_host: str) -> None:
        self._client = client
        self._host = docker_host

    async def create(self, config: dict[str, Any]) -> str:
        response = await self._call("POST", "/containers/create", json=config)
        if response.status_code == 404:
            image = config["Image"]
            raise ExecError(
                f"image {image!r} is missing from the Docker daemon at"
                f" {self._host}; build it with: ops/exec/docker.sh image {image}"
            )
        body: dict[str, Any] = self._check(response).json()
        return str(body["Id"])

    async def start(self, container: str) -> None:
        self._check(await self._call("POST", f"/containers/{container}/start"))

    async def put_archive(self, container: str, path: str, archive: bytes) -> None:
        response = await self._call(
            "PUT",
            f"/containers/{container}/archive",
            params={"path": path},
            content=archive,
            headers={"Content-Type": "application/x-tar"},
        )
        self._check(response)

    async def get_archive(self, container: str, path: str) -> bytes | None:
        """The archive of ``path``, or None when there is no such path."""
        response = await self._call(
            "GET", f"/containers/{container}/archive", params={"path": path}
        )
        if response.status_code == 404:
            return None
        return self._check(response).content

    async def create_exec(self, container: str, command: list[str]) -> str:
        config = {"Cmd": command, "AttachStdout": True, "AttachStderr": True}
        response = await self._call(
            "POST", f"/containers/{container}/exec", json=config
        )
        body: dict[str, Any] = self._check(response).json()
        return str(body["Id"])

    @asynccontextmanager
    async def start_exec(self, execution: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """Start the program; the block reads its multiplexed output, which
        ends when the program does."""
        request = self._client.build_request(
            "POST",
            f"/exec/{execution}/start",
            json={"Detach": False, "Tty": False},
            timeout=STREAM_TIMEOUT,
        )
        response = await self._send(request, stream=True)
        try:
            self._check(response)
            yield response.aiter_raw()
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        finally:
            await response.aclose()

    async def exit_code(self, execution: str) -> int | None:
        """The program's exit status; a status above 128 is read as the
        signal that ended it, negated."""
        with anyio.move_on_after(EXIT_RECORDED_S):
            while True:
                response = await self._call("GET", f"/exec/{execution}/json")
                state: dict[str, Any] = self._check(response).json()
                if not state["Running"] and state["ExitCode"] is not None:
                    return from_shell_status(int(state["ExitCode"]))
                await anyio.sleep(0.01)
        return None

    async def kill(self, container: str) -> None:
        response = await self._call("POST", f"/containers/{container}/kill")
        # Gone already, or no longer running: either way, nothing to kill.
        if response.status_code not in (404, 409):
            self._check(response)

    async def remove(self, container: str) -> None:
        response = await self._call(
            "DELETE", f"/containers/{container}", params={"force": "1", "v": "1"}
        )
        if response.status_code == 409:
            # The daemon is already removing it (AutoRemove after the kill).
            await self._wait_gone(container)
        elif response.status_code != 404:
            self._check(response)

    async def _wait_gone(self, container: str) -> None:
        while True:
            response = await self._call("GET", f"/containers/{container}/json")
            if response.status_code == 404:
                return
            await anyio.sleep(0.02)

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        request = self._client.build_request(method, path, **kwargs)
        return await self._send(request, stream=False)

    async def _send(self, request: httpx.Request, *, stream: bool) -> httpx.Response:
        try:
            return await self._client.send(request, stream=stream)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error

    def _unreachable(self, error: httpx.TransportError) -> ExecError:
        return ExecError(
            f"cannot reach the Docker daemon at {self._host}: {error!r}. Start"
            " one (ops/exec/docker.sh start DIR prints its URL) and point"
            " DOCKER_HOST or docker_host at it"
        )

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        raise ExecError(
            f"the Docker daemon at {self._host} refused"
            f" {response.request.method} {response.request.url.path}:"
            f" {response.status_code} {_message(response)}"
        )


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    return response.text[:200]
