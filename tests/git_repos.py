"""Git repositories made in a test: a bare origin and a working copy."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_COMMITTER = ["-c", "user.name=Test", "-c", "user.email=test@example.com"]


def git(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["git", *_COMMITTER, *map(str, args)],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


@dataclass
class Origin:
    """A remote (bare) repository, and a working copy that pushes to it."""

    work: Path
    bare: Path

    @property
    def url(self) -> str:
        return self.bare.as_uri()

    def commit(self, version: str, branch: str = "main", *, code: str = "") -> str:
        """Commit a bundle answering ``version``; ``code`` runs before it answers."""
        bundle = self.work / "bundle"
        bundle.mkdir(exist_ok=True)
        body = "".join(f"    {line}\n" for line in code.splitlines())
        (bundle / "entrypoint.py").write_text(
            f'import anyio\n\n\nasync def run(ctx):\n{body}    return "{version}"\n'
        )
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", version, cwd=self.work)
        git("push", "-q", "origin", f"HEAD:{branch}", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def commit_off_every_branch(self, version: str) -> str:
        git("checkout", "-q", "-b", "side", cwd=self.work)
        commit = self.commit(version, branch="side")
        git("push", "-q", "origin", ":side", cwd=self.work)
        git("checkout", "-q", "main", cwd=self.work)
        return commit

    def tag(self, name: str) -> None:
        git("tag", "-a", name, "-m", name, cwd=self.work)
        git("push", "-q", "origin", name, cwd=self.work)


def new_origin(folder: Path) -> Origin:
    """An origin whose main branch holds bundle v1, tagged v1."""
    origin = Origin(folder / "work", folder / "origin.git")
    git("init", "-q", "--bare", "-b", "main", origin.bare)
    git("init", "-q", "-b", "main", origin.work)
    git("remote", "add", "origin", origin.bare, cwd=origin.work)
    origin.commit("v1")
    origin.tag("v1")
    return origin
