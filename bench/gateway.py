"""Gateway overhead: request latency with rate limits and backpressure on and off.

Starts `kdcube run` as a child process (embedded backends; with `--redis` also
on the local Redis and Postgres, in a project of its own that is removed
afterwards) and sends, at a fixed concurrency, a fixed number of

- `GET /api/conversations` (a cheap read: rate limit only), and
- `POST /sse/chat` to the `echo` bundle (rate limit, then backpressure),

once with the gateway on and once with `enabled: false`, switched at run time
through `POST /admin/gateway`. The "on" policy's limits are far above what the
run sends, so nothing is refused: the figures are the cost of the checks. Each
cell is taken in `--slices` (4) parts, interleaved on, off, off, on, on, off,
..., so that a drift of the machine's load falls on both modes alike. For
chat, each part waits until every turn it submitted has ended (the echo's work
counts in the server CPU). Requests rotate over `--users` (64) users per
route, so over as many sessions. The client is httpx on Trio in this process.

    .venv/bin/python bench/gateway.py              # embedded, about 1 minute
    .venv/bin/python bench/gateway.py --redis      # and Redis + Postgres, about 2 min
    .venv/bin/python bench/gateway.py --requests 500 --concurrency 8

Exits 1 when any request was refused (429/503) or failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import clean_backend  # noqa: E402

from kdcube.config import Settings  # noqa: E402

KDCUBE = [sys.executable, "-m", "kdcube"]
READY_PREFIX = "kdcube is ready at "
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
TENANT = "home"
ADMIN = {"Authorization": "Bearer dev-admin-bench"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DRAIN_TIMEOUT_S = 120.0

# Limits no run of this script comes near: every check runs, none refuses.
GENEROUS = {"hourly": -1, "burst": 1_000_000, "burst_window": 60}
GATEWAY_ON: dict[str, Any] = {
    "enabled": True,
    "rate_limits": {
        kind: GENEROUS for kind in ("anonymous", "registered", "paid", "privileged")
    },
    "backpressure": {"queue_depth_multiplier": 1000, "max_queue_size": 0},
}
GATEWAY_OFF: dict[str, Any] = {"enabled": False}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer dev-{user}"}


def prompt(text: str) -> dict[str, Any]:
    event = {
        "type": "event.user.prompt",
        "payload": {"mime": "text/plain", "event": {"text": text}},
    }
    return {"bundle_id": "echo", "external_events": [event]}


# --- the server ----------------------------------------------------------------


def bundles_file(folder: Path) -> Path:
    """The echo bundle, 4 chunks without delay (JSON is valid YAML)."""
    echo = {
        "id": "echo",
        "path": str(REPO / "bundles" / "echo"),
        "module": "entrypoint",
        "config": {"chunks": 4, "delay_s": 0},
    }
    path = folder / "bundles.yaml"
    path.write_text(json.dumps({"bundles": {"items": [echo]}}))
    return path


def server_env(folder: Path, extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without any KDCUBE_*, plus a home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDCUBE_")}
    return {**env, "KDCUBE_HOME": str(folder / "home"), **extra}


class Kdcube:
    """`kdcube run --port 0` in a child process; its URL is read from stdout."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self._env = server_env(folder, env)
        self._stdout = folder / "stdout.log"
        self.stderr = folder / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        args = [*KDCUBE, "run", "--host", "127.0.0.1", "--port", "0"]
        args += ["--bundles", str(bundles_file(self.folder))]
        with self._stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                args, cwd=self.folder, env=self._env, stdout=out, stderr=err
            )
        self.url = self._wait_url(timeout)
        log(f"kdcube ready at {self.url} (pid {self.pid})")

    def _wait_url(self, timeout: float) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self._stdout.read_text(errors="replace").splitlines():
                if line.startswith(READY_PREFIX):
                    return line.removeprefix(READY_PREFIX).strip()
            if self.proc.poll() is not None:
                tail = self.stderr.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"kdcube exited with {self.proc.returncode}:{tail}")
            time.sleep(0.05)
        raise RuntimeError(f"kdcube printed no URL within {timeout:.0f} s")

    def cpu_s(self) -> float:
        """utime + stime of the server process (one process in `kdcube run`)."""
        raw = Path(f"/proc/{self.pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2 :].split()
        return sum(int(x) for x in fields[11:15]) / CLOCK_TICKS

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log("kdcube ignored SIGTERM for 30 s; killing it")
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_levels(self) -> Counter[str]:
        """Server log lines above info, by level and event."""
        found: Counter[str] = Counter()
        for line in self.stderr.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                found["(not JSON)"] += 1
                continue
            if isinstance(entry, dict) and entry.get("level") not in ("debug", "info"):
                found[f"{entry.get('level')} {entry.get('event')}"] += 1
        return found


@contextmanager
def running(env: dict[str, str]) -> Iterator[Kdcube]:
    with tempfile.TemporaryDirectory(prefix="kdcube-bench-") as folder:
        server = Kdcube(Path(folder), env)
        try:
            server.start()
            yield server
        finally:
            server.stop()
            for entry, count in sorted(server.log_levels().items()):
                log(f"server log: {count} x {entry}")


@dataclass(frozen=True)
class Backend:
    name: str
    env: dict[str, str]
    project: str | None = None


def backends(redis: bool) -> list[Backend]:
    found = [Backend("embedded", {})]
    if redis:
        project = f"bench{uuid.uuid4().hex[:10]}"
        env = {
            "KDCUBE_REDIS_URL": REDIS_URL,
            "KDCUBE_POSTGRES_DSN": POSTGRES_DSN,
            "KDCUBE_PROJECT": project,
            "KDCUBE_TENANT": TENANT,
        }
        found.append(Backend("redis+postgres", env, project))
    return found


def remove_project(project: str) -> None:
    """Delete the project's Redis keys and drop its Postgres schema."""
    settings = Settings.model_validate(
        {
            "tenant": TENANT,
            "project": project,
            "redis_url": REDIS_URL,
            "postgres_dsn": POSTGRES_DSN,
        }
    )
    anyio.run(clean_backend, settings)
    log(f"removed project {project} from Redis and Postgres")


# --- the load ------------------------------------------------------------------

Send = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


@dataclass
class Phase:
    """One batch of requests: latencies in seconds and answers by status."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    def add(self, other: Phase) -> None:
        self.latencies += other.latencies
        self.statuses.update(other.statuses)
        self.wall_s += other.wall_s
        self.server_cpu_s += other.server_cpu_s
        self.client_cpu_s += other.client_cpu_s


async def drive(
    client: httpx.AsyncClient, send: Send, requests: int, concurrency: int
) -> Phase:
    """Send `requests` requests from `concurrency` workers, each back to back."""
    phase = Phase()
    numbers = itertools.count()

    async def worker() -> None:
        while (i := next(numbers)) < requests:
            started = time.perf_counter()
            try:
                status = (await send(client, i)).status_code
            except httpx.HTTPError:
                status = 0
            phase.latencies.append(time.perf_counter() - started)
            phase.statuses[status] += 1

    started, cpu_before = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tasks:
        for _ in range(concurrency):
            tasks.start_soon(worker)
    phase.wall_s = time.perf_counter() - started
    phase.client_cpu_s = time.process_time() - cpu_before
    return phase


def reads(users: int) -> Send:
    async def send(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get("/api/conversations", headers=auth(f"r{i % users}"))

    return send


def chats(users: int) -> Send:
    async def send(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post(
            "/sse/chat",
            params={"stream_id": f"s{i % users}"},
            json=prompt(f"bench turn {i}"),
            headers=auth(f"c{i % users}"),
        )

    return send


async def pending_turns(client: httpx.AsyncClient, user: str) -> tuple[int, int]:
    """Conversations of `user` whose turn has not ended, and those that failed.

    A conversation whose only turn is queued is `idle` without a current
    turn; a running one is `in_progress`; an ended one names its turn.
    """
    answer = await client.get("/api/conversations", headers=auth(user))
    answer.raise_for_status()
    found = answer.json()["conversations"]
    pending = sum(
        1 for c in found if c["state"] == "in_progress" or not c["current_turn_id"]
    )
    return pending, sum(1 for c in found if c["state"] == "error")


async def wait_turns_done(client: httpx.AsyncClient, users: int) -> int:
    """Wait until every chat user's turns ended; returns the failed ones.

    Users are checked in order and a finished one is not asked again, so the
    wait adds about one read per user to the server's work.
    """
    failed = 0
    with anyio.fail_after(DRAIN_TIMEOUT_S):
        for user in range(users):
            while True:
                pending, errors = await pending_turns(client, f"c{user}")
                if not pending:
                    failed += errors
                    break
                await anyio.sleep(0.1)
    return failed


# --- the measurement -----------------------------------------------------------


async def apply_gateway(client: httpx.AsyncClient, config: dict[str, Any]) -> None:
    """Apply a gateway config; in `kdcube run` it is current once answered."""
    answer = await client.post("/admin/gateway", json=config, headers=ADMIN)
    answer.raise_for_status()
    applied = answer.json()["config"]
    if applied["enabled"] != config["enabled"]:
        raise RuntimeError(f"gateway config not applied: {applied}")


@dataclass
class Options:
    requests: int
    concurrency: int
    warmup: int
    users: int
    slices: int


@dataclass
class Cell:
    backend: str
    route: str
    gateway: str
    phase: Phase = field(default_factory=Phase)
    failed_turns: int = 0


async def measure_slice(
    client: httpx.AsyncClient,
    server: Kdcube,
    send: Send,
    requests: int,
    opts: Options,
    settle: bool,
) -> tuple[Phase, int]:
    """One slice of a cell; for chat, the server CPU runs until every turn ended."""
    cpu_before = server.cpu_s()
    phase = await drive(client, send, requests, opts.concurrency)
    failed = await wait_turns_done(client, opts.users) if settle else 0
    phase.server_cpu_s = server.cpu_s() - cpu_before
    return phase, failed


MODES = [("on", GATEWAY_ON), ("off", GATEWAY_OFF)]


def schedule(requests: int, slices: int) -> Iterator[tuple[str, dict[str, Any], int]]:
    """(mode, config, requests) per slice: on, off, off, on, on, off, ...

    Alternating the order makes a steady drift of the machine's load fall on
    both modes alike; each mode gets `requests` in all.
    """
    sizes = [requests // slices + (i < requests % slices) for i in range(slices)]
    for index, size in enumerate(sizes):
        for mode, config in MODES if index % 2 == 0 else reversed(MODES):
            yield mode, config, size


async def measure_backend(backend: Backend, opts: Options) -> list[Cell]:
    routes = [
        ("GET /api/conversations", reads(opts.users), False),
        ("POST /sse/chat", chats(opts.users), True),
    ]
    cells = {
        (route, mode): Cell(backend.name, route, mode)
        for route, _, _ in routes
        for mode, _ in MODES
    }
    with running(backend.env) as server:
        limits = httpx.Limits(max_connections=opts.concurrency + 4)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=30, limits=limits, trust_env=False
        ) as client:
            await prepare(client, server, opts, routes)
            for route, send, settle in routes:
                log(f"{backend.name}: {route}")
                for mode, config, size in schedule(opts.requests, opts.slices):
                    await apply_gateway(client, config)
                    phase, failed = await measure_slice(
                        client, server, send, size, opts, settle
                    )
                    cells[(route, mode)].phase.add(phase)
                    cells[(route, mode)].failed_turns += failed
    return list(cells.values())


async def prepare(
    client: httpx.AsyncClient,
    server: Kdcube,
    opts: Options,
    routes: list[tuple[str, Send, bool]],
) -> None:
    """Give every reader one conversation, then warm both routes up unmeasured."""
    await apply_gateway(client, GATEWAY_ON)
    for user in range(opts.users):
        answer = await client.post(
            "/sse/chat", json=prompt("a conversation to list"), headers=auth(f"r{user}")
        )
        answer.raise_for_status()
    for route, send, settle in routes:
        log(f"warm-up: {route}, {opts.warmup} requests")
        await measure_slice(client, server, send, opts.warmup, opts, settle)


# --- the table -----------------------------------------------------------------


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def refused(cell: Cell) -> int:
    return cell.phase.statuses[429] + cell.phase.statuses[503]


def failed(cell: Cell) -> int:
    answered = sum(cell.phase.statuses.values())
    return answered - cell.phase.statuses[200] - refused(cell) + cell.failed_turns


def row(cell: Cell) -> list[str]:
    phase = cell.phase
    count = len(phase.latencies)
    return [
        cell.backend,
        cell.route,
        cell.gateway,
        str(count),
        f"{count / phase.wall_s:.0f}",
        f"{nearest_rank(phase.latencies, 0.50) * 1000:.2f}",
        f"{nearest_rank(phase.latencies, 0.99) * 1000:.2f}",
        f"{phase.server_cpu_s * 1000 / count:.2f}",
        f"{phase.client_cpu_s * 1000 / count:.2f}",
        str(refused(cell)),
        str(failed(cell)),
    ]


HEADER = [
    "backend",
    "route",
    "gateway",
    "requests",
    "req/s",
    "p50 ms",
    "p99 ms",
    "srv CPU-ms/req",
    "cli CPU-ms/req",
    "refused",
    "failed",
]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    for line in [header, ["-" * width for width in widths], *rows]:
        print(
            " | ".join(
                cell.ljust(width) for cell, width in zip(line, widths, strict=True)
            )
        )


def print_differences(cells: list[Cell]) -> None:
    """The gateway's share: on minus off, per backend and route."""
    by_key = {(c.backend, c.route, c.gateway): c for c in cells}
    print()
    for backend, route, mode in by_key:
        if mode != "on":
            continue
        on, off = by_key[(backend, route, "on")], by_key[(backend, route, "off")]
        p50 = nearest_rank(on.phase.latencies, 0.5) - nearest_rank(
            off.phase.latencies, 0.5
        )
        cpu = on.phase.server_cpu_s / len(on.phase.latencies) - (
            off.phase.server_cpu_s / len(off.phase.latencies)
        )
        print(
            f"on - off, {backend}, {route}: p50 {p50 * 1000:+.2f} ms,"
            f" server CPU {cpu * 1000:+.3f} ms/request"
        )


# --- orchestration -------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per cell")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=300, help="per route")
    parser.add_argument("--users", type=int, default=64, help="per route")
    parser.add_argument(
        "--slices", type=int, default=4, help="interleaved parts of each cell"
    )
    parser.add_argument(
        "--redis", action="store_true", help="also run on Redis and Postgres"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    opts = Options(
        args.requests, args.concurrency, args.warmup, args.users, args.slices
    )
    cells: list[Cell] = []
    for backend in backends(args.redis):
        log(f"load average before {backend.name}: {os.getloadavg()}")
        try:
            cells += anyio.run(measure_backend, backend, opts, backend="trio")
        finally:
            if backend.project:
                remove_project(backend.project)

    print(
        f"\n{opts.requests} requests per row, {opts.concurrency} at once, over"
        f" {opts.users} users; {opts.warmup} warm-up requests per route first."
        " Chat rows' server CPU runs until every turn ended (the echo's work"
        " included)."
    )
    print_table(HEADER, [row(c) for c in cells])
    print_differences(cells)
    bad = sum(refused(c) + failed(c) for c in cells)
    print(f"\nrefused or failed: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
