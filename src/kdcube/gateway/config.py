"""``gateway.yaml``: rate limits, backpressure, SSE limits and circuit breakers.

The document may be a bare mapping or sit under a top-level ``gateway:`` key,
and may be YAML or JSON. Every section is optional; what is left out keeps
its default, field by field, so ``rate_limits: {paid: {hourly: 500}}`` keeps
the paid burst. Unknown keys are errors, so a typo never silently falls back
to a default.

The defaults are the values upstream ships in its ``gateway.yaml`` (not the
smaller ones its code falls back to), so an empty file behaves like theirs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

Profile = Literal["development", "testing", "production", "load_test"]

UNLIMITED = -1
"""An hourly budget of -1 means no hourly limit."""


_HUGE = 10**12
"""Above any sane setting; stops numbers that overflow the arithmetic."""


class InvalidGatewayConfig(ValueError):
    """The gateway config cannot be used; the message names the field path."""


class _Section(BaseModel):
    # Infinity and NaN would pass most range checks and then break the
    # arithmetic (or the JSON) that uses them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RateLimit(_Section):
    """One user type's budget: a sliding burst window and an hourly total."""

    hourly: int = Field(ge=UNLIMITED, le=_HUGE)
    burst: int = Field(ge=1, le=_HUGE)
    burst_window: float = Field(default=60.0, gt=0, le=3600)
    """Seconds; upstream takes whole seconds, fractions help tests."""

    @model_validator(mode="after")
    def _hourly_not_zero(self) -> RateLimit:
        if self.hourly == 0:
            raise ValueError("hourly 0 would refuse every request; use -1 for none")
        return self


_RATE_DEFAULTS: dict[str, dict[str, Any]] = {
    "anonymous": {"hourly": 120, "burst": 10, "burst_window": 60},
    "registered": {"hourly": 6000, "burst": 160, "burst_window": 60},
    "paid": {"hourly": 12000, "burst": 220, "burst_window": 60},
    "privileged": {"hourly": UNLIMITED, "burst": 400, "burst_window": 60},
}


def _merged(defaults: dict[str, dict[str, Any]], given: Any) -> Any:
    """Overlay each named sub-mapping of ``given`` on its default, field by field."""
    if not isinstance(given, dict):
        return given
    merged: dict[str, Any] = {name: dict(fields) for name, fields in defaults.items()}
    for name, fields in given.items():
        if isinstance(fields, dict) and name in merged:
            merged[name].update(fields)
        else:
            merged[name] = fields
    return merged


class RateLimits(_Section):
    anonymous: RateLimit = RateLimit(**_RATE_DEFAULTS["anonymous"])
    registered: RateLimit = RateLimit(**_RATE_DEFAULTS["registered"])
    paid: RateLimit = RateLimit(**_RATE_DEFAULTS["paid"])
    privileged: RateLimit = RateLimit(**_RATE_DEFAULTS["privileged"])

    @model_validator(mode="before")
    @classmethod
    def _field_defaults(cls, data: Any) -> Any:
        return _merged(_RATE_DEFAULTS, data)

    def for_user_type(self, user_type: str) -> RateLimit:
        """The limits of a user type; unknown types (upstream's ``external``)
        get the anonymous ones."""
        if user_type in ("registered", "paid", "privileged"):
            limits: RateLimit = getattr(self, user_type)
            return limits
        return self.anonymous


class BackpressureConfig(_Section):
    """How much queued work the processors may be handed, per user type.

    Ratios are of the capacity computed from processor heartbeats (see
    ``kdcube.gateway.backpressure``); ``max_queue_size`` caps the queue
    absolutely, 0 meaning no cap.
    """

    capacity_buffer: float = Field(default=0.1, ge=0, lt=1)
    queue_depth_multiplier: float = Field(default=3.0, gt=0, le=1000)
    anonymous_pressure_threshold: float = Field(default=0.6, gt=0, le=1)
    registered_pressure_threshold: float = Field(default=0.85, gt=0, le=1)
    paid_pressure_threshold: float = Field(default=0.9, gt=0, le=1)
    hard_limit_threshold: float = Field(default=0.98, gt=0, le=1)
    max_queue_size: int = Field(default=100, ge=0, le=_HUGE)

    @model_validator(mode="after")
    def _ordered(self) -> BackpressureConfig:
        anonymous = self.anonymous_pressure_threshold
        registered = self.registered_pressure_threshold
        paid = self.paid_pressure_threshold
        hard = self.hard_limit_threshold
        if not anonymous < registered <= paid < hard:
            raise ValueError(
                "thresholds must satisfy anonymous < registered <= paid < hard_limit;"
                f" got {anonymous} / {registered} / {paid} / {hard}"
            )
        return self


class Limits(_Section):
    max_sse_connections_per_instance: int = Field(default=200, ge=1, le=_HUGE)
    """Open SSE streams per ingress process; one more gets 429."""


class BreakerSettings(_Section):
    """One circuit breaker; see ``kdcube.gateway.breakers`` for the states."""

    failure_threshold: int = Field(default=10, ge=1, le=_HUGE)
    window_s: float = Field(default=60.0, gt=0, le=86_400)
    recovery_timeout_s: float = Field(default=30.0, gt=0, le=86_400)
    success_threshold: int = Field(default=3, ge=1, le=_HUGE)
    half_open_max_calls: int = Field(default=5, ge=1, le=_HUGE)

    @model_validator(mode="after")
    def _can_close(self) -> BreakerSettings:
        # Trial calls are counted per half-open round, so fewer trials than
        # successes needed would keep the breaker half-open for ever.
        if self.success_threshold > self.half_open_max_calls:
            raise ValueError(
                f"success_threshold ({self.success_threshold}) must not exceed"
                f" half_open_max_calls ({self.half_open_max_calls}), or the"
                " breaker could never close"
            )
        return self


# Upstream guards its own steps (authentication, rate limiter, backpressure);
# kdcube guards the dependencies those steps call, with similar numbers.
_BREAKER_DEFAULTS: dict[str, dict[str, Any]] = {
    "redis": {
        "failure_threshold": 10,
        "window_s": 60,
        # Redis restarts in seconds; a long pause would outlast the outage.
        "recovery_timeout_s": 5,
        "success_threshold": 3,
        "half_open_max_calls": 5,
    },
    "postgres": {
        "failure_threshold": 10,
        "window_s": 120,
        "recovery_timeout_s": 10,
        "success_threshold": 3,
        "half_open_max_calls": 5,
    },
    "clamd": {
        "failure_threshold": 5,
        "window_s": 120,
        "recovery_timeout_s": 60,
        "success_threshold": 2,
        "half_open_max_calls": 3,
    },
}


class Monitoring(_Section):
    heartbeat_timeout_seconds: float = Field(default=45.0, gt=0, le=86_400)
    """How old a processor heartbeat may be and still count toward capacity.

    Known shortcoming: heartbeats expire by the TTL each processor sets on
    its own beat, which ``State.alive`` applies; this value is kept for the
    operator's view and is not yet read by the capacity math.
    """


class GatewayConfig(_Section):
    profile: Profile = "development"
    enabled: bool = True
    """False skips rate limits and backpressure; breakers and caps stay."""
    rate_limits: RateLimits = RateLimits()
    backpressure: BackpressureConfig = BackpressureConfig()
    limits: Limits = Limits()
    circuit_breakers: dict[str, BreakerSettings] = Field(
        default_factory=lambda: {
            name: BreakerSettings(**fields)
            for name, fields in _BREAKER_DEFAULTS.items()
        }
    )
    monitoring: Monitoring = Monitoring()

    @model_validator(mode="before")
    @classmethod
    def _breaker_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and "circuit_breakers" in data:
            given = data["circuit_breakers"]
            data = {**data, "circuit_breakers": _merged(_BREAKER_DEFAULTS, given)}
        return data

    def breaker(self, name: str) -> BreakerSettings:
        """A breaker's settings; one the config does not name gets the defaults."""
        return self.circuit_breakers.get(name) or BreakerSettings()

    def to_json(self) -> str:
        return self.model_dump_json()


def default_gateway_config() -> GatewayConfig:
    return GatewayConfig()


def _unwrapped(document: Any) -> Any:
    if document is None:
        return {}
    if isinstance(document, dict) and set(document) == {"gateway"}:
        return document["gateway"] if document["gateway"] is not None else {}
    return document


def _reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "gateway"
    message = first["msg"].removeprefix("Value error, ")
    more = exc.error_count() - 1
    suffix = f" (and {more} more)" if more else ""
    return f"{where}: {message}{suffix}"


def gateway_config_from(document: Any) -> GatewayConfig:
    """Validate an already parsed document, or raise InvalidGatewayConfig."""
    document = _unwrapped(document)
    if not isinstance(document, dict):
        raise InvalidGatewayConfig(
            f"gateway config must be a mapping, got {type(document).__name__}"
        )
    try:
        return GatewayConfig.model_validate(document)
    except ValidationError as exc:
        raise InvalidGatewayConfig(_reason(exc)) from None


def parse_gateway_config(text: str) -> GatewayConfig:
    """Parse YAML or JSON (JSON is tried first: its errors read better)."""
    try:
        document = _parsed(text)
    except RecursionError:
        raise InvalidGatewayConfig("the document nests too deeply") from None
    return gateway_config_from(document)


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise InvalidGatewayConfig(f"not valid YAML or JSON: {reason}") from None


def load_gateway_config(path: Path) -> GatewayConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidGatewayConfig(f"cannot read {path}: {exc.strerror}") from None
    try:
        return parse_gateway_config(text)
    except InvalidGatewayConfig as exc:
        raise InvalidGatewayConfig(f"{path}: {exc}") from None
