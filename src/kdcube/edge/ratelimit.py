"""A token bucket per client IP, the edge's first guard.

Each address gets ``burst`` tokens that refill at ``rate_per_s``; a request
takes one or is refused with the seconds until one is back. The gateway
behind limits each session by user type; this bucket stops one address from
flooding the door before any of that runs, so it is sized for a whole office
behind one NAT, not for one user.

Buckets live in this process only: with several edges each allows the rate.
Memory is bounded: past ``max_clients`` addresses, the ones idle longest are
forgotten (a forgotten bucket comes back full, which only errs toward
letting a request through).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["IpRateLimiter"]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class IpRateLimiter:
    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        clock: Callable[[], float],
        max_clients: int = 100_000,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, client: str) -> float:
        """0 when ``client`` may go ahead (a token is taken), else the seconds
        until a token is back."""
        now = self._clock()
        bucket = self._refilled(client, now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self._rate

    def retry_after_s(self, wait_s: float) -> int:
        """``wait_s`` as a Retry-After value: whole seconds, at least 1."""
        return max(1, math.ceil(wait_s))

    def _refilled(self, client: str, now: float) -> _Bucket:
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            while len(self._buckets) >= self._max_clients:
                self._buckets.popitem(last=False)
        else:
            gained = (now - bucket.updated) * self._rate
            bucket.tokens = min(self._burst, bucket.tokens + gained)
            bucket.updated = now
        # Most recently seen last, so eviction takes the longest idle.
        self._buckets[client] = bucket
        return bucket
