"""The gateway's policy core: config, rate limits, backpressure, breakers.

The ingress asks, per request: the rate limiter (429), backpressure (503)
and the breakers around the dependencies it calls (503); the config board
keeps every process on the same live ``gateway.yaml``.
"""

from kdcube.gateway.backends import (
    GatewayBackends,
    memory_backends,
    open_gateway_backends,
    open_redis_backends,
    redis_backends,
)
from kdcube.gateway.backpressure import (
    Admission,
    Backpressure,
    Thresholds,
    admit,
    process_capacity,
    thresholds,
    total_capacity,
)
from kdcube.gateway.breakers import (
    Breakers,
    BreakerState,
    BreakerStatus,
    BreakerStore,
    CircuitBreaker,
    CircuitOpen,
    MemoryBreakerStore,
    RedisBreakerStore,
)
from kdcube.gateway.config import (
    BackpressureConfig,
    BreakerSettings,
    GatewayConfig,
    InvalidGatewayConfig,
    RateLimit,
    default_gateway_config,
    gateway_config_from,
    load_gateway_config,
    parse_gateway_config,
)
from kdcube.gateway.distribution import (
    ConfigBoard,
    MemoryConfigBoard,
    RedisConfigBoard,
)
from kdcube.gateway.ratelimit import (
    MemoryRateLimiter,
    RateDecision,
    RateLimiter,
    RedisRateLimiter,
)

__all__ = [
    "Admission",
    "Backpressure",
    "BackpressureConfig",
    "BreakerSettings",
    "BreakerState",
    "BreakerStatus",
    "BreakerStore",
    "Breakers",
    "CircuitBreaker",
    "CircuitOpen",
    "ConfigBoard",
    "GatewayBackends",
    "GatewayConfig",
    "InvalidGatewayConfig",
    "MemoryBreakerStore",
    "MemoryConfigBoard",
    "MemoryRateLimiter",
    "RateDecision",
    "RateLimit",
    "RateLimiter",
    "RedisBreakerStore",
    "RedisConfigBoard",
    "RedisRateLimiter",
    "Thresholds",
    "admit",
    "default_gateway_config",
    "gateway_config_from",
    "load_gateway_config",
    "memory_backends",
    "open_gateway_backends",
    "open_redis_backends",
    "parse_gateway_config",
    "process_capacity",
    "redis_backends",
    "thresholds",
    "total_capacity",
]
