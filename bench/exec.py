"""Executor costs: how long ``print(1)`` takes from start to result, and how
many runs at once each executor sustains.

1. Latency: ``--runs`` sequential runs of ``print(1)`` per executor, after
   ``--warmup`` unmeasured ones; the time is from calling ``Executor.run`` to
   its result, so it includes making and removing the workspace (and, for
   Docker, creating and removing the container). p50 and p95, nearest rank.
2. Concurrency: for each C of ``--concurrency``, C workers each run
   ``--per-worker`` programs back to back, every program busy for
   ``--busy-ms`` of CPU then printing 1. The table gives runs per second over
   the whole cell, the p95 of one run's latency, and the runs that did not
   end with exit code 0 (each counted as failed, with its first reason).

3. Cancel: ``--cancels`` runs of an endless loop, each cancelled as soon as
   its first line of output arrives; the time is from the cancel to
   ``Executor.run`` returning, which it does only once the program is killed
   and its workspace (and cgroup, container) removed. p50 and max.

Modes: ``subprocess`` (no sandbox), ``local`` (bubblewrap and cgroups; needs
bwrap, and root for the cgroup limits) and ``docker`` (needs a Docker engine
at ``DOCKER_HOST`` with the sandbox image, see ``ops/exec/docker.sh``).
Fargate needs AWS and is not measured here.

    .venv/bin/python bench/exec.py                          # every mode it can
    .venv/bin/python bench/exec.py --modes local --runs 200
    DOCKER_HOST=unix:///tmp/ci/docker.sock .venv/bin/python bench/exec.py --modes docker
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kdcube.config import ExecMode, load_settings  # noqa: E402
from kdcube.exec import ExecRequest, Executor, open_executors  # noqa: E402
from kdcube.logs import configure_logging  # noqa: E402

PRINT_ONE = "print(1)"


@dataclass
class Cell:
    mode: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def runs(self) -> int:
        return len(self.latencies) + len(self.failures)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.5) - 1))
    return ordered[index]


def busy_program(busy_ms: int) -> str:
    return (
        "import time\n"
        f"end = time.process_time() + {busy_ms / 1000}\n"
        "while time.process_time() < end:\n"
        "    pass\n"
        "print(1)\n"
    )


async def timed_run(executor: Executor, code: str, cell: Cell) -> None:
    started = time.perf_counter()
    try:
        result = await executor.run(ExecRequest(code, timeout_s=60))
    except Exception as error:  # a run that fails is one of the figures
        cell.failures.append(f"{type(error).__name__}: {error}")
        return
    elapsed = time.perf_counter() - started
    if result.ok and result.stdout.strip() == b"1":
        cell.latencies.append(elapsed)
    else:
        reason = result.stderr.decode(errors="replace").strip()[-200:]
        cell.failures.append(f"exit {result.exit_code}: {reason}")


async def latency(mode: str, executor: Executor, runs: int, warmup: int) -> Cell:
    scratch = Cell(mode, 1)
    for _ in range(warmup):
        await timed_run(executor, PRINT_ONE, scratch)
    cell = Cell(mode, 1)
    started = time.perf_counter()
    for _ in range(runs):
        await timed_run(executor, PRINT_ONE, cell)
    cell.wall_s = time.perf_counter() - started
    return cell


async def concurrency(
    mode: str, executor: Executor, workers: int, per_worker: int, busy_ms: int
) -> Cell:
    cell = Cell(mode, workers)
    code = busy_program(busy_ms)

    async def worker() -> None:
        for _ in range(per_worker):
            await timed_run(executor, code, cell)

    started = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for _ in range(workers):
            tasks.start_soon(worker)
    cell.wall_s = time.perf_counter() - started
    return cell


ENDLESS = "print('go', flush=True)\nwhile True:\n    pass\n"


async def cancel_latency(mode: str, executor: Executor, rounds: int) -> Cell:
    cell = Cell(mode, 1)
    for _ in range(rounds):
        begun = anyio.Event()

        async def on_output(
            stream: str, chunk: bytes, begun: anyio.Event = begun
        ) -> None:
            begun.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(
                partial(
                    executor.run,
                    ExecRequest(ENDLESS, timeout_s=60),
                    on_output=on_output,
                )
            )
            with anyio.fail_after(60):
                await begun.wait()
            cancelled_at = time.perf_counter()
            tasks.cancel_scope.cancel()
        cell.latencies.append(time.perf_counter() - cancelled_at)
    return cell


def available(mode: str) -> str | None:
    """Why ``mode`` cannot be measured here, or None."""
    if mode == "local" and shutil.which("bwrap") is None:
        return "bwrap is not installed (ops/exec/local.sh install)"
    if mode == "docker" and not os.environ.get("DOCKER_HOST"):
        if not Path("/var/run/docker.sock").exists():
            return "no Docker engine: set DOCKER_HOST (ops/exec/docker.sh start DIR)"
    return None


def print_latency(cells: list[Cell]) -> None:
    print(f"\nprint(1), start to result ({cells[0].runs} sequential runs each)")
    print(f"{'mode':<12}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}{'failed':>8}")
    for cell in cells:
        p50, p95 = nearest_rank(cell.latencies, 0.5), nearest_rank(cell.latencies, 0.95)
        top = max(cell.latencies, default=float("nan"))
        print(
            f"{cell.mode:<12}{p50 * 1000:>10.1f}{p95 * 1000:>10.1f}"
            f"{top * 1000:>10.1f}{len(cell.failures):>8}"
        )


def print_cancels(cells: list[Cell]) -> None:
    print(f"\ncancel to run() returned ({cells[0].runs} rounds each)")
    print(f"{'mode':<12}{'p50 ms':>10}{'max ms':>10}")
    for cell in cells:
        p50, top = nearest_rank(cell.latencies, 0.5), max(cell.latencies)
        print(f"{cell.mode:<12}{p50 * 1000:>10.1f}{top * 1000:>10.1f}")


def print_concurrency(cells: list[Cell], busy_ms: int) -> None:
    print(f"\nconcurrent runs ({busy_ms} ms of CPU each)")
    header = f"{'mode':<12}{'at once':>8}{'runs':>6}{'runs/s':>9}{'p95 ms':>10}"
    print(header + f"{'failed':>8}  first failure")
    for cell in cells:
        p95 = nearest_rank(cell.latencies, 0.95)
        rate = len(cell.latencies) / cell.wall_s if cell.wall_s else 0.0
        first = cell.failures[0][:60] if cell.failures else ""
        print(
            f"{cell.mode:<12}{cell.concurrency:>8}{cell.runs:>6}{rate:>9.1f}"
            f"{p95 * 1000:>10.1f}{len(cell.failures):>8}  {first}"
        )


async def main(options: argparse.Namespace) -> None:
    configure_logging("warning")
    modes: list[ExecMode] = options.modes.split(",")
    latencies: list[Cell] = []
    crowds: list[Cell] = []
    cancels: list[Cell] = []
    for mode in modes:
        missing = available(mode)
        if missing:
            print(f"[bench] skipping {mode}: {missing}", file=sys.stderr)
            continue
        settings = load_settings(exec=mode, home=Path("/tmp/kdcube-bench-exec"))
        async with open_executors(settings, None) as executors:
            chosen = executors.for_mode(mode)
            assert chosen is not None
            executor = chosen[1]
            print(f"[bench] {mode}: latency", file=sys.stderr)
            latencies.append(
                await latency(mode, executor, options.runs, options.warmup)
            )
            print(f"[bench] {mode}: cancel", file=sys.stderr)
            cancels.append(await cancel_latency(mode, executor, options.cancels))
            for workers in options.concurrency:
                print(f"[bench] {mode}: {workers} at once", file=sys.stderr)
                crowds.append(
                    await concurrency(
                        mode, executor, workers, options.per_worker, options.busy_ms
                    )
                )

    print(f"\nmachine: {os.cpu_count()} cores, {platform.platform()}")
    if latencies:
        print_latency(latencies)
    if cancels:
        print_cancels(cancels)
    if crowds:
        print_concurrency(crowds, options.busy_ms)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="subprocess,local,docker")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cancels", type=int, default=20)
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 4, 8, 16, 32],
    )
    parser.add_argument("--per-worker", type=int, default=4)
    parser.add_argument("--busy-ms", type=int, default=100)
    return parser.parse_args()


if __name__ == "__main__":
    anyio.run(main, parse(), backend="trio")
