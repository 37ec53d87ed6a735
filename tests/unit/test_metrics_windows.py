"""The metrics role's window math: utilization means and wait quantiles."""

from __future__ import annotations

import math

import pytest

from kdcube.metrics.tallies import WAIT_BUCKETS, bound_field, wait_bucket
from kdcube.metrics.windows import Sample, Windows, quantile

INF = math.inf


def sample(at: float, utilization: float = 0.0, **waits: float) -> Sample:
    """Wait counts by bucket bound, written ``b1=3`` for the bucket up to 1 s."""
    counts = {float(name[1:].replace("_", ".")): n for name, n in waits.items()}
    return Sample(at, utilization, counts)


def test_quantile_interpolates_within_the_bucket() -> None:
    # 10 waits up to 1 s, 10 more between 1 s and 2 s: p50 is 1 s, p95 1.9 s.
    buckets = {1.0: 10.0, 2.0: 10.0, INF: 0.0}
    assert quantile(0.5, buckets) == pytest.approx(1.0)
    assert quantile(0.95, buckets) == pytest.approx(1.9)
    assert quantile(0.25, buckets) == pytest.approx(0.5)


def test_quantile_skips_empty_buckets_and_caps_at_the_last_finite_bound() -> None:
    assert quantile(0.95, {1.0: 0.0, 5.0: 4.0, INF: 0.0}) == pytest.approx(4.8)
    assert quantile(0.95, {1.0: 1.0, 5.0: 0.0, INF: 99.0}) == 5.0
    assert quantile(0.95, {1.0: 0.0, INF: 0.0}) is None


def test_utilization_is_the_mean_of_samples_inside_the_window() -> None:
    windows = Windows({"1m": 60.0, "15m": 900.0})
    windows.add(sample(0.0, 0.9))
    windows.add(sample(850.0, 0.5))
    windows.add(sample(880.0, 0.2))
    windows.add(sample(900.0, 0.2))

    # 1 m: 850 is 50 s back from 900, 880 and 900 also inside.
    assert windows.utilization("1m") == pytest.approx((0.5 + 0.2 + 0.2) / 3)
    # 15 m: the sample at 0 is exactly 900 s back, on the edge: outside.
    assert windows.utilization("15m") == pytest.approx((0.5 + 0.2 + 0.2) / 3)


def test_wait_quantile_counts_only_waits_observed_in_the_window() -> None:
    windows = Windows({"1m": 60.0, "15m": 900.0})
    windows.add(sample(0.0, b1=0, b10=0))
    # Long waits 10 minutes ago, short ones in the last minute.
    windows.add(sample(300.0, b1=0, b10=100))
    windows.add(sample(840.0, b1=0, b10=100))
    windows.add(sample(900.0, b1=20, b10=100))

    assert windows.wait_quantile("1m") == pytest.approx(0.95)
    p95_15m = windows.wait_quantile("15m")
    assert p95_15m is not None and 9.0 < p95_15m <= 10.0


def test_wait_quantile_is_none_without_waits_in_the_window() -> None:
    windows = Windows({"1m": 60.0})
    assert windows.wait_quantile("1m") is None
    assert windows.utilization("1m") is None
    windows.add(sample(0.0, b1=5))
    windows.add(sample(100.0, b1=5))
    assert windows.wait_quantile("1m") is None


def test_a_window_not_yet_covered_starts_from_the_first_sample() -> None:
    windows = Windows({"15m": 900.0})
    windows.add(sample(0.0, b1=50))
    windows.add(sample(30.0, b1=50, b5=10))

    assert windows.wait_quantile("15m") == pytest.approx(4.8)


def test_samples_older_than_the_longest_window_are_dropped_but_one() -> None:
    windows = Windows({"1m": 60.0})
    for at in range(0, 600, 10):
        windows.add(sample(float(at), utilization=at / 1000, b1=at))

    assert len(windows) <= 8
    # The baseline survives: waits counted since t=530 (b1 went 530 -> 590).
    assert windows.wait_quantile("1m") == pytest.approx(0.95)


def test_samples_must_come_in_time_order() -> None:
    windows = Windows({"1m": 60.0})
    windows.add(sample(10.0))
    with pytest.raises(ValueError):
        windows.add(sample(5.0))


@pytest.mark.parametrize(
    ("seconds", "bound"), [(0.0, 0.05), (0.05, 0.05), (0.06, 0.1), (1e6, INF)]
)
def test_a_wait_falls_in_the_first_bucket_that_holds_it(
    seconds: float, bound: float
) -> None:
    assert wait_bucket(seconds) == bound


def test_bucket_fields_read_like_prometheus_bounds() -> None:
    assert [bound_field(b) for b in WAIT_BUCKETS[:5]] == [
        "0.05",
        "0.1",
        "0.25",
        "0.5",
        "1",
    ]
    assert bound_field(INF) == "+Inf"
