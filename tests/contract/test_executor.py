"""The Executor contract: every executor runs a program, and ends it, alike.

Each test runs on the subprocess executor, the local sandbox (bubblewrap;
without it skipped, under CI a failure) and Docker (the ``docker_host``
fixture, tests/docker_server.py). What one executor does and the others do
not stays in its own unit tests. Where the executors legitimately differ,
the test says so per executor (``Tracked.kind``) rather than loosening the
check for all.

Time is real, on Trio too: the programs run outside the event loop, so an
autojump clock would skip past them (see ``anyio_backend``). Limits are kept
short. After each test, no run may leave anything behind: a workspace, a
process, a cgroup, a container or a volume (``Tracked.leftovers``). Programs
use only what the Docker image's trimmed standard library holds (no json, no
shutil).
"""

from __future__ import annotations

import ast
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

from kdcube.exec.cgroups import find
from kdcube.exec.docker import DockerExecutor
from kdcube.exec.local import LocalSandboxExecutor
from kdcube.exec.ports import (
    ExecError,
    ExecRequest,
    ExecResult,
    Executor,
    OutputSink,
    StreamName,
)
from kdcube.exec.subprocess import SubprocessExecutor
from kdcube.exec.workspace import OutCaps
from tests.docker_server import containers, engine, volumes
from tests.needs import missing

from .conftest import real_clock_backend

pytestmark = pytest.mark.anyio

Kind = Literal["subprocess", "local", "docker"]

LOOP_FOREVER = "while True:\n    pass\n"
FORK_THREE_THEN_LOOP = (
    """
import os, time
for _ in range(3):
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
print("ready", flush=True)
"""
    + LOOP_FOREVER
)
SETTLE_S = 1.0
"""The subprocess executor kills the program's process group and waits for
the program alone: its children exit a moment later."""
PROGRAM_AND_CHILDREN = 4
"""The processes of ``FORK_THREE_THEN_LOOP``: the program and its children."""


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return real_clock_backend(request)


@dataclass
class Tracked:
    """An executor under contract; its runs are remembered, to check what
    they left."""

    kind: Kind
    executor: Executor
    build: Callable[..., Executor]
    """The same executor with other settings: ``out_caps``, ``max_processes``."""
    left_by: Callable[[str], list[str]]
    """What is left of a run: workspaces, processes, cgroups, containers."""
    processes_of: Callable[[str], set[int]] | None
    """The host pids of a run's processes while it runs, where visible."""
    own_processes: int
    """The processes the executor keeps beside the program in a run."""
    setup_s: float = 0.0
    """Real time a run takes beyond the program's (a container's creation)."""
    settle_s: float = 0.0
    """How long a run's killed processes may take to exit once it returned."""
    environment: frozenset[str] = frozenset()
    """The names of the program's environment variables."""
    run_ids: list[str] = field(default_factory=list)

    async def run(
        self, request: ExecRequest, *, on_output: OutputSink | None = None
    ) -> ExecResult:
        self.run_ids.append(request.run_id)
        return await self.executor.run(request, on_output=on_output)

    def configured(self, **settings: Any) -> Tracked:
        """This executor with other settings, its runs tracked along."""
        return replace(self, executor=self.build(**settings))

    def leftovers(self, run_id: str) -> list[str]:
        return self.left_by(run_id)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z"


def still_alive(pids: set[int], within_s: float) -> set[int]:
    """Those of ``pids`` still alive after waiting up to ``within_s``."""
    deadline = time.monotonic() + within_s
    while (left := {pid for pid in pids if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def entries(root: Path) -> list[str]:
    return [str(path) for path in root.iterdir()]


def processes_in(root: Path) -> set[int]:
    """Live host processes whose working directory is under ``root``: a run's
    program and the children it forked, even once the workspace is removed."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd.startswith(f"{root}/") and alive(int(entry.name)):
            found.add(int(entry.name))
    return found


@contextmanager
def _subprocess(tmp_path: Path) -> Iterator[Tracked]:
    root = tmp_path / "workspaces"
    root.mkdir()
    yield Tracked(
        kind="subprocess",
        executor=SubprocessExecutor(root=root),
        build=lambda **settings: SubprocessExecutor(root=root, **settings),
        left_by=lambda _: (
            entries(root)
            + [f"pid {pid}" for pid in still_alive(processes_in(root), SETTLE_S)]
        ),
        processes_of=lambda _: processes_in(root),
        own_processes=0,
        settle_s=SETTLE_S,
        environment=frozenset({"PATH", "LANG"}),
    )


def cgroups_of(run_id: str) -> list[Path]:
    return [
        folder
        for hierarchy in ("memory", "pids", ".")
        for folder in Path("/sys/fs/cgroup", hierarchy, "kdcube").glob(f"{run_id}-*")
    ]


def host_pids(run_id: str) -> set[int]:
    """A local sandbox's processes, read from its cgroup: inside, they see
    their own pid namespace."""
    return {
        int(pid)
        for folder in cgroups_of(run_id)
        for pid in (folder / "cgroup.procs").read_text().split()
    }


@contextmanager
def _local() -> Iterator[Tracked]:
    if shutil.which("bwrap") is None:
        missing("bwrap is missing (ops/exec/local.sh install)")
    # Under the system's temporary folder, not pytest's private one: the
    # sandbox's user must be able to reach its workspace.
    folder = Path(tempfile.mkdtemp(prefix="kdcube-test-local-"))
    folder.chmod(0o755)
    root = folder / "workspaces"
    root.mkdir()
    try:
        yield Tracked(
            kind="local",
            executor=LocalSandboxExecutor(root=root),
            build=lambda **settings: LocalSandboxExecutor(root=root, **settings),
            left_by=lambda run_id: entries(root) + list(map(str, cgroups_of(run_id))),
            # Without cgroups the host cannot tell a run's processes apart.
            processes_of=host_pids if find() is not None else None,
            # bubblewrap's monitor and the sandbox's init.
            own_processes=2,
            environment=frozenset({"PATH", "LANG", "HOME", "PWD"}),
        )
    finally:
        shutil.rmtree(folder)


def container_pids(docker_host: str, run_id: str) -> set[int]:
    """The host pids of a run's container, as the daemon lists them."""
    found = set()
    with engine(docker_host) as client:
        for container in containers(docker_host, run_id):
            top = client.get(f"/containers/{container}/top").raise_for_status().json()
            column = top["Titles"].index("PID")
            found |= {int(row[column]) for row in top["Processes"]}
    return found


@contextmanager
def _docker(docker_host: str) -> Iterator[Tracked]:
    before = volumes(docker_host)

    def left_by(run_id: str) -> list[str]:
        new_volumes = volumes(docker_host) - before
        return containers(docker_host, run_id) + sorted(new_volumes)

    yield Tracked(
        kind="docker",
        executor=DockerExecutor(docker_host=docker_host),
        build=lambda **settings: DockerExecutor(docker_host=docker_host, **settings),
        left_by=left_by,
        processes_of=lambda run_id: container_pids(docker_host, run_id),
        # The container's sleeper, and the shell and ``timeout`` around the
        # program.
        own_processes=3,
        setup_s=5.0,
        environment=frozenset({"PATH", "LANG", "HOME", "PWD", "HOSTNAME"}),
    )


@pytest.fixture(
    params=[
        "subprocess",
        "local",
        # The first may wait for the session's daemon and image (debootstrap,
        # when its root file system is not cached).
        pytest.param("docker", marks=pytest.mark.timeout(180)),
    ]
)
def executor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tracked]:
    if request.param == "docker":
        opened = _docker(request.getfixturevalue("docker_host"))
    elif request.param == "local":
        opened = _local()
    else:
        opened = _subprocess(tmp_path)
    with opened as tracked:
        yield tracked
        for run_id in tracked.run_ids:
            assert tracked.leftovers(run_id) == [], run_id


async def test_prints_and_exits_zero(executor: Tracked) -> None:
    result = await executor.run(ExecRequest("print(1)", run_id="r-1"))

    assert result.run_id == "r-1"
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"1\n", b"")
    assert result.ok and not result.timed_out and not result.memory_exceeded
    assert not result.stdout_truncated and not result.stderr_truncated
    assert 0 < result.duration_s < 5
    assert executor.leftovers(result.run_id) == []


async def test_stderr_and_exit_code_come_back(executor: Tracked) -> None:
    code = "import sys\nprint('half')\nprint('broken', file=sys.stderr)\nsys.exit(3)"

    result = await executor.run(ExecRequest(code))

    assert (result.exit_code, result.stdout, result.stderr) == (
        3,
        b"half\n",
        b"broken\n",
    )
    assert not result.ok


async def test_an_exception_exits_nonzero_with_its_traceback(
    executor: Tracked,
) -> None:
    result = await executor.run(ExecRequest("1 / 0"))

    assert result.exit_code == 1
    assert b"ZeroDivisionError" in result.stderr


async def test_the_environment_holds_nothing_of_the_host(
    executor: Tracked, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDCUBE_SECRET", "s3cr3t")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-secret")
    code = "import os\nprint(repr(dict(os.environ)))"

    result = await executor.run(ExecRequest(code))

    environment = ast.literal_eval(result.stdout.decode())
    assert set(environment) == executor.environment, result.stderr
    if executor.kind != "subprocess":
        assert environment["PWD"] == "/workspace"
    assert os.environ["KDCUBE_SECRET"] == "s3cr3t"


async def test_input_files_are_read_and_out_files_returned(
    executor: Tracked,
) -> None:
    code = """
import os
from pathlib import Path
text = Path("data/in.txt").read_text()
Path("out/upper.txt").write_text(text.upper())
Path("out/deep").mkdir()
Path("out/deep/n.bin").write_bytes(bytes(range(4)))
os.symlink("/etc/hostname", "out/link")
os.mkfifo("out/fifo")
Path("scratch.txt").write_text("not returned")
"""
    request = ExecRequest(code, files={"data/in.txt": b"abc"})

    result = await executor.run(request)

    assert result.exit_code == 0, result.stderr
    assert result.files == {"upper.txt": b"ABC", "deep/n.bin": b"\x00\x01\x02\x03"}
    assert not result.files_truncated
    assert executor.leftovers(result.run_id) == []


async def test_a_missing_out_folder_returns_no_files(executor: Tracked) -> None:
    result = await executor.run(ExecRequest("import os\nos.rmdir('out')"))

    assert result.exit_code == 0, result.stderr
    assert result.files == {}


async def test_out_files_over_the_caps_are_left_out(executor: Tracked) -> None:
    capped = executor.configured(out_caps=OutCaps(files=2, bytes=10))
    code = "\n".join(
        f"open('out/{name}', 'wb').write(b'x' * {size})"
        for name, size in (("a", 4), ("b", 20), ("c", 4), ("d", 1))
    )

    result = await capped.run(ExecRequest(code))

    assert result.files == {"a": b"xxxx", "c": b"xxxx"}
    assert result.files_truncated


async def test_an_out_folder_swapped_for_a_link_to_a_host_folder_returns_nothing(
    executor: Tracked, tmp_path: Path
) -> None:
    # In a sandbox the link points nowhere; outside, it would point at the
    # host's folder when the workspace is read back.
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret.txt").write_text("not yours")
    code = f"import os\nos.rename('out', 'old')\nos.symlink({str(host)!r}, 'out')"

    result = await executor.run(ExecRequest(code))

    assert result.exit_code == 0, result.stderr
    assert result.files == {}
    assert executor.leftovers(result.run_id) == []


async def test_an_endless_loop_is_killed_at_the_time_limit(executor: Tracked) -> None:
    request = ExecRequest(
        "print('looping', flush=True)\n" + LOOP_FOREVER, timeout_s=0.5
    )

    with anyio.fail_after(5 + executor.setup_s):
        result = await executor.run(request)

    assert result.timed_out and not result.ok
    assert result.exit_code == -9
    assert result.stdout == b"looping\n"
    assert 0.5 <= result.duration_s < 2
    assert executor.leftovers(request.run_id) == []


async def test_what_a_timed_out_program_wrote_to_out(executor: Tracked) -> None:
    code = "open('out/early.txt', 'w').write('early')\n" + LOOP_FOREVER

    with anyio.fail_after(5 + executor.setup_s):
        result = await executor.run(ExecRequest(code, timeout_s=0.5))

    assert result.timed_out
    if executor.kind == "docker":
        # The container is killed before out/ is read (docker.py's
        # known shortcomings).
        assert result.files == {}
    else:
        assert result.files == {"early.txt": b"early"}


async def test_forked_children_die_at_the_time_limit(executor: Tracked) -> None:
    code = """
import os, time
for _ in range(3):
    if os.fork() == 0:
        # One write per line, so the children's lines never interleave.
        os.write(1, b"child\\n")
        time.sleep(60)
        os._exit(0)
time.sleep(60)
"""
    with anyio.fail_after(5 + executor.setup_s):
        result = await executor.run(ExecRequest(code, timeout_s=0.5))

    assert result.timed_out
    assert result.stdout == b"child\n" * 3
    assert executor.leftovers(result.run_id) == []


LEFT_BEHIND = """
import os, time
read_end, write_end = os.pipe()
if os.fork() == 0:
{leave}    os.write(write_end, b"x")
    time.sleep(60)
    os._exit(0)
os.read(read_end, 1)
print("parent done")
"""
LEAVE_THE_SESSION = "    os.setsid()\n    if os.fork() != 0:\n        os._exit(0)\n"


@pytest.mark.parametrize("leaves_the_session", [False, True])
async def test_children_left_behind_by_a_finished_program_are_killed(
    executor: Tracked, leaves_the_session: bool
) -> None:
    if leaves_the_session and executor.kind == "subprocess":
        pytest.skip(
            "a child that starts a session of its own survives a subprocess run"
            " (subprocess.py's known shortcomings)"
        )
    # The parent waits for its child's signal, so the child is running when
    # the parent exits and the run's end must kill it.
    leave = LEAVE_THE_SESSION if leaves_the_session else ""
    code = LEFT_BEHIND.format(leave=leave)

    with anyio.fail_after(5 + executor.setup_s):
        result = await executor.run(ExecRequest(code, timeout_s=30))

    assert result.exit_code == 0 and not result.timed_out
    assert result.stdout == b"parent done\n"
    assert executor.leftovers(result.run_id) == []


async def test_a_fork_bomb_stops_at_the_process_limit(executor: Tracked) -> None:
    if executor.kind == "subprocess":
        pytest.skip(
            "RLIMIT_NPROC counts every process of the user and spares root"
            " (subprocess.py's known shortcomings)"
        )
    if executor.kind == "local" and find() is None:
        pytest.skip("no writable cgroups here: only RLIMIT_NPROC, which spares root")
    limited = executor.configured(max_processes=16)
    code = """
import os, time
forked = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        forked += 1
except OSError as error:
    print(forked, error.errno, flush=True)
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    with anyio.fail_after(10 + executor.setup_s):
        result = await limited.run(ExecRequest(code, timeout_s=1))

    forked, error = map(int, result.stdout.split())
    # The sandbox's limit comes on top of its own processes; the container's
    # counts them, the program's too.
    most = 16 if executor.kind == "local" else 16 - executor.own_processes - 1
    assert forked <= most and error == errno.EAGAIN
    assert result.timed_out
    assert executor.leftovers(result.run_id) == []
    after = await limited.run(ExecRequest("print(1)"))
    assert after.stdout == b"1\n"


async def test_a_program_killed_by_a_signal_is_not_a_memory_failure(
    executor: Tracked,
) -> None:
    result = await executor.run(ExecRequest("import os\nos.kill(os.getpid(), 9)"))

    assert result.exit_code == -9
    assert not result.memory_exceeded and not result.ok
    assert result.stderr == b""


async def test_huge_output_is_capped_while_the_program_finishes(
    executor: Tracked,
) -> None:
    code = """
import sys
for _ in range(160):
    sys.stdout.write("x" * 65536)
print("done", file=sys.stderr)
"""
    with anyio.fail_after(30 if executor.kind == "docker" else 10):
        result = await executor.run(ExecRequest(code, max_output_bytes=1000))

    assert result.exit_code == 0
    assert result.stdout == b"x" * 1000 and result.stdout_truncated
    assert result.stderr == b"done\n" and not result.stderr_truncated
    assert executor.leftovers(result.run_id) == []


async def test_the_sink_receives_what_the_result_holds_within_the_cap(
    executor: Tracked,
) -> None:
    code = "import sys\nprint('a')\nprint('e', file=sys.stderr)\nprint('b' * 50)"
    received: dict[str, bytes] = {"stdout": b"", "stderr": b""}

    async def on_output(stream: StreamName, chunk: bytes) -> None:
        received[stream] += chunk

    result = await executor.run(
        ExecRequest(code, max_output_bytes=10), on_output=on_output
    )

    assert received == {"stdout": result.stdout, "stderr": result.stderr}
    assert result.stdout == b"a\nbbbbbbbb" and result.stdout_truncated


async def test_output_reaches_the_sink_live_and_in_order(executor: Tracked) -> None:
    code = """
import sys, time
for n in range(3):
    print("out", n)
print("first done", file=sys.stderr)
time.sleep(1)
print("err", file=sys.stderr)
print("out 3")
"""
    received: list[tuple[StreamName, bytes, float]] = []

    async def on_output(stream: StreamName, chunk: bytes) -> None:
        received.append((stream, chunk, time.monotonic()))

    result = await executor.run(ExecRequest(code), on_output=on_output)

    def joined(name: StreamName) -> bytes:
        return b"".join(chunk for stream, chunk, _ in received if stream == name)

    assert joined("stdout") == result.stdout == b"out 0\nout 1\nout 2\nout 3\n"
    assert joined("stderr") == result.stderr == b"first done\nerr\n"
    # The lines before the pause arrived during it, not with the rest at the
    # end; the two streams are separate pipes, so only each one's own order
    # is kept.
    before_pause = max(at for _, chunk, at in received if b"first done" in chunk)
    after_pause = min(
        at for _, chunk, at in received if chunk.startswith((b"err", b"out 3"))
    )
    assert after_pause - before_pause > 0.5


async def test_cancelling_kills_every_process_of_the_run_at_once(
    executor: Tracked,
) -> None:
    request = ExecRequest(FORK_THREE_THEN_LOOP, timeout_s=30)
    seen: set[int] = set()
    cancelled_at = 0.0

    with anyio.fail_after(10), anyio.CancelScope() as scope:

        async def on_output(stream: StreamName, chunk: bytes) -> None:
            nonlocal cancelled_at
            if executor.processes_of is not None:
                seen.update(executor.processes_of(request.run_id))
            cancelled_at = time.monotonic()
            scope.cancel()

        await executor.run(request, on_output=on_output)

    assert scope.cancelled_caught
    assert time.monotonic() - cancelled_at < 1
    if executor.processes_of is not None:
        assert len(seen) == PROGRAM_AND_CHILDREN + executor.own_processes
        assert still_alive(seen, executor.settle_s) == set()
    assert executor.leftovers(request.run_id) == []


def test_an_input_name_outside_the_workspace_is_refused() -> None:
    for name in ("/etc/passwd", "../up.txt", "a/../../b", "", "main.py"):
        with pytest.raises(ExecError):
            ExecRequest("print(1)", files={name: b""})


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ExecRequest("print(1)", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        ExecRequest("print(1)", memory_mb=1)
