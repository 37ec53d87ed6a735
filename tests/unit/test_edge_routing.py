"""The edge's routing table and its per-address token bucket."""

from __future__ import annotations

import pytest

from kdcube.edge.ratelimit import IpRateLimiter
from kdcube.edge.routes import Target, route


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/sse/stream", Target.INGRESS),
        ("/sse/chat", Target.INGRESS),
        ("/api/conversations", Target.INGRESS),
        ("/api/conversations/c1/turns/t1/attachments/a.txt", Target.INGRESS),
        ("/admin/gateway", Target.INGRESS),
        ("/api/integrations/bundles/t/p/echo/op", Target.PROC),
        ("/admin/integrations/x", Target.PROC),
        ("/metrics", Target.METRICS),
        ("/metrics.json", Target.METRICS),
        ("/auth/login", Target.AUTH),
        ("/health", Target.EDGE),
        ("/ready", Target.EDGE),
        ("/config.json", Target.EDGE),
        ("/", Target.UI),
        ("/conversations/c1", Target.UI),
        ("/app.js", Target.UI),
        ("/api", Target.UI),
        ("/metricsx", Target.UI),
    ],
)
def test_each_path_has_one_owner(path: str, target: Target) -> None:
    assert route(path) is target


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_allowed_then_requests_wait_for_the_refill() -> None:
    clock = Clock()
    limiter = IpRateLimiter(2.0, 3, clock=clock)

    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # each address has its own bucket

    clock.now += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.retry_after_s(0.5) == 1


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    clock = Clock()
    limiter = IpRateLimiter(1.0, 2, clock=clock)
    clock.now += 3600

    assert [limiter.take("a") > 0 for _ in range(3)] == [False, False, True]


def test_the_longest_idle_addresses_are_forgotten_past_the_cap() -> None:
    clock = Clock()
    limiter = IpRateLimiter(1.0, 1, clock=clock, max_clients=2)
    limiter.take("a")
    clock.now += 0.1
    limiter.take("b")
    limiter.take("c")  # "a" is forgotten: it comes back with a full bucket

    assert limiter.take("a") == 0.0
    assert limiter.take("c") > 0


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        IpRateLimiter(0, 1, clock=Clock())
