"""How often and how long to wait before resending a request to AWS."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["THROTTLED", "Retry"]

THROTTLED = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)
"""Error codes that say "not now": the same request may well succeed later."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Exponential backoff with full jitter, for requests that can be resent."""

    attempts: int = 5
    base_s: float = 0.1
    max_s: float = 5.0

    def delay_s(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_s, self.base_s * 2**attempt))
