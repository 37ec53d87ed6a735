"""What only DockerExecutor does: its container's settings and its daemon.

What every executor does is held in tests/contract/test_executor.py.

The daemon comes from the ``docker_host`` fixture (tests/docker_server.py).
Every run goes through ``Tracked``, which remembers its run id, so that after
each test no container of its runs, and no new volume, is left. Time limits
here are real time, since the programs run outside the event loop; they are
kept short.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kdcube.exec import ExecError, ExecRequest, ExecResult, OutputSink
from kdcube.exec.docker import DockerExecutor
from tests.docker_server import containers, volumes

# The first test may wait for the session's daemon and image (debootstrap,
# when its root file system is not cached).
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

UID_GID = (65534, 65534)


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    if request.param == "trio":
        return "trio", {}
    # Explicit: once trio-asyncio is imported, asyncio's default loop is its own.
    return "asyncio", {"loop_factory": asyncio.SelectorEventLoop}


class Tracked(DockerExecutor):
    """A DockerExecutor whose runs are remembered, to check what they left."""

    def __init__(self, docker_host: str) -> None:
        super().__init__(docker_host=docker_host)
        self.run_ids: list[str] = []

    async def run(
        self, request: ExecRequest, *, on_output: OutputSink | None = None
    ) -> ExecResult:
        self.run_ids.append(request.run_id)
        return await super().run(request, on_output=on_output)


@pytest.fixture(name="executor")
def _executor(docker_host: str) -> Iterator[Tracked]:
    volumes_before = volumes(docker_host)
    tracked = Tracked(docker_host)
    yield tracked
    for run_id in tracked.run_ids:
        assert containers(docker_host, run_id) == [], run_id
    assert volumes(docker_host) - volumes_before == set()


async def test_runs_as_the_unprivileged_user_in_its_workspace(
    executor: Tracked,
) -> None:
    code = "import os\nprint(os.getuid(), os.getgid(), os.getcwd())"

    result = await executor.run(ExecRequest(code))

    uid, gid, cwd = result.stdout.decode().split()
    assert (int(uid), int(gid), cwd) == (*UID_GID, "/workspace")


async def test_the_network_is_unreachable(executor: Tracked) -> None:
    code = """
import socket
for address in [("1.1.1.1", 53), ("172.17.0.1", 2375), ("10.0.2.2", 80)]:
    try:
        socket.create_connection(address, timeout=2)
        print("connected", address)
    except OSError as error:
        print("refused", error.errno)
print(sorted(name for _, name in socket.if_nameindex()))
"""
    result = await executor.run(ExecRequest(code))

    assert b"connected" not in result.stdout
    assert result.stdout.count(b"refused %d" % errno.ENETUNREACH) == 3
    assert result.stdout.endswith(b"['lo']\n")


async def test_host_files_are_out_of_reach(executor: Tracked, tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    marker.write_text("host-secret-5b1f")
    code = f"""
for path in [{str(marker)!r}, "/etc/shadow", "/proc/1/root/etc/shadow"]:
    try:
        print(open(path).read())
    except OSError as error:
        print(type(error).__name__)
"""
    result = await executor.run(ExecRequest(code))

    assert result.stdout.split() == [
        b"FileNotFoundError",
        b"PermissionError",
        b"PermissionError",
    ]


async def test_the_root_file_system_is_read_only(executor: Tracked) -> None:
    code = """
import os, stat
for path in ["/var/tmp/x", "/usr/x", "/tmp/run.sh", "/workspace/x"]:
    try:
        open(path, "w").write("#!/bin/sh\\necho ran\\n")
        print("wrote", path)
    except OSError as error:
        print(error.strerror, path)
os.chmod("/tmp/run.sh", 0o755)
try:
    os.execv("/tmp/run.sh", ["run.sh"])
except OSError as error:
    print(error.strerror, "exec /tmp")
"""
    result = await executor.run(ExecRequest(code))

    assert result.stdout.decode().splitlines() == [
        "Read-only file system /var/tmp/x",
        "Read-only file system /usr/x",
        "wrote /tmp/run.sh",
        "wrote /workspace/x",
        "Permission denied exec /tmp",
    ]


async def test_a_memory_bomb_is_killed_and_reported(executor: Tracked) -> None:
    code = "block = bytearray(512 * 1024 * 1024)\nprint('allocated')"

    result = await executor.run(ExecRequest(code, memory_mb=64))

    assert result.memory_exceeded
    assert result.exit_code == -9 and not result.timed_out
    assert result.stdout == b""


async def test_a_missing_image_is_an_exec_error(docker_host: str) -> None:
    executor = DockerExecutor(docker_host=docker_host, image="kdcube/absent:none")

    with pytest.raises(ExecError, match=r"kdcube/absent:none.*docker\.sh image"):
        await executor.run(ExecRequest("print(1)"))


async def test_an_unreachable_daemon_is_an_exec_error(tmp_path: Path) -> None:
    socket = tmp_path / "docker.sock"
    executor = DockerExecutor(docker_host=f"unix://{socket}")

    with pytest.raises(ExecError, match=r"docker\.sock.*docker\.sh start"):
        await executor.run(ExecRequest("print(1)"))


async def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="root"):
        DockerExecutor(user="0:0")
    with pytest.raises(ValueError, match="uid:gid"):
        DockerExecutor(user="nobody")
    with pytest.raises(ExecError, match="ssh://"):
        DockerExecutor(docker_host="ssh://host")
