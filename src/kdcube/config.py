"""Settings read from ``KDCUBE_*`` environment variables.

One settings object per process. A bad value stops start-up with one line that
names the variable, so an operator never has to read a traceback to fix a typo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

AsyncBackend = Literal["trio", "asyncio"]
AuthMode = Literal["dev", "oidc"]

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class ConfigError(Exception):
    """The configuration cannot be used; the message names what to fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KDCUBE_", extra="ignore")

    tenant: str = Field("home", pattern=_NAME_PATTERN)
    project: str = Field("default", pattern=_NAME_PATTERN)
    home: Path = Path(".kdcube")
    async_backend: AsyncBackend = "trio"
    auth: AuthMode | None = None

    redis_url: str | None = None
    postgres_dsn: str | None = None
    storage_path: str | None = None
    s3_endpoint_url: str | None = None
    clamd: str | None = None
    bundles: Path | None = None
    gateway_config: Path | None = None

    drain_timeout_s: float = Field(30.0, ge=0)
    proc_concurrency: int = Field(32, ge=1, le=10_000)
    lease_s: float = Field(10.0, gt=0)
    turn_idle_timeout_s: float = Field(600.0, gt=0)
    turn_wall_timeout_s: float = Field(2400.0, gt=0)
    sse_keepalive_s: float = Field(10.0, gt=0)
    relay_retention_s: float = Field(600.0, ge=600)
    relay_max_events: int = Field(10_000, ge=100)
    max_prompt_chars: int = Field(32_000, ge=1)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    session_ttl_s: float = Field(86_400.0, gt=0)

    @field_validator("storage_path")
    @classmethod
    def _known_storage_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("file://", "s3://")):
            raise ValueError("must start with file:// or s3://")
        return value

    @property
    def distributed(self) -> bool:
        """Whether real Redis and Postgres replace the embedded backends."""
        return self.redis_url is not None and self.postgres_dsn is not None

    def storage_url(self) -> str:
        if self.storage_path is not None:
            return self.storage_path
        return (self.home / "storage").resolve().as_uri()


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus explicit overrides) or raise ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        raise ConfigError(
            f"invalid KDCUBE_{field.upper()}: {first['msg']}"
            f" (got {first.get('input')!r})"
        ) from None
