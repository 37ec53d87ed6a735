"""Rolling windows over the samples the metrics role takes of the bus.

A sample is the queue utilization at one moment plus the queue wait
histogram's running bucket totals. Over a window (1 m, 15 m) the utilization
is the mean of the samples taken in it, and the wait p95 is read from the
waits observed in it: the bucket totals now minus those at the window's
start, interpolated within the bucket as Prometheus' ``histogram_quantile``
does. Only samples the windows still need are kept.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

SPANS: dict[str, float] = {"1m": 60.0, "15m": 900.0}


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    """Seconds on a monotonic clock."""
    utilization: float
    waits: Mapping[float, float]
    """Bucket upper bound -> waits observed in that bucket, ever."""


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of waits counted per bucket (not cumulative).

    None when nothing was counted. Inside a bucket waits are taken as evenly
    spread from the previous bound (0 for the first); a quantile that lands
    in the open last bucket is reported as the largest finite bound.
    """
    total = sum(buckets.values())
    if total <= 0:
        return None
    rank = q * total
    below, lower = 0.0, 0.0
    finite = [bound for bound in sorted(buckets) if not math.isinf(bound)]
    for bound in sorted(buckets):
        count = buckets[bound]
        if count > 0 and below + count >= rank:
            if math.isinf(bound):
                return finite[-1] if finite else None
            return lower + (bound - lower) * (rank - below) / count
        below += count
        if not math.isinf(bound):
            lower = bound
    return finite[-1] if finite else None


class Windows:
    def __init__(self, spans: Mapping[str, float] = SPANS) -> None:
        self.spans = dict(spans)
        self._longest = max(self.spans.values())
        self._samples: deque[Sample] = deque()

    def __len__(self) -> int:
        """Samples kept."""
        return len(self._samples)

    def add(self, sample: Sample) -> None:
        if self._samples and sample.at < self._samples[-1].at:
            raise ValueError("samples must come in time order")
        self._samples.append(sample)
        # Keep one sample from before the longest window: it is that
        # window's baseline for the wait histogram.
        start = sample.at - self._longest
        while len(self._samples) > 1 and self._samples[1].at <= start:
            self._samples.popleft()

    def utilization(self, span: str) -> float | None:
        """Mean utilization of the samples taken in the window; None if none."""
        inside = self._inside(span)
        if not inside:
            return None
        return sum(sample.utilization for sample in inside) / len(inside)

    def wait_quantile(self, span: str, q: float = 0.95) -> float | None:
        """The ``q`` quantile of the waits observed in the window."""
        if not self._samples:
            return None
        latest, baseline = self._samples[-1], self._baseline(span)
        observed = {
            bound: count - baseline.waits.get(bound, 0.0)
            for bound, count in latest.waits.items()
        }
        return quantile(q, observed)

    def _inside(self, span: str) -> list[Sample]:
        if not self._samples:
            return []
        start = self._samples[-1].at - self.spans[span]
        return [sample for sample in self._samples if sample.at > start]

    def _baseline(self, span: str) -> Sample:
        """The last sample at or before the window's start; while the
        window is not yet covered, the oldest sample."""
        start = self._samples[-1].at - self.spans[span]
        baseline = self._samples[0]
        for sample in self._samples:
            if sample.at > start:
                break
            baseline = sample
        return baseline
