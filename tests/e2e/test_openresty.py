"""The nginx/OpenResty edge (``edge/openresty``) in front of a real kdcube.

The configuration is rendered by ``ops/edge/nginx.sh`` and run by a private
nginx: as the current user, on a free port, with its pid, logs and temporary
files under the test's folder. Every role of the kdcube under it answers on
one port (``serve``), so the ingress and metrics upstreams both point there
(without kdcube's embedded edge: nginx takes its place);
where a test must tell the upstreams apart (the processor, ProxyLogin) a stub
that answers with what it was asked stands in.

Without nginx (``ops/edge/nginx.sh install``) these tests are skipped, except
under CI (``CI`` set), where that is an error.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from tests.certs import self_signed
from tests.helpers import REPO, Server, auth, open_stream, prompt_body, serve, submit
from tests.mirror import mirror
from tests.needs import missing
from tests.servers import free_port

SCRIPT = REPO / "ops" / "edge" / "nginx.sh"
START_TIMEOUT_S = 10
STOP_TIMEOUT_S = 10

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "strict-origin-when-cross-origin",
}


def nginx_binary() -> str | None:
    for name in ("nginx", "openresty"):
        found = shutil.which(name)
        if found:
            return found
    for path in ("/usr/sbin/nginx", "/usr/local/openresty/bin/openresty"):
        if os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(name="nginx")
def _nginx() -> str:
    binary = nginx_binary()
    if binary is None:
        missing("nginx is not installed (ops/edge/nginx.sh install)")
    return binary


@pytest.fixture(name="ui")
def _ui(tmp_path: Path) -> Path:
    """A UI folder of the test's own, so the assertions do not depend on
    what edge/ui holds today."""
    folder = tmp_path / "ui"
    folder.mkdir()
    (folder / "index.html").write_text("<!doctype html><title>kdcube test ui</title>")
    (folder / "app.js").write_text("console.log('kdcube');\n")
    return folder


def edge_environment(ui: Path, **settings: str) -> dict[str, str]:
    # The script's own settings come from the test alone, never from the
    # environment pytest runs in.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("KDCUBE_")}
    environment = {
        **inherited,
        "NGINX": nginx_binary() or "nginx",
        "KDCUBE_UI_DIR": str(ui),
        "KDCUBE_EDGE_WORKERS": "1",
        **{f"KDCUBE_{name.upper()}": value for name, value in settings.items()},
    }
    if os.geteuid() == 0:
        # A master started as root hands requests to workers running as
        # nobody, who cannot read the test's private folders.
        user = pwd.getpwuid(os.geteuid()).pw_name
        environment["KDCUBE_EDGE_USER"] = f"{user} {grp.getgrgid(os.getegid()).gr_name}"
    return environment


def render(
    out: Path, environment: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    return _script("render", out, environment)


def check_config(
    out: Path, environment: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    return _script("test", out, environment)


def _script(
    command: str, out: Path, environment: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), command, str(out)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# ---------------------------------------------------------------- the config


def test_the_rendered_plain_config_passes_nginx_t(
    nginx: str, tmp_path: Path, ui: Path
) -> None:
    out = tmp_path / "edge"
    environment = edge_environment(ui, edge_listen=f"127.0.0.1:{free_port()}")
    rendered = render(out, environment)
    assert rendered.returncode == 0, rendered.stderr
    checked = check_config(out, environment)

    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr
    conf = (out / "nginx.conf").read_text()
    # envsubst filled only kdcube's names; nginx's own variables survived.
    assert "${KDCUBE_" not in conf.replace("# ${KDCUBE_...}", "")
    assert "$proxy_add_x_forwarded_for" in conf and "$kdcube_request_id" in conf
    assert not list((out / "http.d").iterdir())
    assert "Strict-Transport-Security" not in (out / "headers.conf").read_text()


def test_the_rendered_tls_config_with_proxylogin_passes_nginx_t(
    nginx: str, tmp_path: Path, ui: Path
) -> None:
    cert, key = self_signed(tmp_path)
    out = tmp_path / "edge"
    environment = edge_environment(
        ui,
        edge_listen=f"127.0.0.1:{free_port()}",
        tls_cert=str(cert),
        tls_key=str(key),
        proxylogin_addr="127.0.0.1:9",
    )
    rendered = render(out, environment)
    assert rendered.returncode == 0, rendered.stderr
    checked = check_config(out, environment)

    assert checked.returncode == 0, checked.stderr
    listen = (out / "server.d" / "listen.conf").read_text()
    assert "ssl" in listen and "http2" in listen
    assert "Strict-Transport-Security" in (out / "headers.conf").read_text()
    assert (
        "proxy_pass http://kdcube_proxylogin/v1/;"
        in (out / "server.d" / "proxylogin.conf").read_text()
    )


def test_render_refuses_half_a_tls_setting_and_a_bad_address(
    tmp_path: Path, ui: Path
) -> None:
    cert, _ = self_signed(tmp_path)
    half = render(tmp_path / "a", edge_environment(ui, tls_cert=str(cert)))
    bad = render(tmp_path / "b", edge_environment(ui, ingress_addr="http://x:1"))

    assert half.returncode == 2 and "set both or neither" in half.stderr
    assert bad.returncode == 2 and "KDCUBE_INGRESS_ADDR=http://x:1" in bad.stderr


# ------------------------------------------------------------ a running edge


@dataclass
class Edge:
    client: httpx.AsyncClient
    folder: Path

    def log(self) -> str:
        path = self.folder / "logs" / "error.log"
        return path.read_text() if path.exists() else ""


def address(url: str) -> str:
    parsed = httpx.URL(url)
    return f"{parsed.host}:{parsed.port}"


@asynccontextmanager
async def run_edge(
    tmp_path: Path, ui: Path, *, scheme: str = "http", **settings: str
) -> AsyncIterator[Edge]:
    """nginx on the rendered config, in the foreground so that this test owns
    the process; stopped (killed if it will not stop) when the block ends."""
    port = free_port()
    out = tmp_path / "edge"
    environment = edge_environment(ui, edge_listen=f"127.0.0.1:{port}", **settings)
    await anyio.run_process(["bash", str(SCRIPT), "render", str(out)], env=environment)
    command = [
        nginx_binary() or "nginx",
        "-p",
        f"{out}/",
        "-c",
        str(out / "nginx.conf"),
    ]
    command += ["-e", str(out / "logs" / "error.log"), "-g", "daemon off;"]
    process = await anyio.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    edge_folder = out
    verify: ssl.SSLContext | bool = True
    if "tls_cert" in settings:
        verify = ssl.create_default_context(cafile=settings["tls_cert"])
    try:
        async with httpx.AsyncClient(
            base_url=f"{scheme}://localhost:{port}",
            timeout=10,
            verify=verify,
            http2=scheme == "https",
        ) as client:
            edge = Edge(client, edge_folder)
            await wait_until_answering(edge, process)
            yield edge
    finally:
        with anyio.CancelScope(shield=True):
            await stop(process)


async def wait_until_answering(edge: Edge, process: anyio.abc.Process) -> None:
    with anyio.fail_after(START_TIMEOUT_S):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"nginx exited on start-up:\n{edge.log()}")
            try:
                await edge.client.get("/health")
                return
            except httpx.TransportError:
                await anyio.sleep(0.05)


async def stop(process: anyio.abc.Process) -> None:
    if process.returncode is None:
        process.terminate()
        with anyio.move_on_after(STOP_TIMEOUT_S):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    await process.aclose()


@asynccontextmanager
async def kdcube_behind_nginx(
    tmp_path: Path, ui: Path, **settings: str
) -> AsyncIterator[tuple[Server, Edge]]:
    async with serve(tmp_path, edge=False) as server:
        upstream = address(server.url)
        roles = {"ingress_addr": upstream, "proc_addr": upstream}
        async with run_edge(
            tmp_path, ui, **{**roles, "metrics_addr": upstream, **settings}
        ) as edge:
            yield server, edge


def assert_security_headers(response: httpx.Response) -> None:
    for name, expected in SECURITY_HEADERS.items():
        assert response.headers.get_list(name) == [expected], name


@pytest.mark.anyio
async def test_events_pass_the_edge_as_kdcube_writes_them(
    nginx: str, tmp_path: Path, ui: Path
) -> None:
    async with (
        kdcube_behind_nginx(tmp_path, ui) as (_, edge),
        open_stream(edge.client, "alice") as stream,
    ):
        ack = await submit(
            edge.client, "alice", "one two three four five", bundle_id="slow"
        )
        arrivals: list[tuple[str, float]] = []
        with anyio.fail_after(10):
            while not arrivals or arrivals[-1][0] != "chat_complete":
                event = await stream.next()
                if event.turn_id == ack["turn_id"]:
                    arrivals.append((event.route, anyio.current_time()))

    deltas = [at for route, at in arrivals if route == "chat_delta"]
    assert len(deltas) == 5
    # The slow bundle pauses 0.1 s before each of its five deltas; a buffering
    # proxy would hand them over together with the final event.
    assert arrivals[-1][1] - deltas[0] >= 0.3
    assert deltas[-1] - deltas[0] >= 0.3


@pytest.mark.anyio
async def test_a_turn_that_is_still_running_streams_and_cancels_through_the_edge(
    nginx: str, tmp_path: Path, ui: Path
) -> None:
    async with (
        kdcube_behind_nginx(tmp_path, ui) as (_, edge),
        open_stream(edge.client, "alice") as stream,
    ):
        ack = await submit(edge.client, "alice", "wait", bundle_id="sleeper")
        with anyio.fail_after(5):
            [*_, delta] = await stream.until("chat_delta", ack["turn_id"])
        cancelled = await edge.client.post(
            "/sse/cancel",
            json={"conversation_id": ack["conversation_id"]},
            headers=auth("alice"),
        )
        with anyio.fail_after(5):
            events = await stream.turn(ack["turn_id"])

    # The sleeper never finishes by itself: only an unbuffered stream can
    # carry its first delta.
    assert delta.data["delta"]["text"] == "first"
    assert cancelled.status_code == 202
    assert [e.route for e in events] == ["chat_error", "conv_status"]
    assert events[0].data["data"]["error_type"] == "cancelled"


@pytest.mark.anyio
async def test_a_client_that_leaves_the_edge_releases_its_stream_in_kdcube(
    nginx: str, tmp_path: Path, ui: Path
) -> None:
    async with kdcube_behind_nginx(tmp_path, ui) as (server, edge):
        hub = server.running.hub
        async with (
            open_stream(edge.client, "alice"),
            open_stream(edge.client, "bob", "s2"),
        ):
            assert hub.connections == 2

        # Well under the 5 s keepalive: nginx notices the client leave and
        # closes its upstream connection, not the next write.
        with anyio.fail_after(3):
            while hub.connections:
                await hub.wait_change()


@pytest.mark.anyio
async def test_uploads_stream_through_up_to_the_chat_limit(
    nginx: str, tmp_path: Path, ui: Path
) -> None:
    notes = b"kdcube edge upload test line\n" * (5 * 1024 * 1024 // 29)
    async with kdcube_behind_nginx(tmp_path, ui) as (_, edge):
        accepted = await edge.client.post(
            "/sse/chat",
            data={"event_submission": json.dumps(prompt_body("read this"))},
            files=[("files", ("notes.txt", notes))],
            headers=auth("alice"),
        )
        too_big_for_api = await edge.client.post(
            "/api/conversations",
            content=b"x" * (3 * 1024 * 1024),
            headers=auth("alice"),
        )
        ack = accepted.json()
        detail = await edge.client.get(
            f"/api/conversations/{ack['conversation_id']}", headers=auth("alice")
        )

    # 5 MB is over the edge's 2 MB default but within /sse/chat's own limit.
    assert accepted.status_code == 200, accepted.text
    [turn] = detail.json()["turns"]
    assert [(a["name"], a["size"]) for a in turn["attachments"]] == [
        ("notes.txt", len(notes))
    ]
    assert too_big_for_api.status_code == 413
    assert too_big_for_api.json()["error"] == "request_entity_too_large"
    assert_security_headers(too_big_for_api)


@pytest.mark.anyio
async def test_paths_reach_their_role_the_ui_or_the_edge_itself(
    nginx: str, tmp_path: Path, ui: Path
) -> None:
    async with (
        mirror() as proc,
        mirror() as proxylogin,
        kdcube_behind_nginx(
            tmp_path, ui, proc_addr=proc, proxylogin_addr=proxylogin
        ) as (_, edge),
    ):
        client = edge.client
        health = await client.get("/health")
        metrics = await client.get("/metrics")
        report = await client.get("/metrics.json")
        listing = await client.get("/api/conversations", headers=auth("alice"))
        bundles = await client.get("/admin/bundles", headers=auth("admin-root"))
        integration = await client.get(
            "/api/integrations/tool?x=1", headers={"X-Request-Id": "req-42"}
        )
        admin_integration = await client.get("/admin/integrations/hook")
        login = await client.get("/auth/login?next=/")
        page = await client.get("/chats/some-conversation")
        root = await client.get("/")
        script = await client.get("/app.js")
        missing_script = await client.get("/gone.js")
        config = await client.get("/config.json")

    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert_security_headers(health)
    assert "strict-transport-security" not in health.headers

    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "kdcube_sse_connections" in metrics.text
    assert report.status_code == 200 and "queue" in report.json()
    assert listing.status_code == 200 and listing.json()["conversations"] == []
    assert bundles.status_code == 200 and "echo" in json.dumps(bundles.json())
    assert_security_headers(listing)

    seen = integration.json()
    assert seen["target"] == "/api/integrations/tool?x=1"
    assert seen["headers"]["x-request-id"] == "req-42"
    assert integration.headers["x-request-id"] == "req-42"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert seen["headers"]["x-forwarded-proto"] == "http"
    assert seen["headers"]["x-forwarded-host"] == "localhost"
    assert "connection" not in seen["headers"]
    assert admin_integration.json()["target"] == "/admin/integrations/hook"
    generated = admin_integration.json()["headers"]["x-request-id"]
    assert (
        len(generated) == 32 and generated == admin_integration.headers["x-request-id"]
    )
    assert login.json()["target"] == "/v1/login?next=/"

    for response in (page, root):
        assert response.status_code == 200
        assert "kdcube test ui" in response.text
        assert response.headers["cache-control"] == "no-store"
        assert_security_headers(response)
    assert script.status_code == 200 and script.headers["cache-control"] == "no-cache"
    assert script.headers["content-type"].startswith("text/javascript")
    assert missing_script.status_code == 404
    assert config.json() == {"auth": "dev", "login_url": "/auth/login"}
    assert config.headers["cache-control"] == "no-store"


@pytest.mark.anyio
async def test_a_role_that_does_not_answer_is_a_json_503(
    nginx: str, tmp_path: Path, ui: Path
) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    async with run_edge(tmp_path, ui, ingress_addr=nobody) as edge:
        response = await edge.client.get("/api/conversations", headers=auth("alice"))

    assert response.status_code == 503
    assert response.json()["error"] == "service_unavailable"
    assert response.headers["retry-after"] == "5"
    assert_security_headers(response)


@pytest.mark.anyio
async def test_tls_serves_http2_with_hsts(nginx: str, tmp_path: Path, ui: Path) -> None:
    cert, key = self_signed(tmp_path)
    async with (
        serve(tmp_path, edge=False) as server,
        run_edge(
            tmp_path,
            ui,
            scheme="https",
            ingress_addr=address(server.url),
            proc_addr=address(server.url),
            metrics_addr=address(server.url),
            tls_cert=str(cert),
            tls_key=str(key),
        ) as edge,
        open_stream(edge.client, "alice") as stream,
    ):
        ack = await submit(edge.client, "alice", "over tls")
        events = await stream.turn(ack["turn_id"])
        health = await edge.client.get("/health")

    assert health.http_version == "HTTP/2"
    assert health.headers["strict-transport-security"].startswith("max-age=")
    assert_security_headers(health)
    assert events[-2].data["data"]["final_answer"] == "over tls"
