"""Settings read from ``KDCUBE_*`` environment variables.

One settings object per process. A bad value stops start-up with one line that
names the variable, so an operator never has to read a traceback to fix a typo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

AsyncBackend = Literal["trio", "asyncio"]
AuthMode = Literal["dev", "oidc"]
ScanPolicyName = Literal["required", "best_effort", "off"]
ExecMode = Literal["off", "subprocess", "local", "docker", "fargate"]
CloudWatchExport = Literal["emf", "api"]

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_COOKIE_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$"
_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

# Asymmetric algorithms only: an HS* algorithm would let anyone holding the
# issuer's public key sign tokens, and "none" signs nothing at all.
SIGNING_ALGORITHMS = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)

# A comma-separated environment value, read as a tuple of non-empty names.
CommaList = Annotated[tuple[str, ...], NoDecode]


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
    clamd_policy: ScanPolicyName | None = None
    clamd_timeout_s: float = Field(3.0, gt=0)
    exec: ExecMode | None = None
    """Where bundles run code; unset means off, except under ``kdcube run``."""
    exec_docker_image: str = Field("kdcube/exec-python:bookworm", min_length=1)
    exec_fargate_cluster: str | None = None
    exec_fargate_task_definition: str | None = None
    exec_fargate_container: str = Field("exec", min_length=1)
    exec_fargate_subnets: CommaList = ()
    exec_fargate_security_groups: CommaList = ()
    exec_fargate_assign_public_ip: bool = False
    exec_fargate_endpoint_url: str | None = None
    exec_fargate_region: str | None = None
    bundles: Path | None = None
    gateway_config: Path | None = None
    metrics_cloudwatch_namespace: str | None = Field(None, min_length=1, max_length=255)
    """Where the metrics role publishes the autoscaling figures; unset
    publishes nothing."""
    metrics_cloudwatch_export: CloudWatchExport = "emf"
    """``emf``: lines on stdout for the awslogs driver; ``api``: PutMetricData."""
    metrics_cloudwatch_endpoint_url: str | None = None
    metrics_cloudwatch_region: str | None = None
    metrics_export_interval_s: float = Field(60.0, gt=0)

    ingress_url: str | None = None
    """Where ``kdcube serve edge`` finds the ingress (``http://host:8010``)."""
    proc_url: str | None = None
    metrics_url: str | None = None
    proxylogin_url: str | None = None
    """A login proxy the edge sends ``/auth/*`` to (its ``/v1/*``)."""
    ui_dir: Path | None = None
    """The web UI's files; by default ``edge/ui`` of a source checkout."""
    ui_login_url: str | None = None
    """Where the UI sends a signed-out user under OIDC (default ``/auth/login``
    with a login proxy)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    http3: bool = False
    edge_rate_per_s: float = Field(20.0, ge=0)
    """Requests per second per client IP at the edge; 0 turns the limit off."""
    edge_rate_burst: int = Field(200, ge=1)
    edge_max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    edge_trusted_hops: int = Field(0, ge=0, le=10)
    """Proxies in front of the edge (an ALB is 1) whose X-Forwarded-For and
    X-Forwarded-Proto the edge believes; 0 believes none."""

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

    allow_anonymous: bool = True
    access_token_cookie: str = Field("__Secure-LATC", pattern=_COOKIE_PATTERN)
    id_token_cookie: str = Field("__Secure-LITC", pattern=_COOKIE_PATTERN)
    oidc_issuer: str | None = None
    oidc_audience: CommaList = ()
    oidc_jwks_url: str | None = None
    oidc_roles_claim: CommaList = ("cognito:groups", "roles")
    oidc_privileged_roles: CommaList = ("kdcube:role:super-admin", "kdcube:role:admin")
    oidc_paid_roles: CommaList = ("kdcube:role:paid",)
    oidc_algorithms: CommaList = ("RS256", "ES256")
    oidc_leeway_s: float = Field(60.0, ge=0, le=600)
    oidc_jwks_ttl_s: float = Field(3600.0, gt=0)
    oidc_jwks_cooldown_s: float = Field(30.0, ge=0)
    oidc_fetch_timeout_s: float = Field(5.0, gt=0, le=60)

    @field_validator("storage_path")
    @classmethod
    def _known_storage_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("file://", "s3://")):
            raise ValueError("must start with file:// or s3://")
        return value

    @field_validator(
        "oidc_audience",
        "oidc_roles_claim",
        "oidc_privileged_roles",
        "oidc_paid_roles",
        "oidc_algorithms",
        "exec_fargate_subnets",
        "exec_fargate_security_groups",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("oidc_algorithms")
    @classmethod
    def _asymmetric_only(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        refused = [name for name in value if name not in SIGNING_ALGORITHMS]
        if refused:
            raise ValueError(
                f"{', '.join(refused)} not accepted; choose from"
                f" {', '.join(sorted(SIGNING_ALGORITHMS))}"
            )
        if not value:
            raise ValueError("name at least one algorithm, e.g. RS256")
        return value

    @field_validator("oidc_issuer", "oidc_jwks_url")
    @classmethod
    def _fetchable(cls, value: str | None) -> str | None:
        if value is not None and not is_secure_url(value):
            raise ValueError("must be an https:// URL (http:// only for loopback)")
        return value

    @model_validator(mode="after")
    def _oidc_complete(self) -> Settings:
        # Raised as ConfigError, not ValueError: pydantic would report a
        # whole-model error without the variable's name.
        if self.auth != "oidc":
            return self
        if self.oidc_issuer is None:
            raise ConfigError(
                "missing KDCUBE_OIDC_ISSUER: KDCUBE_AUTH=oidc needs the issuer URL"
                " exactly as it appears in the tokens' iss claim"
            )
        if not self.oidc_audience:
            raise ConfigError(
                "missing KDCUBE_OIDC_AUDIENCE: KDCUBE_AUTH=oidc needs the client"
                " id(s) the tokens are issued for, comma-separated"
            )
        return self

    @model_validator(mode="after")
    def _tls_paired(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "set both KDCUBE_TLS_CERT and KDCUBE_TLS_KEY (PEM files), or neither"
            )
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"invalid KDCUBE_{name.upper()}: no file at {path}")
        if self.http3 and self.tls_cert is None:
            raise ConfigError(
                "KDCUBE_HTTP3=1 needs KDCUBE_TLS_CERT and KDCUBE_TLS_KEY: QUIC is"
                " always encrypted"
            )
        return self

    @model_validator(mode="after")
    def _fargate_complete(self) -> Settings:
        if self.exec != "fargate":
            return self
        missing = [
            f"KDCUBE_{name.upper()}"
            for name in (
                "exec_fargate_cluster",
                "exec_fargate_task_definition",
                "exec_fargate_subnets",
            )
            if not getattr(self, name)
        ]
        if missing:
            raise ConfigError(
                f"missing {', '.join(missing)}: KDCUBE_EXEC=fargate runs each"
                " program as an ECS task and needs where to run it"
            )
        if not self.storage_url().startswith("s3://"):
            raise ConfigError(
                "KDCUBE_EXEC=fargate needs KDCUBE_STORAGE_PATH=s3://...: the"
                " task receives its workspace and returns its results through S3"
            )
        return self

    @property
    def distributed(self) -> bool:
        """Whether real Redis and Postgres replace the embedded backends."""
        return self.redis_url is not None and self.postgres_dsn is not None

    def storage_url(self) -> str:
        if self.storage_path is not None:
            return self.storage_path
        return (self.home / "storage").resolve().as_uri()


def is_secure_url(url: str) -> bool:
    """Whether keys may be fetched from ``url``: https, or http on loopback."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return bool(parts.hostname)
    return parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS


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
