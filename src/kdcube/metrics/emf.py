"""The autoscaling figures as CloudWatch Embedded Metric Format (EMF) lines.

On ECS the metrics role's stdout goes to CloudWatch Logs (the awslogs
driver), which turns each EMF line into metric data points: no API call, no
credentials, no extra dependency. Every ``interval_s`` one JSON line carries
the three figures the ECS scaling policies read, with no dimensions:

- ``chat/proc/queue/utilization``: the queue's utilization, averaged over
  the last minute (the latest reading while the minute holds none);
- ``chat/proc/queue/wait/p95``: the 95th percentile of queue waits over the
  last minute, in seconds (0 when no turn waited in it);
- ``chat/ingress/sse/saturation``: open SSE streams over the ingresses' cap.

Nothing is written while the bus cannot be read: a gap, not a false zero,
is what an alarm should see then.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio

from kdcube.metrics.collector import BusMetrics

__all__ = ["emf_record", "export_forever"]

UTILIZATION = "chat/proc/queue/utilization"
WAIT_P95 = "chat/proc/queue/wait/p95"
SATURATION = "chat/ingress/sse/saturation"
WINDOW = "1m"


def emf_record(
    report: dict[str, Any], namespace: str, timestamp_ms: int
) -> dict[str, Any] | None:
    """One EMF record of ``report`` (``BusMetrics.report()``), or None when
    it holds no reading of the bus."""
    if not report.get("bus_up"):
        return None
    queue, sse = report["queue"], report["sse"]
    averaged = queue["utilization_ratio_avg"][WINDOW]
    values = {
        UTILIZATION: averaged if averaged is not None else queue["utilization_ratio"],
        WAIT_P95: queue["wait_p95_seconds"][WINDOW] or 0.0,
        SATURATION: sse["saturation_ratio"],
    }
    units = {UTILIZATION: "None", WAIT_P95: "Seconds", SATURATION: "None"}
    directive = {
        "Namespace": namespace,
        "Dimensions": [[]],
        "Metrics": [{"Name": name, "Unit": units[name]} for name in values],
    }
    return {
        "_aws": {"Timestamp": timestamp_ms, "CloudWatchMetrics": [directive]},
        **values,
    }


def _stdout_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def export_forever(
    metrics: BusMetrics,
    namespace: str,
    interval_s: float,
    *,
    write: Callable[[str], None] = _stdout_line,
) -> None:
    """Write one EMF line per ``interval_s``, from a fresh reading of the bus."""
    while True:
        await anyio.sleep(interval_s)
        await metrics.refresh()
        record = emf_record(metrics.report(), namespace, int(time.time() * 1000))
        if record is not None:
            write(json.dumps(record, separators=(",", ":")))
