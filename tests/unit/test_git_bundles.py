"""Git bundles against real repositories made in tmp_path, reached by file:// URLs.

The git command line does the work here as in production. The cooldown runs
on a fake clock handed to GitBundles, so no test sleeps; the timeout test is
the one that spends real time (1 s), against a local listener that never
answers.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import anyio
import anyio.abc
import anyio.to_thread
import pytest
from structlog.testing import capture_logs

from kdcube.bundles import BundleSpec, load_bundle
from kdcube.bundles.filelock import FileLockTimeout, hold_file_lock
from kdcube.bundles.git import (
    MARKER,
    GitAuth,
    GitBundleError,
    GitBundles,
    git_environment,
    redact_url,
    repo_slug,
)
from kdcube.bus.memory.state import MemoryState
from kdcube.sdk import TurnContext
from tests.git_repos import Origin, git, new_origin

pytestmark = pytest.mark.anyio

TOKEN = "s3cr3t-token-value"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="origin")
def _origin(tmp_path: Path) -> Origin:
    return new_origin(tmp_path)


@pytest.fixture(name="env")
def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KDCUBE_GIT_")}


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(name="bundles")
def _bundles(tmp_path: Path, env: dict[str, str], clock: FakeClock) -> GitBundles:
    return GitBundles(tmp_path / "managed", env=env, clock=clock)


def spec_for(repo: str, ref: str | None, subdir: str | None = "bundle") -> BundleSpec:
    return BundleSpec(id="demo", repo=repo, ref=ref, subdir=subdir, module="entrypoint")


def version_in(folder: Path) -> str:
    return (folder / "entrypoint.py").read_text().split('"')[1]


def entries(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


async def test_tag_branch_and_commit_give_the_code_at_that_ref(
    origin: Origin, bundles: GitBundles
) -> None:
    commit = git("rev-parse", "HEAD", cwd=origin.work)
    folders = {
        ref: await bundles.materialize(spec_for(origin.url, ref))
        for ref in ["v1", "main", None, commit, commit[:7]]
    }

    assert len(set(folders.values())) == 1
    folder = folders["v1"]
    checkout = folder.parent
    assert folder.name == "bundle"
    assert checkout.name == f"{repo_slug(origin.url)}__demo__{commit[:12]}"
    assert checkout.parent == bundles.root
    assert version_in(folder) == "v1"
    assert (checkout / MARKER).is_file()
    assert not (checkout / ".git").exists()


async def test_a_full_commit_off_every_branch_is_fetched_by_id(
    origin: Origin, bundles: GitBundles
) -> None:
    commit = await anyio.to_thread.run_sync(origin.commit_off_every_branch, "side")

    with pytest.raises(GitBundleError, match="the remote has no such ref"):
        await bundles.materialize(spec_for(origin.url, commit[:10]))
    folder = await bundles.materialize(spec_for(origin.url, commit))
    by_short_id = await bundles.materialize(spec_for(origin.url, commit[:10]))

    assert version_in(folder) == "side"
    assert by_short_id == folder


async def test_the_folder_loads_as_a_bundle(
    origin: Origin, bundles: GitBundles
) -> None:
    folder = await bundles.materialize(spec_for(origin.url, "v1"))

    loaded = load_bundle(BundleSpec(id="demo", path=folder, module="entrypoint"))

    assert await loaded.run(cast(TurnContext, None)) == "v1"


async def test_a_new_commit_on_the_branch_sits_beside_the_old_one(
    origin: Origin, bundles: GitBundles
) -> None:
    first = await bundles.materialize(spec_for(origin.url, "main"))
    await anyio.to_thread.run_sync(origin.commit, "v2")

    second = await bundles.materialize(spec_for(origin.url, "main"))
    tagged = await bundles.materialize(spec_for(origin.url, "v1"))

    assert second != first
    assert tagged == first
    assert (version_in(first), version_in(second)) == ("v1", "v2")


async def test_concurrent_calls_share_one_folder_and_leave_nothing_behind(
    origin: Origin, bundles: GitBundles, env: dict[str, str]
) -> None:
    # A second instance on the same root stands for another process: it shares
    # only the file lock with the first.
    other = GitBundles(bundles.root, env=env)
    results: list[Path] = []

    async def materialize(instance: GitBundles) -> None:
        results.append(await instance.materialize(spec_for(origin.url, "v1")))

    async with anyio.create_task_group() as group:
        for number in range(10):
            group.start_soon(materialize, (bundles, other)[number % 2])

    assert len(results) == 10
    assert len(set(results)) == 1
    assert entries(bundles.root) == [".locks", ".mirrors", results[0].parent.name]


async def test_processes_on_other_hosts_are_kept_out_by_the_bus_lock(
    origin: Origin, tmp_path: Path, env: dict[str, str]
) -> None:
    state = MemoryState()
    bundles = GitBundles(tmp_path / "managed", state=state, env=env, lock_wait_s=0.5)
    name = f"bundles:git:{repo_slug(origin.url)}"
    token = await state.lock(name, ttl_s=60)
    assert token is not None

    with pytest.raises(GitBundleError, match="another host held bus lock"):
        await bundles.materialize(spec_for(origin.url, "v1"))

    assert await state.unlock(name, token)
    folder = await bundles.materialize(spec_for(origin.url, "v1"))
    assert version_in(folder) == "v1"
    assert await state.lock(name, ttl_s=60) is not None


async def test_a_missing_ref_fails_clearly_then_fast_until_the_cooldown_ends(
    origin: Origin, bundles: GitBundles, clock: FakeClock
) -> None:
    spec = spec_for(origin.url, "no-such-tag")

    with pytest.raises(GitBundleError) as first:
        await bundles.materialize(spec)
    message = str(first.value)
    assert "'demo'" in message
    assert origin.url in message
    assert "no-such-tag" in message
    assert "no such branch or tag" in message

    clock.now += 59
    with pytest.raises(GitBundleError, match=r"next try in 1 s"):
        await bundles.materialize(spec)

    clock.now += 2
    with pytest.raises(GitBundleError) as retried:
        await bundles.materialize(spec)
    assert "next try" not in str(retried.value)

    clock.now += 119
    with pytest.raises(GitBundleError, match=r"next try in 1 s"):
        await bundles.materialize(spec)


async def test_a_bad_repo_names_it_with_what_git_said(
    tmp_path: Path, bundles: GitBundles
) -> None:
    missing = (tmp_path / "nowhere.git").as_uri()

    with pytest.raises(GitBundleError) as caught:
        await bundles.materialize(spec_for(missing, "v1"))

    message = str(caught.value)
    assert message.startswith(f"bundle 'demo': cannot get {missing} at v1: ")
    assert "git ls-remote failed (exit 128)" in message
    assert "nowhere.git" in message


@dataclass
class SilentServer:
    """A local listener that accepts connections and never says a word."""

    port: int
    asked: anyio.Event
    hung_up: anyio.Event


@pytest.fixture(name="silent")
async def _silent() -> AsyncIterator[SilentServer]:
    asked, hung_up = anyio.Event(), anyio.Event()

    async def listen(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                while True:
                    await stream.receive()
                    asked.set()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                hung_up.set()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as group:
        group.start_soon(listener.serve, listen)
        yield SilentServer(port, asked, hung_up)
        group.cancel_scope.cancel()


async def test_a_hanging_remote_is_killed_at_the_timeout(
    tmp_path: Path, env: dict[str, str], silent: SilentServer
) -> None:
    bundles = GitBundles(tmp_path / "managed", env=env, timeout_s=1)
    started = time.monotonic()

    with pytest.raises(GitBundleError, match=r"git ls-remote timed out after 1 s"):
        await bundles.materialize(
            spec_for(f"git://127.0.0.1:{silent.port}/bundles.git", "v1")
        )

    assert time.monotonic() - started < 10
    with anyio.fail_after(5):
        await silent.hung_up.wait()


async def test_cancelling_a_materialize_kills_git(
    tmp_path: Path, env: dict[str, str], silent: SilentServer
) -> None:
    bundles = GitBundles(tmp_path / "managed", env=env)
    spec = spec_for(f"git://127.0.0.1:{silent.port}/bundles.git", "v1")

    async with anyio.create_task_group() as group:
        group.start_soon(bundles.materialize, spec)
        with anyio.fail_after(10):
            await silent.asked.wait()
        group.cancel_scope.cancel()

    with anyio.fail_after(5):
        await silent.hung_up.wait()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_credentials_never_show_in_errors_or_logs(
    tmp_path: Path, env: dict[str, str], scheme: str
) -> None:
    env |= {"KDCUBE_GIT_HTTP_TOKEN": TOKEN, "KDCUBE_GIT_HTTP_USER": "bot"}
    bundles = GitBundles(tmp_path / "managed", env=env)
    repo = f"{scheme}://bot:{TOKEN}@127.0.0.1:{closed_port()}/bundles.git"

    with capture_logs() as logs, pytest.raises(GitBundleError) as caught:
        await bundles.materialize(spec_for(repo, "v1"))

    message = str(caught.value)
    assert f"{scheme}://***@127.0.0.1" in message
    assert TOKEN not in message
    assert TOKEN not in repr(logs)
    assert [entry["event"] for entry in logs] == ["bundles.git_failed"]


def test_the_token_goes_only_to_the_https_origin_and_never_on_argv() -> None:
    auth = GitAuth(http_token=TOKEN)
    base = {"KDCUBE_GIT_HTTP_TOKEN": TOKEN, "GIT_DIR": "/elsewhere", "PATH": "/bin"}

    https = git_environment(base, auth, "https://git.example.com:8443/org/b.git")
    plain = git_environment(base, auth, "http://git.example.com/org/b.git")

    settings = {
        https[f"GIT_CONFIG_KEY_{i}"]: https[f"GIT_CONFIG_VALUE_{i}"]
        for i in range(int(https["GIT_CONFIG_COUNT"]))
    }
    header_key = "http.https://git.example.com:8443/.extraHeader"
    assert settings[header_key] == f"Authorization: Bearer {TOKEN}"
    assert TOKEN not in repr(plain)
    assert "KDCUBE_GIT_HTTP_TOKEN" not in https
    assert "GIT_DIR" not in https
    assert https["GIT_TERMINAL_PROMPT"] == "0"
    assert TOKEN not in repr(auth)


def test_ssh_credentials_check_hosts_strictly() -> None:
    auth = GitAuth.from_env(
        {
            "KDCUBE_GIT_SSH_KEY": "/keys/deploy key",
            "KDCUBE_GIT_SSH_KNOWN_HOSTS": "/keys/known_hosts",
        }
    )

    command = git_environment({}, auth, "git@example.com:org/b.git")["GIT_SSH_COMMAND"]

    assert command == (
        "ssh -i '/keys/deploy key' -o IdentitiesOnly=yes -o BatchMode=yes"
        " -o StrictHostKeyChecking=yes -o UserKnownHostsFile=/keys/known_hosts"
    )


def test_urls_lose_their_credentials_when_shown() -> None:
    assert redact_url("https://u:p@h/r.git") == "https://***@h/r.git"
    assert redact_url("ssh://git@h/r.git") == "ssh://git@h/r.git"
    assert repo_slug("https://a/x/bundles.git") != repo_slug("https://b/x/bundles.git")
    assert repo_slug("git@github.com:org/My_Bundles.git").startswith("My-Bundles-")


async def test_offline_the_last_known_commit_keeps_working(
    origin: Origin, bundles: GitBundles
) -> None:
    commit = git("rev-parse", "HEAD", cwd=origin.work)
    folder = await bundles.materialize(spec_for(origin.url, "v1"))
    origin.bare.rename(origin.bare.with_name("gone.git"))

    with capture_logs() as logs:
        offline = await bundles.materialize(spec_for(origin.url, "v1"))
    pinned = await bundles.materialize(spec_for(origin.url, commit))
    cached = await bundles.materialize(spec_for(origin.url, "main"), resolve=False)

    assert offline == pinned == cached == folder
    assert [entry["event"] for entry in logs] == [
        "bundles.git_failed",
        "bundles.git_offline",
    ]


async def test_cached_mode_needs_an_earlier_fetch(
    origin: Origin, bundles: GitBundles
) -> None:
    with pytest.raises(GitBundleError, match="never fetched on this host"):
        await bundles.materialize(spec_for(origin.url, "v1"), resolve=False)


async def test_a_missing_subdir_or_unsafe_ref_is_refused(
    origin: Origin, bundles: GitBundles
) -> None:
    with pytest.raises(GitBundleError, match="subdir 'nope' is not a folder"):
        await bundles.materialize(spec_for(origin.url, "v1", subdir="nope"))
    with pytest.raises(GitBundleError, match="relative path inside"):
        await bundles.materialize(spec_for(origin.url, "v1", subdir="../up"))
    with pytest.raises(GitBundleError, match="not a valid git ref"):
        await bundles.materialize(spec_for(origin.url, "--upload-pack=touch"))
    with pytest.raises(GitBundleError, match="must be a URL"):
        await bundles.materialize(spec_for("--upload-pack=touch", "v1"))


async def test_cleanup_keeps_what_is_used_and_the_newest(
    origin: Origin, bundles: GitBundles
) -> None:
    folders = [await bundles.materialize(spec_for(origin.url, "main"))]
    for version in ["v2", "v3", "v4"]:
        await anyio.to_thread.run_sync(origin.commit, version)
        folders.append(await bundles.materialize(spec_for(origin.url, "main")))
    checkouts = [folder.parent for folder in folders]

    removed = await bundles.cleanup({folders[0]}, keep_newest=2)

    assert removed == [checkouts[1]]
    assert [c.exists() for c in checkouts] == [True, False, True, True]
    assert not [name for name in entries(bundles.root) if ".tmp-" in name]


async def test_a_crash_leftover_is_removed_by_the_next_writer(
    origin: Origin, bundles: GitBundles
) -> None:
    leftover = bundles.root / f".{repo_slug(origin.url)}__demo__0123.tmp-1-2"
    leftover.mkdir(parents=True)
    (leftover / "half-written.py").write_text("")

    folder = await bundles.materialize(spec_for(origin.url, "v1"))

    assert not leftover.exists()
    assert entries(bundles.root) == [".locks", ".mirrors", folder.parent.name]


async def test_the_file_lock_waits_a_bounded_time(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "repo.lock"

    async with hold_file_lock(path, wait_s=1):
        with pytest.raises(FileLockTimeout, match="stayed locked"):
            async with hold_file_lock(path, wait_s=0.1):
                pass

    async with hold_file_lock(path, wait_s=0.1):
        pass
