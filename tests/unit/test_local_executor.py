"""What only LocalSandboxExecutor does: bubblewrap's walls, and cgroups.

What every executor does is held in tests/contract/test_executor.py. Time
limits here are real time, since the programs run outside the event loop;
they are kept short. A run's cgroup can only be removed once no process is
left in it, so a removed cgroup means every process of the run is gone.
Without bwrap these tests are skipped, except under CI (``CI`` set), where
that is a failure; those that need cgroups (root, ``/sys/fs/cgroup``
writable) are skipped where there are none.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from kdcube.exec import ExecError, ExecRequest, ExecResult
from kdcube.exec.cgroups import find
from kdcube.exec.local import LocalSandboxExecutor
from tests.needs import missing

pytestmark = pytest.mark.anyio

PROJECT = Path(__file__).resolve().parents[2]
HAS_CGROUPS = find() is not None
IS_ROOT = os.geteuid() == 0
needs_cgroups = pytest.mark.skipif(
    not HAS_CGROUPS, reason="no writable cgroups here (needs root and /sys/fs/cgroup)"
)


@pytest.fixture(autouse=True)
def _needs_bwrap() -> None:
    if shutil.which("bwrap") is not None:
        return
    missing("bwrap is missing (ops/exec/local.sh install)")


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    if request.param == "trio":
        return "trio", {}
    return "asyncio", {"loop_factory": asyncio.SelectorEventLoop}


@pytest.fixture(name="root")
def _root() -> Iterator[Path]:
    # Under the system's temporary folder, not pytest's private one: the
    # sandbox's user must be able to reach its workspace.
    folder = Path(tempfile.mkdtemp(prefix="kdcube-test-local-"))
    folder.chmod(0o755)
    root = folder / "workspaces"
    root.mkdir()
    yield root
    shutil.rmtree(folder)


@pytest.fixture(name="executor")
def _executor(root: Path) -> LocalSandboxExecutor:
    return LocalSandboxExecutor(root=root)


@pytest.fixture(name="listener")
def _listener() -> Iterator[socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        yield listener


def leftovers(root: Path) -> list[Path]:
    return list(root.iterdir())


def cgroups_of(run_id: str) -> list[Path]:
    return [
        folder
        for hierarchy in ("memory", "pids", ".")
        for folder in Path("/sys/fs/cgroup", hierarchy, "kdcube").glob(f"{run_id}-*")
    ]


def assert_cleaned(root: Path, result: ExecResult) -> None:
    assert leftovers(root) == []
    assert cgroups_of(result.run_id) == []


@pytest.mark.skipif(not IS_ROOT, reason="changing user needs root")
async def test_the_program_runs_as_the_unprivileged_user(
    executor: LocalSandboxExecutor,
) -> None:
    code = "import os\nprint(os.getuid(), os.getgid(), os.getgroups(), os.getcwd())"

    result = await executor.run(ExecRequest(code))

    assert result.stdout == b"65534 65534 [] /workspace\n", result.stderr


async def test_the_network_is_unreachable(
    executor: LocalSandboxExecutor, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    code = f"""
import socket
import tempfile
for address in [("127.0.0.1", {port}), ("10.255.255.1", 80)]:
    try:
        socket.create_connection(address, timeout=2)
        print("connected")
    except OSError as error:
        print(type(error).__name__)
"""
    result = await executor.run(ExecRequest(code))

    assert result.stdout.split() == [b"ConnectionRefusedError", b"OSError"]
    with pytest.raises(BlockingIOError):
        listener.accept()


async def test_host_files_outside_the_workspace_are_not_there(
    executor: LocalSandboxExecutor, tmp_path: Path
) -> None:
    (tmp_path / "secret.txt").write_text("secret")
    paths = ["/etc/shadow", "/etc/passwd", "/root", "/home", str(PROJECT)]
    paths += [str(tmp_path / "secret.txt"), str(tmp_path)]
    code = f"""
import json, os
seen = {{}}
for path in {paths!r}:
    try:
        seen[path] = os.listdir(path) if os.path.isdir(path) else open(path).read()
    except OSError as error:
        seen[path] = type(error).__name__
print(json.dumps(seen))
"""
    result = await executor.run(ExecRequest(code))

    seen = json.loads(result.stdout)
    assert seen == dict.fromkeys(paths, "FileNotFoundError"), result.stderr


async def test_nothing_outside_the_workspace_and_tmp_is_writable(
    executor: LocalSandboxExecutor,
) -> None:
    code = """
for path in ["/usr/evil", "/bin/evil", "/evil", "/proc/evil", "/workspace/../evil"]:
    try:
        open(path, "w")
        print("wrote", path)
    except OSError as error:
        print(type(error).__name__)
open("/tmp/fine", "w").write("private")
"""
    result = await executor.run(ExecRequest(code))

    assert b"wrote" not in result.stdout and result.exit_code == 0, result.stderr
    assert not any(map(os.path.lexists, ["/usr/evil", "/evil"]))


@needs_cgroups
async def test_concurrent_runs_each_keep_their_own_process_allowance(
    root: Path,
) -> None:
    # Every run has the same uid: a per-uid limit would let the first runs'
    # children use up the allowance of the runs started after them.
    executor = LocalSandboxExecutor(root=root, max_processes=6)
    code = """
import os, time
for forked in range(1, 6):
    if os.fork() == 0:
        time.sleep(2)
        os._exit(0)
print(forked, flush=True)
"""
    results: list[ExecResult] = []

    async def one() -> None:
        results.append(await executor.run(ExecRequest(code, timeout_s=10)))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as runs:
            for _ in range(12):
                runs.start_soon(one)

    assert [r.stdout for r in results] == [b"5\n"] * 12, [r.stderr for r in results]
    for result in results:
        assert_cleaned(root, result)


@needs_cgroups
async def test_a_memory_bomb_is_killed_and_reported(
    executor: LocalSandboxExecutor, root: Path
) -> None:
    code = "block = b'x' * (512 * 1024 * 1024)\nprint('allocated')"

    result = await executor.run(ExecRequest(code, memory_mb=64))

    assert result.exit_code == -9
    assert result.memory_exceeded and not result.ok
    assert result.stdout == b""
    assert_cleaned(root, result)


@pytest.mark.skipif(not IS_ROOT, reason="changing user needs root")
async def test_a_root_the_user_cannot_reach_is_an_exec_error(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    executor = LocalSandboxExecutor(root=private)

    with pytest.raises(ExecError, match="not reachable by uid 65534"):
        await executor.run(ExecRequest("print(1)"))

    assert leftovers(private) == []


async def test_without_cgroups_limits_fall_back_to_rlimits(
    root: Path, tmp_path: Path
) -> None:
    with capture_logs() as logs:
        executor = LocalSandboxExecutor(root=root, cgroup_root=tmp_path / "none")

    assert executor.cgroups is None
    assert [entry["event"] for entry in logs] == ["exec.sandbox.no_cgroups"]
    code = "print(1)\nblock = b'x' * (512 * 1024 * 1024)"
    result = await executor.run(ExecRequest(code, memory_mb=64))
    assert result.stdout == b"1\n"
    assert b"MemoryError" in result.stderr and not result.memory_exceeded
    assert leftovers(root) == []


async def test_a_missing_bwrap_is_an_exec_error_naming_the_package(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    executor = LocalSandboxExecutor(root=root)

    with pytest.raises(ExecError, match="bubblewrap"):
        await executor.run(ExecRequest("print(1)"))

    assert leftovers(root) == []


async def test_an_interpreter_outside_the_system_folders_is_refused(
    root: Path,
) -> None:
    executor = LocalSandboxExecutor(root=root, python=str(PROJECT / "python"))

    with pytest.raises(ExecError, match="system|/usr"):
        await executor.run(ExecRequest("print(1)"))
