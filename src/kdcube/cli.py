"""The ``kdcube`` command."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import NoReturn

import anyio
import click

from kdcube.bundles import BundleLoadError, RegistryError
from kdcube.config import ConfigError, Settings, load_settings
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
    settings = _settings(**overrides)
    _start(settings, {Role.INGRESS, Role.PROC}, host, port)


@main.command()
@click.argument("role", type=click.Choice(sorted(_DEFAULT_PORTS)))
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), help="Default: the role's port.")
def serve(role: str, host: str, port: int | None) -> None:
    """One role, configured from the environment, as in a container."""
    settings = _settings()
    if role not in (Role.INGRESS, Role.PROC):
        _fail(f"the {role} role is not available in this version")
    if not settings.distributed:
        _fail(
            f"kdcube serve {role} needs KDCUBE_REDIS_URL and KDCUBE_POSTGRES_DSN so"
            " that roles in other processes share work; use `kdcube run` for one process"
        )
    if settings.auth is None:
        _fail(
            "invalid KDCUBE_AUTH: set it (dev identity is never a silent default"
            " outside kdcube run)"
        )
    if settings.auth == "dev":
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


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        _fail(str(exc))


def _start(settings: Settings, roles: set[Role], host: str, port: int) -> None:
    configure_logging()
    supervisor = Supervisor(settings, roles, host=host, port=port)

    async def main_task() -> None:
        async with anyio.create_task_group() as tasks:
            running: Running = await tasks.start(serve_until_stopped, supervisor)
            click.echo(f"kdcube is ready at {running.urls[0]}", err=False)
            sys.stdout.flush()

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
