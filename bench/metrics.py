"""Metrics costs: one scrape with a large fleet recorded, and how stale the
figures can be.

1. Scrape cost. The bus holds heartbeats of ``--procs`` processors (100)
   and of ``--ingresses`` ingresses (50) that together hold ``--streams``
   SSE connections (10,000), plus turn, rejection and queue-wait tallies.
   Each scrape is what ``GET /metrics`` does: read the bus
   (``BusMetrics.refresh``) and render the Prometheus text
   (``generate_latest``). Timed over ``--scrapes`` scrapes (after 10
   unmeasured ones), as wall time and as this process's CPU, on the embedded
   bus and on Redis (``--redis``, the local server; a project of its own,
   removed afterwards). Streams are counted by the ingresses themselves and
   reach the bus as one number per heartbeat, so their count costs nothing
   here: the heartbeats do.
2. Staleness. ``kdcube run``'s roles in this process (embedded backends): the
   time from an SSE stream opening to ``kdcube_sse_connections`` counting it,
   and from a turn's ``chat_complete`` on the stream to
   ``kdcube_turns_total{outcome="completed"}`` counting it, polling
   ``/metrics`` every 10 ms, over ``--rounds`` rounds.

    .venv/bin/python bench/metrics.py
    .venv/bin/python bench/metrics.py --redis --scrapes 500
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio
import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import open_stream, submit, write_bundles  # noqa: E402

from kdcube.bus import Bus  # noqa: E402
from kdcube.bus.memory import open_memory_bus  # noqa: E402
from kdcube.config import load_settings  # noqa: E402
from kdcube.gateway.config import BackpressureConfig  # noqa: E402
from kdcube.logs import configure_logging  # noqa: E402
from kdcube.metrics import BusMetrics, tallies  # noqa: E402
from kdcube.metrics.app import process_registry  # noqa: E402
from kdcube.runtime.supervisor import Role, Running, Supervisor  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"
HEARTBEAT_TTL_S = 600.0


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.5) - 1))
    return ordered[index]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def record_fleet(bus: Bus, procs: int, ingresses: int, streams: int) -> None:
    for i in range(procs):
        info = {"capacity": 32, "in_flight": i % 32, "draining": False}
        await bus.state.beat("proc", f"proc-{i}", info, ttl_s=HEARTBEAT_TTL_S)
    per_ingress = streams // ingresses
    for i in range(ingresses):
        info = {"sse_connections": per_ingress, "sse_max": 200, "draining": False}
        await bus.state.beat("ingress", f"ingress-{i}", info, ttl_s=HEARTBEAT_TTL_S)
    for outcome in ("completed", "failed", "cancelled"):
        await tallies.count_turn(bus.state, outcome)
    await tallies.count_rejection(bus.state, "burst_rate_limit")
    await tallies.observe_queue_wait(bus.state, 0.2)


async def scrape_cost(bus: Bus, scrapes: int) -> tuple[list[float], float, int]:
    metrics = BusMetrics(bus, BackpressureConfig)
    registry = process_registry(metrics)
    for _ in range(10):
        await metrics.refresh()
        generate_latest(registry)
    times, started_cpu, size = [], cpu_s(), 0
    for _ in range(scrapes):
        began = time.perf_counter()
        await metrics.refresh()
        size = len(generate_latest(registry))
        times.append(time.perf_counter() - began)
    return times, (cpu_s() - started_cpu) / scrapes, size


@asynccontextmanager
async def redis_bus() -> AsyncIterator[Bus]:
    import coredis

    from kdcube.bus.redis import open_redis_bus

    project = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        async with open_redis_bus(REDIS_URL, tenant="bench", project=project) as bus:
            yield bus
    finally:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(REDIS_URL)
        async with client:
            keys = [key async for key in client.scan_iter(match=f"*{project}*")]
            if keys:
                await client.delete(keys)


async def part_scrapes(options: argparse.Namespace) -> None:
    buses: list[tuple[str, AbstractAsyncContextManager[Bus]]] = [
        ("embedded", open_memory_bus())
    ]
    if options.redis:
        buses.append(("redis", redis_bus()))
    print(
        f"\nscrape cost: {options.procs} processors, {options.ingresses} ingresses"
        f" holding {options.streams} streams, {options.scrapes} scrapes"
    )
    print(f"{'bus':<10}{'p50 ms':>9}{'p95 ms':>9}{'CPU ms':>9}{'bytes':>8}")
    for name, opening in buses:
        async with opening as bus:
            await record_fleet(bus, options.procs, options.ingresses, options.streams)
            times, cpu, size = await scrape_cost(bus, options.scrapes)
        p50, p95 = nearest_rank(times, 0.5), nearest_rank(times, 0.95)
        print(f"{name:<10}{p50 * 1e3:>9.2f}{p95 * 1e3:>9.2f}{cpu * 1e3:>9.2f}{size:>8}")


async def read(client: httpx.AsyncClient, name: str, **labels: str) -> float | None:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def visible_after(
    client: httpx.AsyncClient, since: float, name: str, at_least: float, **labels: str
) -> float:
    # Polling is the measurement: a scraper sees the figure no sooner.
    with anyio.fail_after(30):
        while (await read(client, name, **labels) or 0) < at_least:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    return time.perf_counter() - since


async def part_staleness(rounds: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="kdcube-bench-metrics-"))
    settings = load_settings(
        home=folder / "home", bundles=write_bundles(folder), exec="off"
    )
    supervisor = Supervisor(
        settings, {Role.INGRESS, Role.PROC, Role.METRICS}, host="127.0.0.1", port=0
    )
    streams, turns = [], []
    async with anyio.create_task_group() as tasks:
        running: Running = await tasks.start(supervisor.run)
        async with httpx.AsyncClient(base_url=running.urls[0], timeout=30) as client:
            for i in range(rounds):
                opened = time.perf_counter()
                async with open_stream(client, f"u{i}") as stream:
                    streams.append(
                        await visible_after(client, opened, "kdcube_sse_connections", 1)
                    )
                    ack = await submit(client, f"u{i}", "hello")
                    await stream.turn(ack["turn_id"])
                    done = time.perf_counter()
                    turns.append(
                        await visible_after(
                            client,
                            done,
                            "kdcube_turns_total",
                            i + 1,
                            outcome="completed",
                        )
                    )
                with anyio.fail_after(30):
                    while await read(client, "kdcube_sse_connections"):  # noqa: ASYNC110
                        await anyio.sleep(0.01)
        supervisor.request_stop()
    print(f"\nstaleness over {rounds} rounds (polling /metrics every 10 ms)")
    print(f"{'what':<36}{'p50 ms':>9}{'max ms':>9}")
    for what, values in (
        ("stream opened -> sse_connections", streams),
        ("chat_complete -> turns_total", turns),
    ):
        p50, top = nearest_rank(values, 0.5), max(values)
        print(f"{what:<36}{p50 * 1e3:>9.1f}{top * 1e3:>9.1f}")


async def main(options: argparse.Namespace) -> None:
    configure_logging("warning")
    print(f"machine: {os.cpu_count()} cores")
    await part_scrapes(options)
    await part_staleness(options.rounds)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=100)
    parser.add_argument("--ingresses", type=int, default=50)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--redis", action="store_true")
    return parser.parse_args()


if __name__ == "__main__":
    anyio.run(main, parse(), backend="trio")
