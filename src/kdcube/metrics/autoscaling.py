"""The figures the autoscaling policies read, out of one metrics report.

Three figures, with no dimensions, whichever way they reach CloudWatch:

- ``chat/proc/queue/utilization``: the queue's utilization, averaged over
  the last minute (the latest reading while the minute holds none);
- ``chat/proc/queue/wait/p95``: the 95th percentile of queue waits over the
  last minute, in seconds (0 when no turn waited in it);
- ``chat/ingress/sse/saturation``: open SSE streams over the ingresses' cap.

There are no figures while the bus cannot be read: a gap, not a false zero,
is what an alarm should see then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["SATURATION", "UTILIZATION", "WAIT_P95", "Figure", "autoscaling_figures"]

UTILIZATION = "chat/proc/queue/utilization"
WAIT_P95 = "chat/proc/queue/wait/p95"
SATURATION = "chat/ingress/sse/saturation"
WINDOW = "1m"

Unit = Literal["None", "Seconds"]


@dataclass(frozen=True, slots=True)
class Figure:
    name: str
    value: float
    unit: Unit


def autoscaling_figures(report: dict[str, Any]) -> list[Figure] | None:
    """The figures of ``report`` (``BusMetrics.report()``), or None when it
    holds no reading of the bus."""
    if not report.get("bus_up"):
        return None
    queue, sse = report["queue"], report["sse"]
    averaged = queue["utilization_ratio_avg"][WINDOW]
    utilization = averaged if averaged is not None else queue["utilization_ratio"]
    return [
        Figure(UTILIZATION, float(utilization), "None"),
        Figure(WAIT_P95, float(queue["wait_p95_seconds"][WINDOW] or 0.0), "Seconds"),
        Figure(SATURATION, float(sse["saturation_ratio"]), "None"),
    ]
