"""Bundle costs: an asyncio bundle under Trio next to a native one, git loads.

1. Turn overhead of ``EVENT_LOOP = "asyncio"``. The example ``echo`` bundle
   (4 chunks, no delay) runs as written (anyio, native on Trio) and as an
   asyncio copy: its source with ``anyio`` swapped for ``asyncio`` plus
   ``EVENT_LOOP = "asyncio"``, written to a temp folder, so the processor runs
   it through trio-asyncio. One kdcube server (ingress and processor, embedded
   backends, Trio, gateway off) runs in this process, with both bundles
   registered. Each user holds its own SSE stream and posts turns back to
   back (a new conversation each, so history does not grow); the turn's
   latency is from just before ``POST /sse/chat`` to its ``chat_complete`` on
   the stream. Every cell is taken in ``--slices`` parts interleaved native,
   asyncio, asyncio, native, ... so drift of the machine's load falls on both.
   CPU is this process's CPU time over the measured window per turn: the
   server's, plus the httpx client's, which is the same for both bundles.
2. Git bundle load: ``GitBundles.materialize`` then ``load_bundle`` of a
   bundle in a local bare repo (file:// URL, so no network). Cold: a new
   managed root each time. Warm: the commit is already checked out (the ref is
   still resolved against the remote, as at reload). New commit: right after a
   push of a new commit (the push is not timed). Median of ``--repeats``.

    .venv/bin/python bench/bundles.py                  # both, about 20 s
    .venv/bin/python bench/bundles.py --part turns --turns 1000
    .venv/bin/python bench/bundles.py --part git --repeats 9
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.git_repos import Origin, new_origin  # noqa: E402
from tests.helpers import TERMINAL, EventStream, open_stream, submit  # noqa: E402

from kdcube.bundles.git import GitBundles  # noqa: E402
from kdcube.bundles.loader import load_bundle  # noqa: E402
from kdcube.bundles.registry import BundleSpec  # noqa: E402
from kdcube.config import Settings  # noqa: E402
from kdcube.logs import configure_logging  # noqa: E402
from kdcube.runtime.supervisor import Role, Running, Supervisor  # noqa: E402

ECHO = REPO / "bundles" / "echo"
BUNDLES = ("native", "asyncio")
ECHO_CONFIG = {"chunks": 4, "delay_s": 0}
PROMPT = "x" * 100
T = TypeVar("T")


# --- the asyncio copy of echo and the registry ------------------------------


def asyncio_echo_source() -> str:
    """echo's entrypoint on asyncio: the same code, anyio swapped for asyncio."""
    source = (ECHO / "entrypoint.py").read_text()
    for old, new in (("import anyio\n", "import asyncio\n"), ("anyio.", "asyncio.")):
        if old not in source:
            raise SystemExit(f"bundles/echo changed: no {old!r} to replace")
        source = source.replace(old, new)
    return source + '\nEVENT_LOOP = "asyncio"\n'


def write_bundles(folder: Path) -> Path:
    """A registry with echo as ``native`` and its asyncio copy as ``asyncio``."""
    copy = folder / "asyncio_echo"
    copy.mkdir()
    (copy / "entrypoint.py").write_text(asyncio_echo_source())
    items = [
        {"id": "native", "path": str(ECHO), "config": ECHO_CONFIG},
        {"id": "asyncio", "path": str(copy), "config": ECHO_CONFIG},
    ]
    path = folder / "bundles.yaml"
    path.write_text(yaml.safe_dump({"bundles": {"items": items}}))
    return path


# --- turns -------------------------------------------------------------------


@dataclass
class Cell:
    """The measured turns of one bundle at one concurrency, over all slices."""

    bundle: str
    concurrency: int
    turns: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def turns_per_s(self) -> float:
        return self.turns / self.seconds

    @property
    def cpu_ms_per_turn(self) -> float:
        return self.cpu_s * 1000 / self.turns

    def latency(self, percent: int) -> float:
        """Nearest-rank percentile of the final-event latency, in ms."""
        ordered = sorted(self.latencies_ms)
        return ordered[max(0, -(-percent * len(ordered) // 100) - 1)]


async def one_turn(
    client: httpx.AsyncClient, stream: EventStream, user: str, bundle: str
) -> float:
    """Submit a turn and wait for its terminal event; ms from submit to it."""
    started = time.perf_counter()
    ack = await submit(client, user, PROMPT, stream_id=user, bundle_id=bundle)
    while True:
        event = await stream.next()
        if event.turn_id == ack["turn_id"] and event.route in TERMINAL:
            break
    elapsed_ms = (time.perf_counter() - started) * 1000
    if event.route != "chat_complete":
        raise RuntimeError(f"{bundle} turn failed: {event.data}")
    return elapsed_ms


async def user_turns(
    client: httpx.AsyncClient,
    stream: EventStream,
    user: str,
    bundle: str,
    count: int,
    latencies: list[float],
) -> None:
    for _ in range(count):
        latencies.append(await one_turn(client, stream, user, bundle))
        # The turn's events after chat_complete must not pile up unread.
        stream.seen.clear()


async def run_slice(
    client: httpx.AsyncClient, cell: Cell, turns: int, warmup: int, slice_no: int
) -> None:
    """``turns`` measured turns spread over ``cell.concurrency`` users."""
    users = [
        f"{cell.bundle}-c{cell.concurrency}-s{slice_no}-u{i}"
        for i in range(cell.concurrency)
    ]
    per_user = max(1, -(-turns // len(users)))
    async with AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(open_stream(client, user, user))
            for user in users
        ]
        await all_users(client, users, streams, cell.bundle, warmup, [])
        cpu, wall = time.process_time(), time.perf_counter()
        await all_users(
            client, users, streams, cell.bundle, per_user, cell.latencies_ms
        )
        cell.seconds += time.perf_counter() - wall
        cell.cpu_s += time.process_time() - cpu
        cell.turns += per_user * len(users)


async def all_users(
    client: httpx.AsyncClient,
    users: list[str],
    streams: list[EventStream],
    bundle: str,
    count: int,
    latencies: list[float],
) -> None:
    async with anyio.create_task_group() as tasks:
        for user, stream in zip(users, streams, strict=True):
            tasks.start_soon(user_turns, client, stream, user, bundle, count, latencies)


async def measure_turns(url: str, args: argparse.Namespace) -> list[Cell]:
    cells = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for concurrency in args.concurrency:
            pair = {name: Cell(name, concurrency) for name in BUNDLES}
            for slice_no in range(args.slices):
                order = BUNDLES if slice_no % 2 == 0 else BUNDLES[::-1]
                for name in order:
                    await run_slice(
                        client,
                        pair[name],
                        args.turns // args.slices,
                        args.warmup,
                        slice_no,
                    )
            cells.extend(pair.values())
    return cells


async def serve_and_measure(folder: Path, args: argparse.Namespace) -> list[Cell]:
    """Start every role in this event loop, measure, then drain it."""
    await anyio.Path(folder).mkdir()
    gateway = folder / "gateway.yaml"
    # Rate limits would refuse a user's hundreds of turns a minute.
    await anyio.Path(gateway).write_text("gateway:\n  enabled: false\n")
    settings = Settings(
        home=folder / "home", bundles=write_bundles(folder), gateway_config=gateway
    )
    supervisor = Supervisor(
        settings, {Role.INGRESS, Role.PROC}, host="127.0.0.1", port=0
    )
    async with anyio.create_task_group() as tasks:
        running: Running = await tasks.start(supervisor.run)
        cells = await measure_turns(running.urls[0], args)
        supervisor.request_stop()
    return cells


def print_turns(cells: list[Cell]) -> None:
    print("\nturns: echo, 4 chunks, no delay; native anyio vs EVENT_LOOP = asyncio")
    header = ("bundle", "conc", "turns", "turns/s", "p50 ms", "p95 ms", "CPU ms/turn")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cell in cells:
        row = (
            cell.bundle,
            str(cell.concurrency),
            str(cell.turns),
            f"{cell.turns_per_s:.0f}",
            f"{cell.latency(50):.2f}",
            f"{cell.latency(95):.2f}",
            f"{cell.cpu_ms_per_turn:.2f}",
        )
        print("| " + " | ".join(row) + " |")
    for native, other in zip(cells[::2], cells[1::2], strict=True):
        print(
            f"asyncio - native at concurrency {native.concurrency}: "
            f"{other.cpu_ms_per_turn - native.cpu_ms_per_turn:+.2f} CPU ms/turn "
            f"(x{other.cpu_ms_per_turn / native.cpu_ms_per_turn:.2f}), "
            f"p50 {other.latency(50) - native.latency(50):+.2f} ms, "
            f"wall {1000 / other.turns_per_s - 1000 / native.turns_per_s:+.2f} ms/turn"
        )


# --- git bundle load ---------------------------------------------------------


@dataclass
class Load:
    """Seconds of one materialize and the load_bundle after it."""

    materialize_s: float
    load_s: float

    @property
    def total_s(self) -> float:
        return self.materialize_s + self.load_s


async def timed(work: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    started = time.perf_counter()
    result = await work()
    return result, time.perf_counter() - started


async def git_load(git: GitBundles, spec: BundleSpec) -> Load:
    folder, materialize_s = await timed(lambda: git.materialize(spec))
    started = time.perf_counter()
    load_bundle(BundleSpec(id=spec.id, path=folder, module=spec.module))
    return Load(materialize_s, time.perf_counter() - started)


async def measure_git(folder: Path, repeats: int) -> dict[str, list[Load]]:
    await anyio.Path(folder).mkdir()
    origin: Origin = await anyio.to_thread.run_sync(new_origin, folder / "origin")
    spec = BundleSpec(id="bench", repo=origin.url, ref="main", subdir="bundle")
    cold = [
        await git_load(GitBundles(folder / f"cold-{i}"), spec) for i in range(repeats)
    ]
    shared = GitBundles(folder / "shared")
    await git_load(shared, spec)
    warm = [await git_load(shared, spec) for _ in range(repeats)]
    pushed = []
    for i in range(repeats):
        await anyio.to_thread.run_sync(origin.commit, f"v{i + 2}")
        pushed.append(await git_load(shared, spec))
    return {"cold": cold, "warm": warm, "new commit": pushed}


def print_git(results: dict[str, list[Load]]) -> None:
    print("\ngit bundle load: materialize + load_bundle, local bare repo, median ms")
    print("| case | total | materialize | load_bundle | min total | max total |")
    print("|---|---|---|---|---|---|")
    for case, loads in results.items():
        totals = [load.total_s for load in loads]
        cells = (
            statistics.median(totals),
            statistics.median(load.materialize_s for load in loads),
            statistics.median(load.load_s for load in loads),
            min(totals),
            max(totals),
        )
        print(f"| {case} | " + " | ".join(f"{s * 1000:.1f}" for s in cells) + " |")


# --- main --------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("all", "turns", "git"), default="all")
    parser.add_argument("--turns", type=int, default=500, help="measured, per cell")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16]
    )
    parser.add_argument("--slices", type=int, default=4, help="parts per cell")
    parser.add_argument(
        "--warmup", type=int, default=2, help="turns per user, per part"
    )
    parser.add_argument("--repeats", type=int, default=5, help="git loads per case")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    load1, load5, load15 = os.getloadavg()
    print(
        f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {os.cpu_count()} CPUs, "
        f"load average {load1:.2f} {load5:.2f} {load15:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="kdcube-bench-") as folder:
        if args.part in ("all", "turns"):
            print_turns(await serve_and_measure(Path(folder) / "turns", args))
        if args.part in ("all", "git"):
            print_git(await measure_git(Path(folder) / "git", args.repeats))


if __name__ == "__main__":
    arguments = parse_args()
    configure_logging(arguments.log_level)
    anyio.run(main, arguments, backend="trio")
