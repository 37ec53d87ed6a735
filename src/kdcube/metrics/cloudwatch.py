"""The autoscaling figures sent to CloudWatch with PutMetricData.

For deployments whose stdout does not reach CloudWatch Logs (Kubernetes,
plain hosts) or that want the figures without log ingestion. The request is
CloudWatch's JSON 1.0 protocol, signed with botocore and sent with httpx
(``kdcube.aws``), every ``interval_s``, with the figures of
``kdcube.metrics.autoscaling``.

A failed publish is logged (``metrics.cloudwatch_failed``) and the next
interval tries again: the metrics role keeps serving ``/metrics`` whatever
CloudWatch says. Missing credentials are looked up again on every interval,
so a role that starts before its instance role is ready catches up.

Known shortcoming: PutMetricData is resent on throttling and 5xx like the
other AWS calls, so a request that landed but whose answer was lost adds its
data points twice. For these gauges that skews one minute's average a little.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import structlog

from kdcube.aws import AwsError, AwsJsonClient, NoCredentials
from kdcube.aws.json_api import DEFAULT_TIMEOUT
from kdcube.metrics.autoscaling import autoscaling_figures
from kdcube.metrics.collector import BusMetrics

__all__ = ["CLOUDWATCH_TARGET_PREFIX", "publish_forever", "put_metric_data_request"]

log = structlog.get_logger("kdcube.metrics")

CLOUDWATCH_TARGET_PREFIX = "GraniteServiceVersion20100801"


def put_metric_data_request(
    report: dict[str, Any], namespace: str, timestamp_s: float
) -> dict[str, Any] | None:
    """PutMetricData's input for ``report``, or None when it holds no reading
    of the bus."""
    figures = autoscaling_figures(report)
    if figures is None:
        return None
    return {
        "Namespace": namespace,
        "MetricData": [
            {
                "MetricName": f.name,
                "Value": f.value,
                "Unit": f.unit,
                "Timestamp": timestamp_s,
            }
            for f in figures
        ],
    }


async def publish_forever(
    metrics: BusMetrics,
    namespace: str,
    interval_s: float,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> None:
    """Send one PutMetricData per ``interval_s``, from a fresh reading of the bus."""
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as http:
        client: AwsJsonClient | None = None
        while True:
            await anyio.sleep(interval_s)
            if client is None:
                client = await _connect(http, endpoint_url, region)
                if client is None:
                    continue
            await metrics.refresh()
            request = put_metric_data_request(metrics.report(), namespace, time.time())
            if request is not None:
                await _publish(client, request)


async def _connect(
    http: httpx.AsyncClient, endpoint_url: str | None, region: str | None
) -> AwsJsonClient | None:
    try:
        return await AwsJsonClient.from_environment(
            http,
            service="monitoring",
            target_prefix=CLOUDWATCH_TARGET_PREFIX,
            json_version="1.0",
            endpoint_url=endpoint_url,
            region=region,
        )
    except NoCredentials as exc:
        log.error("metrics.cloudwatch_no_credentials", error=str(exc))
        return None


async def _publish(client: AwsJsonClient, request: dict[str, Any]) -> None:
    try:
        await client.call("PutMetricData", request)
    except AwsError as exc:
        log.warning("metrics.cloudwatch_failed", code=exc.code, error=str(exc))
