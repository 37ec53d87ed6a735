"""What only SubprocessExecutor does: its launcher and its resource limits.

What every executor does is held in tests/contract/test_executor.py. Time
limits here are real time, since the programs run outside the event loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcube.exec import ExecError, ExecRequest, SubprocessExecutor

pytestmark = pytest.mark.anyio


@pytest.fixture(name="root")
def _root(tmp_path: Path) -> Path:
    root = tmp_path / "workspaces"
    root.mkdir()
    return root


@pytest.fixture(name="executor")
def _executor(root: Path) -> SubprocessExecutor:
    return SubprocessExecutor(root=root)


def leftovers(root: Path) -> list[Path]:
    return list(root.iterdir())


async def test_a_missing_interpreter_is_an_exec_error(root: Path) -> None:
    executor = SubprocessExecutor(root=root, python=str(root / "no-python"))

    with pytest.raises(ExecError, match="no-python"):
        await executor.run(ExecRequest("print(1)"))

    assert leftovers(root) == []


async def test_a_memory_bomb_fails_under_the_memory_limit(
    executor: SubprocessExecutor,
) -> None:
    code = "block = bytearray(512 * 1024 * 1024)\nprint('allocated')"

    result = await executor.run(ExecRequest(code, memory_mb=128))

    assert result.exit_code not in (0, None)
    assert b"MemoryError" in result.stderr
    assert result.stdout == b""


async def test_the_program_runs_in_its_workspace_under_limits(
    executor: SubprocessExecutor, root: Path
) -> None:
    code = """
import os, resource
print(os.getcwd())
print(resource.getrlimit(resource.RLIMIT_AS)[0])
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
print(os.getpgid(0) == os.getpid() == os.getsid(0))
"""
    result = await executor.run(ExecRequest(code, memory_mb=64))

    cwd, address_space, open_files, leader = result.stdout.decode().split()
    assert Path(cwd).parent == root
    assert int(address_space) == 64 * 1024 * 1024
    assert int(open_files) == 256
    assert leader == "True"
