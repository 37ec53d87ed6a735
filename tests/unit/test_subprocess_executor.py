"""SubprocessExecutor against real child processes.

Time limits here are real time, since the programs run outside the event loop;
they are kept short, and the checks for processes that must be gone read
/proc (a zombie left for init to reap counts as gone).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anyio
import pytest

from kdcube.exec import (
    ExecError,
    ExecRequest,
    ExecResult,
    StreamName,
    SubprocessExecutor,
)
from kdcube.exec.workspace import OutCaps

pytestmark = pytest.mark.anyio

PRINT_PIDS = "import os\nprint(os.getpid(), flush=True)\n"


@pytest.fixture(name="root")
def _root(tmp_path: Path) -> Path:
    root = tmp_path / "workspaces"
    root.mkdir()
    return root


@pytest.fixture(name="executor")
def _executor(root: Path) -> SubprocessExecutor:
    return SubprocessExecutor(root=root)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z"


def leftovers(root: Path) -> list[Path]:
    return list(root.iterdir())


def pids(result: ExecResult) -> list[int]:
    return [int(line) for line in result.stdout.split()]


async def test_prints_and_exits_zero(executor: SubprocessExecutor, root: Path) -> None:
    result = await executor.run(ExecRequest("print(1)", run_id="r-1"))

    assert result.run_id == "r-1"
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"1\n", b"")
    assert result.ok and not result.timed_out
    assert not result.stdout_truncated and not result.stderr_truncated
    assert 0 < result.duration_s < 5
    assert leftovers(root) == []


async def test_stderr_and_exit_code_come_back(executor: SubprocessExecutor) -> None:
    code = "import sys\nprint('half')\nprint('broken', file=sys.stderr)\nsys.exit(3)"

    result = await executor.run(ExecRequest(code))

    assert (result.exit_code, result.stdout, result.stderr) == (
        3,
        b"half\n",
        b"broken\n",
    )
    assert not result.ok


async def test_an_exception_exits_nonzero_with_its_traceback(
    executor: SubprocessExecutor,
) -> None:
    result = await executor.run(ExecRequest("1 / 0"))

    assert result.exit_code == 1
    assert b"ZeroDivisionError" in result.stderr


async def test_input_files_are_read_and_out_files_returned(
    executor: SubprocessExecutor,
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


async def test_an_out_folder_swapped_for_a_link_returns_nothing(
    executor: SubprocessExecutor, tmp_path: Path
) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret.txt").write_text("not yours")
    code = f"import os, shutil\nshutil.rmtree('out')\nos.symlink({str(host)!r}, 'out')"

    result = await executor.run(ExecRequest(code))

    assert result.exit_code == 0
    assert result.files == {}


async def test_out_files_over_the_caps_are_left_out(root: Path) -> None:
    executor = SubprocessExecutor(root=root, out_caps=OutCaps(files=2, bytes=10))
    code = "\n".join(
        f"open('out/{name}', 'wb').write(b'x' * {size})"
        for name, size in (("a", 4), ("b", 20), ("c", 4), ("d", 1))
    )

    result = await executor.run(ExecRequest(code))

    assert result.files == {"a": b"xxxx", "c": b"xxxx"}
    assert result.files_truncated


async def test_an_input_name_outside_the_workspace_is_refused() -> None:
    for name in ("/etc/passwd", "../up.txt", "a/../../b", "", "main.py"):
        with pytest.raises(ExecError):
            ExecRequest("print(1)", files={name: b""})


async def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ExecRequest("print(1)", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        ExecRequest("print(1)", memory_mb=1)


async def test_a_missing_interpreter_is_an_exec_error(root: Path) -> None:
    executor = SubprocessExecutor(root=root, python=str(root / "no-python"))

    with pytest.raises(ExecError, match="no-python"):
        await executor.run(ExecRequest("print(1)"))

    assert leftovers(root) == []


async def test_an_endless_loop_is_killed_at_the_time_limit(
    executor: SubprocessExecutor, root: Path
) -> None:
    code = PRINT_PIDS + "while True:\n    pass\n"

    with anyio.fail_after(5):
        result = await executor.run(ExecRequest(code, timeout_s=0.5))

    assert result.timed_out and not result.ok
    assert result.exit_code == -9
    assert 0.5 <= result.duration_s < 2
    assert not alive(pids(result)[0])
    assert leftovers(root) == []


async def test_forked_children_die_with_the_group_at_the_time_limit(
    executor: SubprocessExecutor,
) -> None:
    code = """
import os, time
for _ in range(3):
    if os.fork() == 0:
        # One write per line, so the children's lines never interleave.
        os.write(1, b"%d\\n" % os.getpid())
        time.sleep(60)
        os._exit(0)
time.sleep(60)
"""
    with anyio.fail_after(5):
        result = await executor.run(ExecRequest(code, timeout_s=0.5))

    children = pids(result)
    assert result.timed_out and len(children) == 3
    assert not any(alive(pid) for pid in children)


async def test_children_left_behind_by_a_finished_program_are_killed(
    executor: SubprocessExecutor,
) -> None:
    # The parent waits for its child's line, so the pid is printed before
    # the parent exits and the run's end kills the child.
    code = """
import os, time
read_end, write_end = os.pipe()
if os.fork() == 0:
    print(os.getpid(), flush=True)
    os.write(write_end, b"x")
    time.sleep(60)
os.read(read_end, 1)
"""
    with anyio.fail_after(5):
        result = await executor.run(ExecRequest(code, timeout_s=30))

    assert result.exit_code == 0 and not result.timed_out
    assert not alive(pids(result)[0])


async def test_huge_output_is_capped_while_the_program_finishes(
    executor: SubprocessExecutor,
) -> None:
    code = """
import sys
for _ in range(80):
    sys.stdout.write("x" * 65536)
print("done", file=sys.stderr)
"""
    request = ExecRequest(code, max_output_bytes=1000)

    with anyio.fail_after(10):
        result = await executor.run(request)

    assert result.exit_code == 0
    assert result.stdout == b"x" * 1000 and result.stdout_truncated
    assert result.stderr == b"done\n" and not result.stderr_truncated


async def test_a_memory_bomb_fails_under_the_memory_limit(
    executor: SubprocessExecutor,
) -> None:
    code = "block = bytearray(512 * 1024 * 1024)\nprint('allocated')"

    result = await executor.run(ExecRequest(code, memory_mb=128))

    assert result.exit_code not in (0, None)
    assert b"MemoryError" in result.stderr
    assert result.stdout == b""


async def test_cancelling_kills_the_program_and_removes_the_workspace(
    executor: SubprocessExecutor, root: Path
) -> None:
    code = PRINT_PIDS + "while True:\n    pass\n"
    seen: list[int] = []
    cancelled_at = 0.0

    with anyio.fail_after(10), anyio.CancelScope() as scope:

        async def on_output(stream: StreamName, chunk: bytes) -> None:
            nonlocal cancelled_at
            seen.append(int(chunk))
            cancelled_at = time.monotonic()
            scope.cancel()

        await executor.run(ExecRequest(code, timeout_s=30), on_output=on_output)

    assert scope.cancelled_caught
    assert time.monotonic() - cancelled_at < 1
    assert not alive(seen[0])
    assert leftovers(root) == []


async def test_output_reaches_the_sink_as_it_comes_and_matches_the_result(
    executor: SubprocessExecutor,
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


async def test_the_environment_is_empty_but_for_path_and_lang(
    executor: SubprocessExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDCUBE_SECRET", "s3cr3t")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-secret")
    code = "import json, os\nprint(json.dumps(dict(os.environ)))"

    result = await executor.run(ExecRequest(code))

    environment = json.loads(result.stdout)
    assert set(environment) == {"PATH", "LANG"}
    assert os.environ["KDCUBE_SECRET"] == "s3cr3t"


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
