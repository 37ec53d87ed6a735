"""``gateway.yaml``: defaults, partial sections, wrappers and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcube.gateway import (
    GatewayConfig,
    InvalidGatewayConfig,
    default_gateway_config,
    load_gateway_config,
    parse_gateway_config,
)

SAMPLE = Path(__file__).resolve().parents[2] / "ops" / "gateway.yaml"


def test_defaults_are_upstreams_shipped_values() -> None:
    config = default_gateway_config()
    limits = config.rate_limits

    assert config.profile == "development"
    assert (limits.anonymous.hourly, limits.anonymous.burst) == (120, 10)
    assert limits.anonymous.burst_window == 60
    assert (limits.registered.hourly, limits.registered.burst) == (6000, 160)
    assert (limits.paid.hourly, limits.paid.burst) == (12000, 220)
    assert (limits.privileged.hourly, limits.privileged.burst) == (-1, 400)
    pressure = config.backpressure
    assert (pressure.capacity_buffer, pressure.queue_depth_multiplier) == (0.1, 3)
    assert (
        pressure.anonymous_pressure_threshold,
        pressure.registered_pressure_threshold,
        pressure.paid_pressure_threshold,
        pressure.hard_limit_threshold,
        pressure.max_queue_size,
    ) == (0.6, 0.85, 0.9, 0.98, 100)
    assert config.limits.max_sse_connections_per_instance == 200
    assert sorted(config.circuit_breakers) == ["clamd", "postgres", "redis"]
    assert config.monitoring.heartbeat_timeout_seconds == 45


def test_an_empty_document_is_the_default() -> None:
    assert parse_gateway_config("") == GatewayConfig()
    assert parse_gateway_config("gateway:\n") == GatewayConfig()
    assert parse_gateway_config("{}") == GatewayConfig()


def test_the_sample_file_parses_and_holds_the_defaults() -> None:
    assert load_gateway_config(SAMPLE) == default_gateway_config()


def test_yaml_json_and_the_gateway_wrapper_agree() -> None:
    yaml_text = "profile: production\nlimits:\n  max_sse_connections_per_instance: 5\n"
    wrapped = "gateway:\n  profile: production\n  limits: {max_sse_connections_per_instance: 5}\n"
    json_text = '{"gateway": {"profile": "production", "limits": {"max_sse_connections_per_instance": 5}}}'

    configs = [parse_gateway_config(text) for text in (yaml_text, wrapped, json_text)]

    assert configs[0] == configs[1] == configs[2]
    assert configs[0].limits.max_sse_connections_per_instance == 5


def test_a_partial_section_keeps_the_other_fields_defaults() -> None:
    config = parse_gateway_config(
        "rate_limits: {paid: {hourly: 500}}\n"
        "circuit_breakers: {clamd: {failure_threshold: 9}, s3: {window_s: 5}}\n"
    )

    assert (config.rate_limits.paid.hourly, config.rate_limits.paid.burst) == (500, 220)
    assert config.rate_limits.registered.burst == 160
    clamd = config.breaker("clamd")
    assert (clamd.failure_threshold, clamd.success_threshold) == (9, 2)
    assert config.breaker("s3").window_s == 5
    assert config.breaker("redis").recovery_timeout_s == 5
    assert config.breaker("unnamed") == config.breaker("s3").model_copy(
        update={"window_s": 60.0}
    )


def test_the_config_round_trips_through_json() -> None:
    config = parse_gateway_config(
        "profile: testing\nrate_limits: {anonymous: {burst: 3}}"
    )

    assert parse_gateway_config(config.to_json()) == config


def test_unknown_user_types_get_the_anonymous_limits() -> None:
    limits = default_gateway_config().rate_limits

    assert limits.for_user_type("external") == limits.anonymous
    assert limits.for_user_type("paid") == limits.paid


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("rate_limts: {}", "rate_limts: Extra inputs are not permitted"),
        ("rate_limits: {paid: {burts: 3}}", "rate_limits.paid.burts: Extra inputs"),
        ("rate_limits: {anonymous: {burst: 0}}", "rate_limits.anonymous.burst:"),
        ("rate_limits: {anonymous: {hourly: 0}}", "use -1 for none"),
        ("rate_limits: {anonymous: {hourly: -2}}", "rate_limits.anonymous.hourly:"),
        ("backpressure: {capacity_buffer: 1}", "backpressure.capacity_buffer:"),
        ("backpressure: {capacity_buffer: -0.1}", "backpressure.capacity_buffer:"),
        ("backpressure: {queue_depth_multiplier: 0}", "queue_depth_multiplier:"),
        ("backpressure: {hard_limit_threshold: 1.5}", "hard_limit_threshold:"),
        ("backpressure: {paid_pressure_threshold: 0}", "paid_pressure_threshold:"),
        (
            "backpressure: {anonymous_pressure_threshold: 0.85}",
            "backpressure: thresholds must satisfy anonymous < registered",
        ),
        (
            "backpressure: {paid_pressure_threshold: 0.8}",
            "backpressure: thresholds must satisfy",
        ),
        (
            "backpressure: {paid_pressure_threshold: 0.98}",
            "backpressure: thresholds must satisfy",
        ),
        ("backpressure: {max_queue_size: -1}", "backpressure.max_queue_size:"),
        (
            "limits: {max_sse_connections_per_instance: 0}",
            "limits.max_sse_connections_per_instance:",
        ),
        (
            "circuit_breakers: {redis: {success_threshold: 6}}",
            "circuit_breakers.redis: success_threshold (6) must not exceed",
        ),
        ("circuit_breakers: {redis: {window_s: 0}}", "circuit_breakers.redis.window_s"),
        ("monitoring: {heartbeat_timeout_seconds: 0}", "heartbeat_timeout_seconds:"),
        ("profile: staging", "profile: Input should be"),
        ("- 1\n- 2\n", "must be a mapping, got list"),
        ("gateway: [1]", "must be a mapping, got list"),
        ("rate_limits: [", "not valid YAML or JSON"),
    ],
)
def test_errors_name_the_field_in_one_line(text: str, reason: str) -> None:
    with pytest.raises(InvalidGatewayConfig) as raised:
        parse_gateway_config(text)

    message = str(raised.value)
    assert reason in message
    assert "\n" not in message


def test_a_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("limits: {max_sse_connections_per_instance: 0}\n")

    with pytest.raises(InvalidGatewayConfig, match=r"gateway\.yaml: limits\."):
        load_gateway_config(path)
    with pytest.raises(InvalidGatewayConfig, match="cannot read"):
        load_gateway_config(tmp_path / "missing.yaml")
