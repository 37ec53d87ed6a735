"""The autoscaling figures as CloudWatch Embedded Metric Format (EMF) lines.

On ECS the metrics role's stdout goes to CloudWatch Logs (the awslogs
driver), which turns each EMF line into metric data points: no API call, no
credentials, no extra dependency. Every ``interval_s`` one JSON line carries
the figures of ``kdcube.metrics.autoscaling``, and nothing is written while
the bus cannot be read.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio

from kdcube.metrics.autoscaling import autoscaling_figures
from kdcube.metrics.collector import BusMetrics

__all__ = ["emf_record", "export_forever"]


def emf_record(
    report: dict[str, Any], namespace: str, timestamp_ms: int
) -> dict[str, Any] | None:
    """One EMF record of ``report`` (``BusMetrics.report()``), or None when
    it holds no reading of the bus."""
    figures = autoscaling_figures(report)
    if figures is None:
        return None
    directive = {
        "Namespace": namespace,
        "Dimensions": [[]],
        "Metrics": [{"Name": f.name, "Unit": f.unit} for f in figures],
    }
    return {
        "_aws": {"Timestamp": timestamp_ms, "CloudWatchMetrics": [directive]},
        **{f.name: f.value for f in figures},
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
