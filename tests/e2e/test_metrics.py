"""The metrics role through HTTP: real turns, streams and refusals, read back
from ``/metrics`` (and ``/metrics.json``) as Prometheus would."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kdcube.config import Settings
from kdcube.gateway.backpressure import process_capacity
from kdcube.gateway.config import BackpressureConfig, Limits
from kdcube.runtime.supervisor import Role, Running, Supervisor
from tests.helpers import Server, auth, backend, open_stream, prompt_body, serve, submit
from tests.s3_server import S3Server, _client

pytestmark = pytest.mark.anyio

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]

BACKPRESSURE = {"capacity_buffer": 0.0, "queue_depth_multiplier": 9.0}


def gateway_file(folder: Path, **sections: Any) -> Path:
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump({"gateway": sections}))
    return path


async def scrape(client: httpx.AsyncClient) -> Series:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(series: Series, name: str, **labels: str) -> float | None:
    return series.get((name, frozenset(labels.items())))


async def eventually(
    client: httpx.AsyncClient, name: str, expected: float, **labels: str
) -> Series:
    """Scrape until ``name`` reads ``expected`` (heartbeats lag a little)."""
    series: Series = {}
    with anyio.fail_after(10):
        while value(series, name, **labels) != expected:
            series = await scrape(client)
            if value(series, name, **labels) != expected:
                await anyio.sleep(0.1)
    return series


async def cancel(server: Server, user: str, conversation_id: str) -> None:
    response = await server.client.post(
        "/sse/cancel", json={"conversation_id": conversation_id}, headers=auth(user)
    )
    assert response.status_code == 202, response.text


async def test_queue_depth_follows_queued_turns_and_utilization_is_queued_over_capacity(
    tmp_path: Path,
) -> None:
    config = gateway_file(tmp_path, backpressure=BACKPRESSURE)
    async with serve(tmp_path, proc_concurrency=2, gateway_config=config) as server:
        idle = await eventually(server.client, "kdcube_proc_processes", 1)
        acks = {
            user: await submit(
                server.client, user, "take your time", bundle_id="glacial"
            )
            for user in ("alice", "bob", "carol", "dave", "erin")
        }
        loaded = await eventually(server.client, "kdcube_queue_inflight", 2)
        await anyio.sleep(0.3)
        waited = await scrape(server.client)
        for user, ack in acks.items():
            await cancel(server, user, ack["conversation_id"])
        drained = await eventually(server.client, "kdcube_queue_inflight", 0)
        cancelled = await eventually(
            server.client, "kdcube_turns_total", 5, outcome="cancelled"
        )

    capacity = process_capacity(2, BackpressureConfig.model_validate(BACKPRESSURE))
    assert capacity == 20
    assert value(idle, "kdcube_queue_ready") == 0
    assert value(idle, "kdcube_queue_utilization_ratio") == 0
    assert value(idle, "kdcube_proc_capacity") == 2
    assert value(idle, "kdcube_queue_capacity") == capacity

    assert value(loaded, "kdcube_queue_ready") == 3
    assert value(loaded, "kdcube_queue_utilization_ratio") == pytest.approx(5 / 20)
    assert value(loaded, "kdcube_queue_wait_seconds_count") == 2
    assert value(idle, "kdcube_queue_oldest_wait_seconds") == 0
    oldest = value(waited, "kdcube_queue_oldest_wait_seconds")
    assert oldest is not None and 0.3 <= oldest < 60
    assert value(drained, "kdcube_queue_ready") == 0
    assert value(drained, "kdcube_queue_oldest_wait_seconds") == 0
    assert value(drained, "kdcube_queue_utilization_ratio") == 0
    assert value(cancelled, "kdcube_turns_total", outcome="completed") is None
    # Every scrape sampled the windows: the 1 m mean lies between idle and loaded.
    mean = value(cancelled, "kdcube_queue_utilization_avg_ratio", window="1m")
    assert mean is not None and 0 < mean < 5 / 20


async def test_completed_turns_are_counted_with_their_queue_waits(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path) as server, open_stream(server.client, "alice") as stream:
        for text in ("one", "two", "three"):
            ack = await submit(server.client, "alice", text)
            await stream.turn(ack["turn_id"])
        await eventually(server.client, "kdcube_turns_total", 3, outcome="completed")
        # A turn's duration is recorded once its slot is free, just after.
        series = await eventually(server.client, "kdcube_turn_seconds_count", 3)
        report = (await server.client.get("/metrics.json")).json()

    assert value(series, "kdcube_queue_wait_seconds_count") == 3
    assert value(series, "kdcube_turn_seconds_count") == 3
    assert value(series, "kdcube_turn_seconds_bucket", le="+Inf") == 3
    turn_seconds = value(series, "kdcube_turn_seconds_sum")
    assert turn_seconds is not None and 0 < turn_seconds < 30
    assert value(series, "kdcube_queue_wait_seconds_bucket", le="+Inf") == 3
    assert value(series, "kdcube_queue_wait_seconds_sum") is not None
    assert value(series, "kdcube_queue_ready") == 0
    assert value(series, "kdcube_metrics_bus_up") == 1
    # The process itself, beside what the bus says.
    assert value(series, "process_cpu_seconds_total") is not None
    assert report["bus_up"] is True
    assert report["turns_total"] == {"completed": 3.0}
    assert report["queue"]["wait_seconds"]["count"] == 3
    assert set(report["queue"]["utilization_ratio_avg"]) == {"1m", "15m"}
    assert report["queue"]["wait_p95_seconds"]["1m"] is not None


async def test_open_streams_are_counted_against_the_stream_cap(
    tmp_path: Path,
) -> None:
    config = gateway_file(tmp_path, limits={"max_sse_connections_per_instance": 4})
    async with serve(tmp_path, gateway_config=config) as server:
        await eventually(server.client, "kdcube_sse_connections", 0)
        async with (
            open_stream(server.client, "alice"),
            open_stream(server.client, "bob"),
        ):
            both = await eventually(server.client, "kdcube_sse_connections", 2)
        closed = await eventually(server.client, "kdcube_sse_connections", 0)

    assert value(both, "kdcube_sse_max_connections") == 4
    assert value(both, "kdcube_sse_saturation_ratio") == pytest.approx(0.5)
    assert value(both, "kdcube_ingress_processes") == 1
    assert value(closed, "kdcube_sse_saturation_ratio") == 0


async def test_gateway_refusals_are_counted_by_reason(tmp_path: Path) -> None:
    config = gateway_file(
        tmp_path,
        rate_limits={"registered": {"burst": 2, "burst_window": 60}},
        limits={"max_sse_connections_per_instance": 1},
    )
    async with serve(tmp_path, gateway_config=config) as server:
        answers = [
            await server.client.post(
                "/sse/chat", json=prompt_body("hi"), headers=auth("alice")
            )
            for _ in range(3)
        ]
        async with open_stream(server.client, "bob"):
            extra = await server.client.get(
                "/sse/stream", params={"stream_id": "s2"}, headers=auth("carol")
            )
        series = await scrape(server.client)

    assert [a.status_code for a in answers] == [200, 200, 429]
    assert extra.status_code == 429
    rejections = "kdcube_gateway_rejections_total"
    assert value(series, rejections, reason="burst_rate_limit") == 1
    assert value(series, rejections, reason="too_many_streams") == 1


async def test_metrics_app_answers_health_and_refuses_other_methods(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path) as server:
        health = await server.client.get("/health")
        ready = await server.client.get("/ready")
        posted = await server.client.post("/metrics")

    assert health.status_code == 200
    assert ready.status_code == 200
    assert posted.status_code == 405


@asynccontextmanager
async def metrics_role(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """``kdcube serve metrics`` in this event loop, on the server's backends."""
    async with role(server.running.platform.settings, Role.METRICS) as client:
        yield client


@asynccontextmanager
async def role(settings: Settings, served: Role) -> AsyncIterator[httpx.AsyncClient]:
    """``kdcube serve ROLE`` in this event loop, with ``settings``."""
    supervisor = Supervisor(settings, {served}, host="127.0.0.1", port=0)
    async with anyio.create_task_group() as tasks:
        running: Running = await tasks.start(supervisor.run)
        async with httpx.AsyncClient(base_url=running.urls[0], timeout=10) as client:
            yield client
        supervisor.request_stop()


@pytest.mark.skipif(
    backend() == "embedded", reason="a separate role shares only a durable bus"
)
async def test_a_separate_metrics_role_reads_the_shared_bus(tmp_path: Path) -> None:
    async with (
        serve(tmp_path) as server,
        open_stream(server.client, "alice") as stream,
        metrics_role(server) as metrics,
    ):
        ack = await submit(server.client, "alice", "hello")
        await stream.turn(ack["turn_id"])
        await eventually(metrics, "kdcube_turns_total", 1, outcome="completed")
        series = await eventually(metrics, "kdcube_sse_connections", 1)
        health = await metrics.get("/health")
        ready = await metrics.get("/ready")
        chat = await metrics.post("/sse/chat", json=prompt_body("hi"))

    assert value(series, "kdcube_proc_processes") == 1
    assert value(series, "kdcube_sse_connections") == 1
    assert value(series, "process_cpu_seconds_total") is not None
    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert chat.status_code == 404


async def test_other_roles_serve_their_own_process_metrics_only(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path) as server:
        # A home of its own: the embedded store is one process's alone.
        settings = server.running.platform.settings.model_copy(
            update={"home": tmp_path / "proc-home"}
        )
        async with role(settings, Role.PROC) as proc:
            series = await scrape(proc)
            report = await proc.get("/metrics.json")

    assert value(series, "process_cpu_seconds_total") is not None
    assert not any(name.startswith("kdcube_") for name, _ in series)
    assert report.status_code == 404


async def test_the_autoscaling_figures_go_to_stdout_as_emf_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with (
        serve(
            tmp_path,
            metrics_cloudwatch_namespace="kdcube-test",
            metrics_export_interval_s=0.1,
        ) as server,
        open_stream(server.client, "alice"),
    ):
        records: list[dict[str, Any]] = []
        with anyio.fail_after(10):
            while True:
                records += emf_records(capsys.readouterr().out)
                if records and records[-1]["chat/ingress/sse/saturation"] > 0:
                    break
                await anyio.sleep(0.1)

    record = records[-1]
    [directive] = record["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "kdcube-test"
    assert directive["Dimensions"] == [[]]
    assert {m["Name"]: m["Unit"] for m in directive["Metrics"]} == {
        "chat/proc/queue/utilization": "None",
        "chat/proc/queue/wait/p95": "Seconds",
        "chat/ingress/sse/saturation": "None",
    }
    limit = Limits().max_sse_connections_per_instance  # the gateway's default
    assert record["chat/ingress/sse/saturation"] == 1 / limit
    assert record["chat/proc/queue/utilization"] == 0
    assert abs(record["_aws"]["Timestamp"] / 1000 - time.time()) < 60


def emf_records(output: str) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in output.splitlines() if line.startswith('{"_aws"')
    ]


async def test_the_autoscaling_figures_reach_cloudwatch_through_put_metric_data(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not s3_server.is_moto:
        pytest.skip("needs moto, which serves CloudWatch beside S3")
    # AWS names the action cloudwatch:PutMetricData; moto names it after the
    # endpoint. The key may read no metrics. In the s3 cell serve() points
    # this process's AWS chain at the test server's key for storage, so the
    # publisher's key is that key here, and may use S3 as well.
    access_key, secret_key = s3_server.key_allowed(
        ["s3:*", "cloudwatch:PutMetricData", "monitoring:PutMetricData"]
    )
    publisher = dataclasses.replace(
        s3_server, access_key=access_key, secret_key=secret_key
    )
    monkeypatch.setattr("tests.helpers.provide_s3_server", lambda: publisher)
    for name, setting in publisher.env().items():
        monkeypatch.setenv(name, setting)
    namespace = f"kdcube-{tmp_path.name}"
    cloudwatch = _client(
        "cloudwatch",
        s3_server.endpoint,
        s3_server.region,
        *s3_server.key_allowed(["cloudwatch:*", "monitoring:*"]),
    )

    async with (
        serve(
            tmp_path,
            metrics_cloudwatch_namespace=namespace,
            metrics_cloudwatch_export="api",
            metrics_cloudwatch_endpoint_url=s3_server.endpoint,
            metrics_export_interval_s=0.1,
        ) as server,
        open_stream(server.client, "alice"),
    ):
        with anyio.fail_after(10):
            while True:
                peak = highest_saturation(cloudwatch, namespace)
                if peak > 0:
                    break
                await anyio.sleep(0.1)

    names = {
        m["MetricName"] for m in cloudwatch.list_metrics(Namespace=namespace)["Metrics"]
    }
    assert names == {
        "chat/proc/queue/utilization",
        "chat/proc/queue/wait/p95",
        "chat/ingress/sse/saturation",
    }
    assert peak == 1 / Limits().max_sse_connections_per_instance


def highest_saturation(cloudwatch: Any, namespace: str) -> float:
    """The highest SSE saturation CloudWatch holds; 0 before any data point."""
    now = time.time()
    answer = cloudwatch.get_metric_statistics(
        Namespace=namespace,
        MetricName="chat/ingress/sse/saturation",
        StartTime=now - 600,
        EndTime=now + 60,
        Period=60,
        Statistics=["Maximum"],
    )
    return max((point["Maximum"] for point in answer["Datapoints"]), default=0.0)
