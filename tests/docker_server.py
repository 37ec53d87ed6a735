"""A real Docker daemon for the docker executor's tests, with its image.

``KDCUBE_TEST_DOCKER_HOST`` names one (``unix:///path/docker.sock``). Unset, a
throwaway dockerd is started through ``ops/exec/docker.sh start`` when
``dockerd`` is installed (``ops/exec/docker.sh install``) and this runs as
root. Either way the sandbox image is built through ``ops/exec/docker.sh
image`` unless the daemon has it; the first build runs debootstrap (about a
minute), later ones reuse its cached root file system. When no daemon can be
had, the tests that need one are skipped, except under CI (``CI`` set),
where that is an error. ``containers`` and ``volumes`` ask the daemon what
the runs left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kdcube.exec.docker import API_VERSION, DEFAULT_IMAGE, RUN_ID_LABEL
from tests.needs import missing

SCRIPT = Path(__file__).resolve().parents[1] / "ops" / "exec" / "docker.sh"
# debootstrap, when the root file system is not cached yet.
IMAGE_BUILD_S = 600


def _no_docker(reason: str) -> None:
    missing(
        f"no Docker daemon: {reason}; set KDCUBE_TEST_DOCKER_HOST"
        " or run ops/exec/docker.sh install as root"
    )


def _require_dockerd() -> None:
    if not (shutil.which("dockerd") or Path("/usr/sbin/dockerd").exists()):
        _no_docker("dockerd is not installed (ops/exec/docker.sh install)")
    if os.geteuid() != 0:
        _no_docker("starting a dockerd needs root")


def _build_image(docker_host: str) -> None:
    subprocess.run(
        [str(SCRIPT), "image", DEFAULT_IMAGE],
        check=True,
        env={**os.environ, "DOCKER_HOST": docker_host},
        timeout=IMAGE_BUILD_S,
    )


@pytest.fixture(scope="session")
def docker_host() -> Iterator[str]:
    """The URL of the Docker daemon shared by the whole session, holding the
    sandbox image."""
    given = os.environ.get("KDCUBE_TEST_DOCKER_HOST")
    if given:
        _build_image(given)
        yield given
        return

    _require_dockerd()
    # Short, under /tmp: a unix socket's path must fit in 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="kdcube-docker-", dir="/tmp"))
    try:
        started = subprocess.run(
            [str(SCRIPT), "start", str(folder)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        url = started.stdout.split()[-1]
        _build_image(url)
        yield url
    finally:
        subprocess.run([str(SCRIPT), "stop", str(folder)], check=False, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def engine(docker_host: str) -> httpx.Client:
    """A client of the daemon's API on its unix socket."""
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=docker_host.removeprefix("unix://")),
        base_url=f"http://docker/{API_VERSION}",
        timeout=10,
    )


def containers(docker_host: str, run_id: str) -> list[str]:
    """The ids of the containers, running or not, of the run ``run_id``."""
    filters = json.dumps({"label": [f"{RUN_ID_LABEL}={run_id}"]})
    with engine(docker_host) as client:
        response = client.get(
            "/containers/json", params={"all": "1", "filters": filters}
        )
    return [container["Id"] for container in response.raise_for_status().json()]


def volumes(docker_host: str) -> set[str]:
    with engine(docker_host) as client:
        response = client.get("/volumes")
    return {
        volume["Name"] for volume in response.raise_for_status().json()["Volumes"] or []
    }
