"""The ``kdcube`` command."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import anyio
import click

from kdcube.bundles import BundleLoadError, RegistryError, read_registry
from kdcube.config import ConfigError, Settings, load_settings
from kdcube.edge import EdgeOptions
from kdcube.edge.server import edge_options, serve_edge
from kdcube.logs import configure_logging
from kdcube.runtime.supervisor import Role, Running, Supervisor, serve_until_stopped

_DEFAULT_PORTS = {"ingress": 8010, "proc": 8020, "metrics": 8090, "edge": 8080}
_STARTUP_ERRORS = (ConfigError, RegistryError, BundleLoadError)


@click.group()
def main() -> None:
    """Run AI assistants ("bundles") for many users and stream their answers."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--bundles", type=click.Path(dir_okay=False, path_type=Path), help="A bundles.yaml."
)
@click.option("--storage", help="file:///path or s3://bucket/prefix.")
def run(host: str, port: int, bundles: Path | None, storage: str | None) -> None:
    """Every role in one process on embedded backends."""
    overrides: dict[str, object] = {}
    if bundles is not None:
        overrides["bundles"] = bundles
    if storage is not None:
        overrides["storage_path"] = storage
    if "KDCUBE_EXEC" not in os.environ:
        # A developer's own machine: the example coder bundle may run code
        # there, sandboxed where bubblewrap is installed. kdcube serve never
        # runs code unasked.
        overrides["exec"] = "local" if shutil.which("bwrap") else "subprocess"
    settings = _settings(**overrides)
    # One developer on one machine: no per-address limit in front of them.
    edge = edge_options(settings, rate_limited=False)
    _start(settings, {Role.INGRESS, Role.PROC, Role.METRICS}, host, port, edge=edge)


@main.command()
@click.argument("role", type=click.Choice(sorted(_DEFAULT_PORTS)))
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), help="Default: the role's port.")
def serve(role: str, host: str, port: int | None) -> None:
    """One role, configured from the environment, as in a container."""
    settings = _settings()
    if role == "edge":
        _start_edge(settings, host, port if port is not None else _DEFAULT_PORTS[role])
        return
    if not settings.distributed:
        _fail(
            f"kdcube serve {role} needs KDCUBE_REDIS_URL and KDCUBE_POSTGRES_DSN so"
            " that roles in other processes share work; use `kdcube run` for one process"
        )
    if settings.auth is None and role != Role.METRICS:
        _fail(
            "invalid KDCUBE_AUTH: set it (dev identity is never a silent default"
            " outside kdcube run)"
        )
    if settings.auth == "dev" and role != Role.METRICS:
        click.echo(
            "kdcube: warning: KDCUBE_AUTH=dev lets anyone claim any user id", err=True
        )
    _start(
        settings, {Role(role)}, host, port if port is not None else _DEFAULT_PORTS[role]
    )


@main.command()
def migrate() -> None:
    """Apply the Postgres migrations of KDCUBE_POSTGRES_DSN, then exit."""
    settings = _settings()
    if settings.postgres_dsn is None:
        _fail("invalid KDCUBE_POSTGRES_DSN: set it to the database to migrate")

    from kdcube.runtime.platform import project_schema
    from kdcube.store.postgres import migrate as migrate_postgres

    dsn = settings.postgres_dsn
    applied = anyio.run(
        partial(migrate_postgres, dsn, project_schema(settings)),
        backend=settings.async_backend,
    )
    click.echo(f"kdcube: applied migrations {applied or 'none (up to date)'}")


@main.group()
def gateway() -> None:
    """Check or change the live gateway config (rate limits, backpressure)."""


_url_option = click.option(
    "--url",
    envvar="KDCUBE_URL",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="The ingress (or kdcube run) to talk to; env KDCUBE_URL.",
)
_token_option = click.option(
    "--token",
    envvar="KDCUBE_TOKEN",
    help="A privileged user's token; env KDCUBE_TOKEN.",
)
_file_argument = click.argument(
    "file", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)


@gateway.command("validate")
@_file_argument
def gateway_validate(file: Path) -> None:
    """Check FILE locally; nothing is sent anywhere."""
    from kdcube.gateway import InvalidGatewayConfig, load_gateway_config

    try:
        load_gateway_config(file)
    except InvalidGatewayConfig as exc:
        _fail(str(exc))
    click.echo(f"kdcube: {file} is a valid gateway config")


@gateway.command("apply")
@_file_argument
@_url_option
@_token_option
def gateway_apply(file: Path, url: str, token: str | None) -> None:
    """Validate FILE on the server and apply it to every process."""
    answer = _admin_call("POST", url, "/admin/gateway", token, body=file.read_bytes())
    click.echo(f"kdcube: gateway config version {answer['version']} applied")


@gateway.command("reset")
@_url_option
@_token_option
def gateway_reset(url: str, token: str | None) -> None:
    """Go back to the config the processes started from."""
    answer = _admin_call("POST", url, "/admin/gateway/reset", token)
    click.echo(f"kdcube: gateway config reset (version {answer['version']})")


@gateway.command("show")
@_url_option
@_token_option
def gateway_show(url: str, token: str | None) -> None:
    """Print the config in force, its version and the circuit breakers."""
    answer = _admin_call("GET", url, "/admin/gateway", token)
    click.echo(json.dumps(answer, indent=2))


@main.group()
def bundles() -> None:
    """Check or change the live bundle registry (bundles.yaml)."""


@bundles.command("validate")
@_file_argument
def bundles_validate(file: Path) -> None:
    """Check FILE locally (schema and mounted folders); nothing is sent."""
    try:
        read_registry(file)
    except RegistryError as exc:
        _fail(str(exc))
    click.echo(f"kdcube: {file} is a valid bundle registry")


@bundles.command("apply")
@_file_argument
@_url_option
@_token_option
def bundles_apply(file: Path, url: str, token: str | None) -> None:
    """Apply FILE to every processor; new turns get the new bundles."""
    answer = _admin_call("POST", url, "/admin/bundles", token, body=file.read_bytes())
    click.echo(f"kdcube: bundle registry version {answer['version']} applied")


@bundles.command("reset")
@_url_option
@_token_option
def bundles_reset(url: str, token: str | None) -> None:
    """Go back to the registry the processes started from."""
    answer = _admin_call("POST", url, "/admin/bundles/reset", token)
    click.echo(f"kdcube: bundle registry reset (version {answer['version']})")


@bundles.command("show")
@_url_option
@_token_option
def bundles_show(url: str, token: str | None) -> None:
    """Print the registry in force and its version."""
    answer = _admin_call("GET", url, "/admin/bundles", token)
    click.echo(json.dumps(answer, indent=2))


def _admin_call(
    method: str, url: str, path: str, token: str | None, *, body: bytes | None = None
) -> dict[str, Any]:
    import httpx

    headers = {"Content-Type": "application/yaml"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.request(
            method, url.rstrip("/") + path, content=body, headers=headers, timeout=30
        )
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {url}: {exc}")
    try:
        answer: dict[str, Any] = response.json()
    except ValueError:
        _fail(f"{url} answered {response.status_code} without JSON")
    if response.status_code != 200:
        _fail(f"{response.status_code} {answer.get('error')}: {answer.get('detail')}")
    return answer


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        _fail(str(exc))


def _start(
    settings: Settings,
    roles: set[Role],
    host: str,
    port: int,
    *,
    edge: EdgeOptions | None = None,
) -> None:
    supervisor = Supervisor(settings, roles, host=host, port=port, edge=edge)

    async def main_task() -> None:
        async with anyio.create_task_group() as tasks:
            running: Running = await tasks.start(serve_until_stopped, supervisor)
            _say_ready(running.urls)

    _run_main(settings, main_task)


def _start_edge(settings: Settings, host: str, port: int) -> None:
    async def main_task() -> None:
        async with anyio.create_task_group() as tasks:
            _say_ready(await tasks.start(partial(serve_edge, settings, host, port)))

    _run_main(settings, main_task)


def _say_ready(urls: list[str]) -> None:
    click.echo(f"kdcube is ready at {urls[0]}", err=False)
    sys.stdout.flush()


def _run_main(settings: Settings, main_task: Callable[[], Awaitable[None]]) -> None:
    configure_logging()
    try:
        anyio.run(main_task, backend=settings.async_backend)
    except BaseException as exc:
        startup_error = _find_startup_error(exc)
        if startup_error is None:
            raise
        _fail(str(startup_error))


def _find_startup_error(exc: BaseException) -> BaseException | None:
    """The configuration error inside ``exc``, which task groups may have wrapped."""
    if isinstance(exc, _STARTUP_ERRORS):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_startup_error(inner)
            if found is not None:
                return found
    return None


def _fail(message: str) -> NoReturn:
    click.echo(f"kdcube: {message}", err=True)
    raise SystemExit(2)
