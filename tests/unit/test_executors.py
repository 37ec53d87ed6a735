"""Which executor a deployment and its bundles get (``KDCUBE_EXEC`` and a
bundle's ``config.execution.runtime.mode``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdcube.config import ConfigError, load_settings
from kdcube.exec import ExecError, ExecRequest, Executors, SubprocessExecutor
from kdcube.exec.executors import UnavailableExecutor, open_executors
from kdcube.exec.local import LocalSandboxExecutor

pytestmark = pytest.mark.anyio


def executors(**settings: object) -> Executors:
    return Executors(load_settings(home=Path("/tmp/kdcube-test"), **settings), None)


def test_the_deployments_mode_is_the_default() -> None:
    chosen = executors(exec="subprocess").for_mode(None)

    assert chosen is not None
    mode, executor = chosen
    assert mode == "subprocess" and isinstance(executor, SubprocessExecutor)


def test_off_and_unset_give_no_executor() -> None:
    assert executors().for_mode(None) is None
    assert executors(exec="off").for_mode(None) is None
    assert executors(exec="subprocess").for_mode("off") is None


def test_a_bundle_may_ask_for_another_mode_and_each_is_made_once() -> None:
    offered = executors(exec="subprocess")

    first, second = offered.for_mode("local"), offered.for_mode("local")

    assert first is not None and second is not None
    assert first[0] == "local" and isinstance(first[1], LocalSandboxExecutor)
    assert first[1] is second[1]
    assert offered.for_mode(None) != first


async def test_a_mode_this_server_cannot_provide_fails_its_runs_with_the_reason() -> (
    None
):
    chosen = executors(exec="subprocess").for_mode("fargate")

    assert chosen is not None and isinstance(chosen[1], UnavailableExecutor)
    with pytest.raises(ExecError, match="KDCUBE_EXEC_FARGATE_CLUSTER"):
        await chosen[1].run(ExecRequest("print(1)"))


def test_fargate_as_the_deployments_mode_must_be_configured() -> None:
    with pytest.raises(ConfigError, match="KDCUBE_EXEC_FARGATE_CLUSTER"):
        load_settings(exec="fargate")
    with pytest.raises(ConfigError, match="KDCUBE_STORAGE_PATH=s3://"):
        load_settings(
            exec="fargate",
            exec_fargate_cluster="c",
            exec_fargate_task_definition="t",
            exec_fargate_subnets="subnet-1",
        )


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
async def test_the_deployments_sandbox_runs_a_program(
    tmp_path: Path,
) -> None:
    settings = load_settings(home=tmp_path, exec="local")
    async with open_executors(settings, None) as offered:
        chosen = offered.for_mode(None)
        assert chosen is not None
        result = await chosen[1].run(ExecRequest("print(6 * 7)"))

    assert result.ok and result.stdout == b"42\n"
