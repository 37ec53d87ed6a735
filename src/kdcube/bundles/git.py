"""Git bundles: a bundle's code fetched from a git repository at a pinned ref.

A ref (tag, branch, commit, or the remote's default branch when none is given)
is resolved to a commit, and the code is checked out into a folder of its own
per commit, ``{repo_slug}__{bundle_id}__{commit[:12]}``. A commit never
changes, so a folder, once complete, is never written again: running turns keep
importing from it while a moved branch is checked out beside it, and a pinned
commit keeps working with the git host offline.

Layout under the managed root::

    {slug}__{bundle}__{commit12}/   a checkout without .git; complete once its
                                    .kdcube-git.json marker exists
    .{name}.tmp-{pid}-{ns}/         being written, or left by a crash; removed
                                    under the repo's lock by the next writer
    .mirrors/{slug}.git             a bare mirror of the repo, so a new commit
                                    fetches only what is new
    .locks/{slug}.lock              the host lock of the repo

Writers of one repo take three locks in turn: an in-process lock, a file lock
shared by the host's processes, and, with a bus, a bus lock shared by hosts
whose root is shared storage. The locks only save duplicate work: a checkout
becomes visible by an atomic rename of a finished folder, so a reader never sees
a half-written one even when a lock expired under a slow writer.

git itself does all the talking to the remote; every call is bounded by a
timeout, runs in its own process group and is killed with it on timeout or
cancellation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import anyio
import anyio.abc
import anyio.to_thread
import structlog

from kdcube.bundles.filelock import FileLockTimeout, hold_file_lock
from kdcube.bundles.loader import BundleLoadError
from kdcube.bundles.registry import BundleSpec
from kdcube.bus.ports import BusError, State

log = structlog.get_logger("kdcube.bundles")

MARKER = ".kdcube-git.json"
# The bus lock is not renewed: a writer slower than its TTL (several git calls
# near their timeout) may overlap one on another host. The atomic rename keeps
# the checkouts sound; the overlapping fetches into one mirror may fail on a
# ref lock, which is reported and retried after the cooldown.
BUS_LOCK_TTL_S = 300.0
FIRST_COOLDOWN_S = 60.0
LONGEST_COOLDOWN_S = 300.0

# A ref of 7 to 40 lowercase hex digits is taken for a commit id, so a branch
# or tag with such a name is shadowed by a checked-out commit of that prefix.
_HEX_REF = re.compile(r"^[0-9a-f]{7,40}$")
_FULL_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# The remote's default branch is recorded only by fetches made for a spec
# without a ref, so cached mode for such a spec needs one of those first.
_REMOTE_HEAD = "refs/kdcube/remote-head"
_INDEX_FILE = ".kdcube-index"
_ERROR_TAIL_CHARS = 600
_OUTPUT_LIMIT = 1 << 20
_URL_USERINFO = re.compile(r"\b((?:https?|ftps?)://)[^/@\s]+@")
_UNSAFE_REF = re.compile(r"(^-)|[\s\x00-\x1f\x7f]|\.\.")
# Environment variables that would point git at another repository than the
# one named on its command line.
_FOREIGN_GIT_VARIABLES = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
    "GIT_CONFIG_PARAMETERS",
)
_ALLOWED_PROTOCOLS = ("https", "http", "ssh", "git", "file")


class GitBundleError(BundleLoadError):
    """A git bundle's code cannot be had; the message names bundle, repo and ref.

    It is a BundleLoadError because to an operator it reads the same way: the
    registry is fine, but this bundle's code is not available.
    """


class _GitFailed(Exception):
    """A git step failed; the text is already redacted."""


class _CoolingDown(_GitFailed):
    """A recent failure of the same repo and ref; not retried yet."""


class _LockBusy(_GitFailed):
    """Another writer kept the repo's lock; says nothing about the repo."""


class _RefMissing(_GitFailed):
    """The remote answered, and has no such ref."""


@dataclass(frozen=True, slots=True)
class GitAuth:
    """Credentials for git, read from ``KDCUBE_GIT_*`` variables.

    ``http_token`` is sent only to the repo's own https origin, as a Bearer
    header, or as Basic ``http_user:token`` when ``http_user`` is set (GitHub
    and GitLab want Basic for personal access tokens). ``ssh_key`` is the path
    of a private key; hosts are checked strictly against ``ssh_known_hosts``
    or the user's known_hosts.
    """

    http_token: str | None = field(default=None, repr=False)
    http_user: str | None = None
    ssh_key: Path | None = None
    ssh_known_hosts: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GitAuth:
        def value(name: str) -> str | None:
            return env.get(name) or None

        key = value("KDCUBE_GIT_SSH_KEY")
        known_hosts = value("KDCUBE_GIT_SSH_KNOWN_HOSTS")
        return cls(
            http_token=value("KDCUBE_GIT_HTTP_TOKEN"),
            http_user=value("KDCUBE_GIT_HTTP_USER"),
            ssh_key=Path(key) if key else None,
            ssh_known_hosts=Path(known_hosts) if known_hosts else None,
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        if self.http_token is None:
            return ()
        return (self.http_token, self._basic_credentials())

    def http_header(self) -> str:
        assert self.http_token is not None
        if self.http_user is None:
            return f"Authorization: Bearer {self.http_token}"
        return f"Authorization: Basic {self._basic_credentials()}"

    def _basic_credentials(self) -> str:
        pair = f"{self.http_user or ''}:{self.http_token}".encode()
        return base64.b64encode(pair).decode()


def redact_url(url: str) -> str:
    """The URL without a user or password of http(s), to show or log."""
    return _URL_USERINFO.sub(r"\1***@", url)


def repo_slug(repo: str) -> str:
    """A folder-safe name for a repo: its last path part and a hash of the URL.

    The hash keeps two repos called ``bundles`` on different hosts apart.
    """
    tail = re.split(r"[/:]", repo.rstrip("/"))[-1].removesuffix(".git")
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", tail).strip(".-")[:40] or "repo"
    digest = hashlib.sha256(redact_url(repo).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


@dataclass(frozen=True, slots=True)
class _Target:
    """One bundle's repo and ref, as materialize works on them."""

    bundle_id: str
    repo: str
    ref: str | None
    subdir: str | None
    slug: str

    @classmethod
    def of(cls, spec: BundleSpec) -> _Target:
        if spec.repo is None:
            raise GitBundleError(f"bundle {spec.id!r}: no git repo is configured")
        target = cls(spec.id, spec.repo, spec.ref, spec.subdir, repo_slug(spec.repo))
        if spec.repo.startswith("-"):
            raise target.error("the repo must be a URL or a path")
        if spec.ref is not None and _UNSAFE_REF.search(spec.ref):
            raise target.error("the ref is not a valid git ref name")
        if spec.subdir is not None and not _is_relative_inside(spec.subdir):
            raise target.error("subdir must be a relative path inside the repo")
        return target

    @property
    def shown_ref(self) -> str:
        return self.ref if self.ref is not None else "HEAD (default branch)"

    @property
    def backoff_key(self) -> tuple[str, str]:
        return self.slug, self.ref or "HEAD"

    @property
    def pinned(self) -> bool:
        return self.ref is not None and _HEX_REF.match(self.ref) is not None

    def folder_name(self, commit: str) -> str:
        return f"{self.slug}__{self.bundle_id}__{commit[:12]}"

    def error(self, detail: str) -> GitBundleError:
        return GitBundleError(
            f"bundle {self.bundle_id!r}: cannot get {redact_url(self.repo)} at"
            f" {self.shown_ref}: {detail}"
        )


def _is_relative_inside(subdir: str) -> bool:
    path = PurePosixPath(subdir)
    return not path.is_absolute() and ".." not in path.parts


@dataclass(slots=True)
class _Failure:
    count: int
    until: float
    error: str


class _Backoff:
    """Failed repo+ref pairs, and until when they are not tried again.

    Each process keeps its own: processes of one host back off separately.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._failures: dict[tuple[str, str], _Failure] = {}

    def check(self, key: tuple[str, str]) -> None:
        failure = self._failures.get(key)
        if failure is None:
            return

        left = failure.until - self._clock()
        if left > 0:
            raise _CoolingDown(f"{failure.error} (next try in {left:.0f} s)")

    def failed(self, key: tuple[str, str], error: str) -> float:
        previous = self._failures.get(key)
        count = previous.count + 1 if previous else 1
        cooldown = min(FIRST_COOLDOWN_S * 2.0 ** (count - 1), LONGEST_COOLDOWN_S)
        self._failures[key] = _Failure(count, self._clock() + cooldown, error)
        return cooldown

    def succeeded(self, key: tuple[str, str]) -> None:
        self._failures.pop(key, None)


@dataclass(frozen=True, slots=True)
class _Materialized:
    folder: Path
    bundle_key: tuple[str, str]
    materialized_at: float


class GitBundles:
    """Materializes git bundles under ``root`` and removes the ones not used.

    ``env`` is the environment git runs with and where ``KDCUBE_GIT_*``
    credentials are read (the process environment by default). ``clock`` times
    the failure cooldown; tests pass a fake one.
    """

    def __init__(
        self,
        root: Path,
        *,
        state: State | None = None,
        timeout_s: float = 120.0,
        lock_wait_s: float = 300.0,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = root
        self._state = state
        self._timeout_s = timeout_s
        self._lock_wait_s = lock_wait_s
        self._env = dict(os.environ if env is None else env)
        self._auth = GitAuth.from_env(self._env)
        self._backoff = _Backoff(clock)
        self._local_locks: dict[str, anyio.Lock] = {}

    @property
    def root(self) -> Path:
        return self._root

    async def materialize(self, spec: BundleSpec, *, resolve: bool = True) -> Path:
        """The folder to load the bundle from: its checkout plus ``subdir``.

        With ``resolve`` the ref is asked of the remote and a new commit is
        fetched. Without it (request time) nothing goes over the network: the
        ref is resolved in the local mirror as it was last fetched.

        When the remote cannot be reached, the commit the local mirror last
        knew for the ref is used, with a warning; a pinned commit that is
        already checked out never needs the remote at all.
        """
        target = _Target.of(spec)
        await anyio.to_thread.run_sync(self._make_root)
        try:
            checkout = await self._checkout_for(target, resolve=resolve)
        except _GitFailed as exc:
            raise target.error(str(exc)) from None
        return _bundle_folder(target, checkout)

    async def cleanup(self, keep: set[Path], *, keep_newest: int = 3) -> list[Path]:
        """Remove checkouts in no ``keep`` path beyond the newest per bundle.

        A path in ``keep`` protects the checkout it is in (materialize returns
        the checkout plus subdir). Returns the removed checkouts.

        Readers take no lock, so ``keep`` must hold every path in use on any
        host sharing the root: a checkout left out can vanish just after a
        request-time materialize returned it. Mirrors are never removed or
        garbage-collected; they grow with the repo's history, and deleting
        ``.mirrors/{slug}.git`` reclaims the space (the next fetch is cold).
        """
        kept = {path.resolve() for path in keep}
        found = await anyio.to_thread.run_sync(_materialized, self._root)
        doomed = _beyond_newest(found, keep_newest, kept)
        removed: list[Path] = []
        for slug in sorted({item.bundle_key[0] for item in found}):
            async with self._repo_lock(slug):
                await anyio.to_thread.run_sync(_remove_leftovers, self._root, slug)
                for folder in doomed.get(slug, []):
                    await anyio.to_thread.run_sync(_remove_folder, folder)
                    log.info("bundles.git_removed", folder=str(folder))
                    removed.append(folder)
        return removed

    async def _checkout_for(self, target: _Target, *, resolve: bool) -> Path:
        pinned = await anyio.to_thread.run_sync(self._pinned_folder, target)
        if pinned is not None:
            return pinned
        if not resolve:
            return await self._from_mirror(target)

        try:
            self._backoff.check(target.backoff_key)
            commit = await self._resolve_remote(target)
        except _GitFailed as exc:
            self._note_failure(target, exc)
            if isinstance(exc, _RefMissing):
                raise
            return await self._offline_fallback(target, exc)

        try:
            checkout = await self._fetch_and_checkout(target, commit)
        except _GitFailed as exc:
            self._note_failure(target, exc)
            raise
        self._backoff.succeeded(target.backoff_key)
        return checkout

    def _note_failure(self, target: _Target, exc: _GitFailed) -> None:
        if isinstance(exc, _CoolingDown | _LockBusy):
            return

        retry_in_s = self._backoff.failed(target.backoff_key, str(exc))
        log.warning(
            "bundles.git_failed",
            bundle=target.bundle_id,
            repo=redact_url(target.repo),
            ref=target.shown_ref,
            error=str(exc),
            retry_in_s=retry_in_s,
        )

    async def _offline_fallback(self, target: _Target, exc: _GitFailed) -> Path:
        try:
            checkout = await self._from_mirror(target)
        except _GitFailed:
            raise exc from None
        log.warning(
            "bundles.git_offline",
            bundle=target.bundle_id,
            repo=redact_url(target.repo),
            ref=target.shown_ref,
            using=checkout.name,
            error=str(exc),
        )
        return checkout

    async def _resolve_remote(self, target: _Target) -> str | None:
        """The commit the remote has for the ref; None for a commit-like ref,
        which only a fetch can confirm."""
        if target.pinned:
            return None

        name = target.ref or "HEAD"
        listing = await self._git(
            "ls-remote", "--", target.repo, name, f"{name}^{{}}", repo=target.repo
        )
        commit = _pick_ref(_parse_ls_remote(listing), name)
        if commit is None:
            raise _RefMissing("the remote has no such branch or tag")
        log.debug("bundles.git_resolved", bundle=target.bundle_id, commit=commit)
        return commit

    async def _fetch_and_checkout(self, target: _Target, commit: str | None) -> Path:
        if commit is not None:
            done = self._complete(target, commit)
            if done is not None:
                return done

        async with self._repo_lock(target.slug):
            if commit is not None:
                done = self._complete(target, commit)
                if done is not None:
                    return done

            await anyio.to_thread.run_sync(_remove_leftovers, self._root, target.slug)
            await self._fetch(target)
            full = await self._mirror_commit(target)
            if full is None and target.ref and _FULL_COMMIT.match(target.ref):
                # A commit no branch or tag holds; most servers hand it out by id.
                await self._fetch(
                    target, f"+{target.ref}:refs/kdcube/pinned/{target.ref}"
                )
                full = await self._mirror_commit(target)
            if full is None:
                raise _RefMissing(
                    "the remote has no such ref; a commit must be on a branch or"
                    " tag, or be given as its full 40-hex id"
                )
            return self._complete(target, full) or await self._checkout(target, full)

    async def _from_mirror(self, target: _Target) -> Path:
        """The checkout for the ref as the local mirror knows it, no network."""
        if not (self._mirror(target.slug) / "HEAD").is_file():
            raise _GitFailed("it was never fetched on this host; resolve it first")

        commit = await self._mirror_commit(target)
        if commit is None:
            raise _GitFailed("the local mirror has no such ref; resolve it first")

        done = self._complete(target, commit)
        if done is not None:
            return done

        async with self._repo_lock(target.slug):
            await anyio.to_thread.run_sync(_remove_leftovers, self._root, target.slug)
            return self._complete(target, commit) or await self._checkout(
                target, commit
            )

    async def _fetch(self, target: _Target, *refspecs: str) -> None:
        mirror = self._mirror(target.slug)
        if not (mirror / "HEAD").is_file():
            await self._git("init", "--bare", "--quiet", str(mirror), repo=target.repo)

        if not refspecs:
            refspecs = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
            if target.ref is None:
                refspecs += (f"+HEAD:{_REMOTE_HEAD}",)

        started = anyio.current_time()
        await self._git(
            f"--git-dir={mirror}",
            "fetch",
            "--prune",
            "--no-tags",
            "--quiet",
            "--no-write-fetch-head",
            "--",
            target.repo,
            *refspecs,
            repo=target.repo,
        )
        log.info(
            "bundles.git_fetched",
            repo=redact_url(target.repo),
            seconds=round(anyio.current_time() - started, 3),
        )

    async def _mirror_commit(self, target: _Target) -> str | None:
        name = target.ref or _REMOTE_HEAD
        try:
            output = await self._git(
                f"--git-dir={self._mirror(target.slug)}",
                "rev-parse",
                "--verify",
                "--quiet",
                f"{name}^{{commit}}",
                repo=target.repo,
            )
        except _GitFailed:
            return None
        return output.strip() or None

    async def _checkout(self, target: _Target, commit: str) -> Path:
        # Submodules and Git LFS files are not fetched: a bundle gets the
        # files of its own tree only.
        name = target.folder_name(commit)
        final = self._root / name
        temp = self._root / f".{name}.tmp-{os.getpid()}-{time.time_ns()}"
        started = anyio.current_time()
        await anyio.to_thread.run_sync(temp.mkdir)
        try:
            await self._git(
                f"--git-dir={self._mirror(target.slug)}",
                f"--work-tree={temp}",
                "read-tree",
                "--reset",
                "-u",
                commit,
                repo=target.repo,
                extra_env={"GIT_INDEX_FILE": str(temp / _INDEX_FILE)},
            )
            marker = _marker(target, commit)
            await anyio.to_thread.run_sync(_finish, temp, final, marker)
        except Exception:
            # On cancellation the temp folder stays; the next writer removes it.
            await anyio.to_thread.run_sync(_remove_tree, temp)
            raise
        log.info(
            "bundles.git_materialized",
            bundle=target.bundle_id,
            commit=commit,
            folder=str(final),
            seconds=round(anyio.current_time() - started, 3),
        )
        return final

    def _complete(self, target: _Target, commit: str) -> Path | None:
        folder = self._root / target.folder_name(commit)
        return folder if (folder / MARKER).is_file() else None

    def _pinned_folder(self, target: _Target) -> Path | None:
        """A complete checkout of a commit-like ref; commits never move."""
        if not target.pinned:
            return None

        assert target.ref is not None
        pattern = target.folder_name(target.ref) + (
            "" if len(target.ref) >= 12 else "*"
        )
        matches = [
            folder
            for folder in self._root.glob(pattern)
            if _marker_commit(folder).startswith(target.ref)
        ]
        return matches[0] if len(matches) == 1 else None

    def _mirror(self, slug: str) -> Path:
        return self._root / ".mirrors" / f"{slug}.git"

    def _make_root(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def _repo_lock(self, slug: str) -> AsyncIterator[None]:
        deadline = anyio.current_time() + self._lock_wait_s
        local = self._local_locks.setdefault(slug, anyio.Lock())
        with anyio.move_on_after(self._lock_wait_s) as waited:
            await local.acquire()
        if waited.cancelled_caught:
            raise _LockBusy(f"another task held the repo for {self._lock_wait_s:g} s")

        try:
            lock_file = self._root / ".locks" / f"{slug}.lock"
            left = max(deadline - anyio.current_time(), 0.0)
            async with hold_file_lock(lock_file, wait_s=left):
                async with self._bus_lock(slug, deadline):
                    yield
        except FileLockTimeout as exc:
            raise _LockBusy(f"another process held the repo: {exc}") from None
        finally:
            local.release()

    @asynccontextmanager
    async def _bus_lock(self, slug: str, deadline: float) -> AsyncIterator[None]:
        if self._state is None:
            yield
            return

        name = f"bundles:git:{slug}"
        token = await self._take_bus_lock(name, deadline)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await self._state.unlock(name, token)
                except BusError as exc:
                    # The lock expires on its own after its TTL.
                    log.warning("bundles.git_unlock_failed", lock=name, error=str(exc))

    async def _take_bus_lock(self, name: str, deadline: float) -> int:
        assert self._state is not None
        pause = 0.05
        try:
            with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                while (
                    token := await self._state.lock(name, ttl_s=BUS_LOCK_TTL_S)
                ) is None:
                    await anyio.sleep(pause)
                    pause = min(pause * 2, 2.0)
                return token
        except TimeoutError:
            raise _LockBusy(f"another host held bus lock {name!r}") from None
        except BusError as exc:
            raise _GitFailed(f"bus lock {name!r} unavailable: {exc}") from None

    async def _git(
        self, *args: str, repo: str, extra_env: Mapping[str, str] | None = None
    ) -> str:
        """Run git, return its stdout; raise _GitFailed with redacted stderr."""
        env = git_environment(self._env, self._auth, repo) | dict(extra_env or {})
        verb = next(arg for arg in args if not arg.startswith("-"))
        stdout, stderr = bytearray(), bytearray()
        try:
            process = await anyio.open_process(
                ["git", *args],
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise _GitFailed(f"cannot run git (is it installed?): {exc}") from None
        with anyio.move_on_after(self._timeout_s) as scope:
            await _collect(process, stdout, stderr)

        detail = _tail(stderr.decode(errors="replace"), self._auth.secrets)
        if scope.cancelled_caught:
            raise _GitFailed(
                f"git {verb} timed out after {self._timeout_s:g} s and was killed"
                + (f": {detail}" if detail else "")
            )
        if process.returncode != 0:
            raise _GitFailed(f"git {verb} failed (exit {process.returncode}): {detail}")
        return stdout.decode(errors="replace")


async def _collect(
    process: anyio.abc.Process, stdout: bytearray, stderr: bytearray
) -> None:
    """Read both pipes until git exits; kill its process group if cut short."""
    finished = False
    try:
        async with anyio.create_task_group() as group:
            assert process.stdout is not None and process.stderr is not None
            group.start_soon(_drain, process.stdout, stdout)
            group.start_soon(_drain, process.stderr, stderr)
            await process.wait()
        finished = True
    finally:
        if not finished:
            _kill_group(process.pid)
        with anyio.CancelScope(shield=True):
            await process.aclose()


async def _drain(stream: anyio.abc.ByteReceiveStream, into: bytearray) -> None:
    async for chunk in stream:
        into.extend(chunk)
        del into[:-_OUTPUT_LIMIT]


def _kill_group(pid: int) -> None:
    # git runs helpers (remote-http, ssh) as children; the whole group goes.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def git_environment(
    base: Mapping[str, str], auth: GitAuth, repo: str
) -> dict[str, str]:
    """The environment of one git call: no prompts, credentials scoped to ``repo``.

    Configuration goes through ``GIT_CONFIG_*`` variables rather than ``-c``,
    so a token never shows in a process listing. Those need git 2.31 or newer.
    """
    env = {
        name: value
        for name, value in base.items()
        if name not in _FOREIGN_GIT_VARIABLES and not name.startswith("KDCUBE_GIT_")
    }
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GCM_INTERACTIVE"] = "never"
    settings = [
        # A background gc would outlive the call and race the next fetch.
        ("gc.auto", "0"),
        ("maintenance.auto", "false"),
        ("protocol.allow", "never"),
        *((f"protocol.{name}.allow", "always") for name in _ALLOWED_PROTOCOLS),
    ]
    header = _header_setting(auth, repo)
    if header is not None:
        settings.append(header)
    _add_config(env, settings)
    ssh = _ssh_command(auth)
    if ssh is not None:
        env["GIT_SSH_COMMAND"] = ssh
    elif "GIT_SSH_COMMAND" not in env and "GIT_SSH" not in env:
        env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"
    return env


def _header_setting(auth: GitAuth, repo: str) -> tuple[str, str] | None:
    if auth.http_token is None:
        return None

    parts = urlsplit(repo)
    if parts.scheme != "https" or not parts.hostname:
        # Never over plain http, and never to a host other than the repo's.
        return None
    origin = parts.netloc.rpartition("@")[2]
    return f"http.https://{origin}/.extraHeader", auth.http_header()


def _add_config(env: dict[str, str], settings: Iterable[tuple[str, str]]) -> None:
    count = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
    for key, value in settings:
        env[f"GIT_CONFIG_KEY_{count}"] = key
        env[f"GIT_CONFIG_VALUE_{count}"] = value
        count += 1
    env["GIT_CONFIG_COUNT"] = str(count)


def _ssh_command(auth: GitAuth) -> str | None:
    if auth.ssh_key is None:
        return None

    options = [
        "ssh",
        "-i",
        str(auth.ssh_key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
    ]
    if auth.ssh_known_hosts is not None:
        options += ["-o", f"UserKnownHostsFile={auth.ssh_known_hosts}"]
    return " ".join(_shell_quote(option) for option in options)


def _shell_quote(word: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./=:-]+", word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def _tail(stderr: str, secrets: Iterable[str]) -> str:
    """The end of git's stderr on one line, with credentials taken out."""
    text = redact_url(stderr)
    for secret in secrets:
        text = text.replace(secret, "***")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    joined = " | ".join(lines)
    if len(joined) > _ERROR_TAIL_CHARS:
        joined = "…" + joined[-_ERROR_TAIL_CHARS:]
    return joined


def _parse_ls_remote(listing: str) -> dict[str, str]:
    refs = {}
    for line in listing.splitlines():
        commit, _, name = line.partition("\t")
        if name:
            refs[name] = commit
    return refs


def _pick_ref(refs: Mapping[str, str], name: str) -> str | None:
    """The commit of ``name`` in git's order: exact, tag, branch; tags peeled."""
    candidates = [name, f"refs/tags/{name}", f"refs/heads/{name}"]
    for candidate in candidates:
        commit = refs.get(f"{candidate}^{{}}") or refs.get(candidate)
        if commit is not None:
            return commit
    return None


def _bundle_folder(target: _Target, checkout: Path) -> Path:
    folder = checkout / target.subdir if target.subdir else checkout
    if not folder.is_dir():
        raise target.error(
            f"subdir {target.subdir!r} is not a folder in {checkout.name}"
        )
    return folder


def _marker(target: _Target, commit: str) -> dict[str, object]:
    return {
        "bundle_id": target.bundle_id,
        "repo": redact_url(target.repo),
        "ref": target.ref,
        "commit": commit,
        "materialized_at": time.time(),
    }


def _read_marker(folder: Path) -> dict[str, object]:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _marker_commit(folder: Path) -> str:
    return str(_read_marker(folder).get("commit", ""))


def _finish(temp: Path, final: Path, marker: dict[str, object]) -> None:
    """Write the marker, then move the checkout into place in one rename."""
    (temp / _INDEX_FILE).unlink(missing_ok=True)
    (temp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if final.exists():
        # Only an incomplete folder gets here: callers looked for the marker
        # under the repo's lock. Renaming it away first keeps the swap atomic.
        _remove_folder(final)
    try:
        temp.rename(final)
    except OSError:
        if not (final / MARKER).is_file():
            raise
        # A writer that lost its lock got there first with the same commit.
        _remove_tree(temp)


def _remove_folder(folder: Path) -> None:
    """Make the folder vanish at once, then delete its files."""
    doomed = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{time.time_ns()}")
    try:
        folder.rename(doomed)
    except FileNotFoundError:
        return
    _remove_tree(doomed)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _remove_leftovers(root: Path, slug: str) -> None:
    """Temp folders of a repo, left by a crash; call with the repo's lock held.

    On a root shared by hosts without a bus, the lock does not reach the other
    hosts, and this can delete a temp folder another host is still writing;
    that host's materialize then fails and is retried after the cooldown.
    """
    for path in root.glob(f".{slug}__*.tmp-*"):
        _remove_tree(path)
        log.info("bundles.git_leftover_removed", folder=str(path))


def _materialized(root: Path) -> list[_Materialized]:
    found = []
    for folder in root.glob("*__*__*"):
        if folder.name.startswith("."):
            continue

        marker = _read_marker(folder)
        slug, _, rest = folder.name.partition("__")
        bundle_id = rest.rpartition("__")[0]
        if marker and bundle_id:
            stamp = marker.get("materialized_at")
            when = float(stamp) if isinstance(stamp, int | float) else 0.0
            found.append(_Materialized(folder, (slug, bundle_id), when))
    return found


def _beyond_newest(
    found: list[_Materialized], keep_newest: int, kept: set[Path]
) -> dict[str, list[Path]]:
    """Per repo slug, the checkouts neither among a bundle's newest nor kept."""
    by_bundle: dict[tuple[str, str], list[_Materialized]] = {}
    for item in found:
        by_bundle.setdefault(item.bundle_key, []).append(item)

    doomed: dict[str, list[Path]] = {}
    for (slug, _), items in by_bundle.items():
        items.sort(key=lambda item: item.materialized_at, reverse=True)
        for item in items[keep_newest:]:
            if not _is_kept(item.folder, kept):
                doomed.setdefault(slug, []).append(item.folder)
    return doomed


def _is_kept(folder: Path, kept: set[Path]) -> bool:
    folder = folder.resolve()
    return any(path == folder or folder in path.parents for path in kept)
