#!/usr/bin/env python3
"""Benchmark kdcube's roles in separate processes, over Redis and Postgres.

Starts `kdcube serve ingress` and `kdcube serve proc` processes against the
local Redis and Postgres, in a fresh project of their own, and measures:

- turns: the echo bundle (4 chunks, no delay) driven by the Go load generator
  at C simulated users, for 1 ingress + 1 proc and 2 ingress + 2 proc, with the
  CPU of every process, the client's CPU, Redis commands and Postgres
  transactions per turn;
- recovery: SIGKILL of the processor running a turn, timed until the next
  processor reruns it (`chat_service` `turn.rerun` on the stream).

Prints tables, writes bench/results/distributed-<timestamp>.json, then deletes
the project's Redis keys and drops its Postgres schema. Standard library only
(plus bench/run.py); see bench/README.md for what each figure means.

    .venv/bin/python bench/distributed.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import os
import queue
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from run import (
    BENCH,
    ECHO_BUNDLE,
    HTTP,
    LOADGEN_BIN,
    ROOT,
    build_loadgen,
    bundles_yaml,
    fmt,
    free_port,
    log,
    machine_info,
    print_table,
    raise_file_limit,
    sample_tree,
)

KDCUBE = ROOT / ".venv" / "bin" / "kdcube"
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
POSTGRES_DB = "test"
TENANT = "home"  # kdcube's default tenant; KDCUBE_TENANT is left unset
READY_PREFIX = "kdcube is ready at "
PROMPT_BYTES = 100


# --- external counters: Redis and Postgres -------------------------------------


def _command(args: list[str], timeout: float = 30.0) -> str:
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def redis_cli(*args: str, timeout: float = 30.0) -> str:
    return _command(["redis-cli", "-u", REDIS_URL, *args], timeout)


def psql(sql: str) -> str:
    return _command(
        ["psql", POSTGRES_DSN, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]
    ).strip()


def redis_counts() -> tuple[int, dict[str, int]]:
    """Redis's total_commands_processed and calls per command (cmdstat_*).

    Each read adds its own INFO. Both count the commands Lua scripts run
    (TIME, XADD, ... inside an EVALSHA) as well as the EVALSHA itself, so the
    calls sum to the total; EVALSHA alone counts the scripts' round trips.
    """
    total, calls = None, {}
    for line in redis_cli("INFO", "stats", "commandstats").splitlines():
        if line.startswith("total_commands_processed:"):
            total = int(line.split(":", 1)[1])
        elif line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_") :].partition(":")
            calls[name] = int(rest.split(",", 1)[0].removeprefix("calls="))
    if total is None:
        raise RuntimeError("redis-cli INFO stats has no total_commands_processed")
    return total, calls


def redis_commands() -> int:
    return redis_counts()[0]


def pg_transactions() -> int:
    """Committed plus rolled-back transactions of the whole database so far."""
    return int(
        psql(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            f" WHERE datname = '{POSTGRES_DB}'"
        )
    )


@dataclass(frozen=True)
class PgReading:
    t: float  # time.monotonic()
    xacts: int  # whole database, every client's
    writes: int  # rows inserted, updated or deleted in the project's schema
    scans: int  # sequential and index scans of the project's tables


def pg_read(schema: str) -> PgReading:
    """Database transactions, and row activity in this run's schema only,
    which no other user of the shared server touches."""
    row = psql(
        "SELECT (SELECT xact_commit + xact_rollback FROM pg_stat_database"
        f"  WHERE datname = '{POSTGRES_DB}'),"
        " coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0),"
        " coalesce(sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0)), 0)"
        f" FROM pg_stat_user_tables WHERE schemaname = '{schema}'"
    )
    xacts, writes, scans = (int(x) for x in row.split("|"))
    return PgReading(time.monotonic(), xacts, writes, scans)


def schema_of(project: str) -> str:
    return f"kdcube_{TENANT}_{project}"


class RedisSampler:
    """Reads total_commands_processed every `interval` seconds in a thread.

    Our load is steady over a row, while other clients of the shared server
    (the project's test suite, for one) come in bursts; the median rate over
    short slices keeps the one and drops the other.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples: list[tuple[float, int]] = []

    def __enter__(self) -> RedisSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            try:
                self.samples.append((time.monotonic(), redis_commands()))
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                pass
            if self._stop.wait(self._interval):
                return

    def _within(self, t0: float, t1: float) -> list[tuple[float, int]]:
        return [(t, n) for t, n in list(self.samples) if t0 <= t <= t1]

    def median_rate(self, t0: float, t1: float) -> float | None:
        """The median of the per-slice rates between t0 and t1."""
        inside = self._within(t0, t1)
        rates = [
            (n1 - n0) / (u1 - u0)
            for (u0, n0), (u1, n1) in zip(inside, inside[1:], strict=False)
            if u1 > u0
        ]
        return statistics.median(rates) if rates else None

    def mean_rate(self, t0: float, t1: float) -> float | None:
        inside = self._within(t0, t1)
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


@dataclass(frozen=True)
class Rates:
    """Background traffic on the shared Redis and Postgres, per second."""

    seconds: float
    redis_per_s: float  # median over 0.5 s slices
    redis_mean_per_s: float
    pg_per_s: float


def measure_background(seconds: float) -> Rates:
    """Redis commands and Postgres transactions while none of ours run."""
    log(f"background: {seconds:.0f} s with no kdcube process of this run")
    p0, t0 = pg_transactions(), time.monotonic()
    with RedisSampler() as sampler:
        time.sleep(seconds)
    p1, t1 = pg_transactions(), time.monotonic()
    median = sampler.median_rate(t0, t1) or 0.0
    mean = sampler.mean_rate(t0, t1) or 0.0
    return Rates(t1 - t0, median, mean, (p1 - p0) / (t1 - t0))


# --- processes -------------------------------------------------------------------


class Reaper:
    """Every process this run starts, so that all of them die on any exit."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()

    def add(self, proc: subprocess.Popen[Any]) -> None:
        with self._lock:
            self._procs.append(proc)

    def kill_all(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                log(f"killing leftover pid {proc.pid}")
                proc.kill()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"pid {proc.pid} survived SIGKILL for 10 s")


class RoleError(RuntimeError):
    pass


class Role:
    """One `kdcube serve ROLE` process on a free loopback port."""

    def __init__(
        self, kind: str, name: str, env: dict[str, str], workdir: Path, reaper: Reaper
    ) -> None:
        self.kind, self.name = kind, name
        self._env, self._workdir, self._reaper = env, workdir, reaper
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None
        self._ready = threading.Event()
        self._started = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        args = [str(KDCUBE), "serve", self.kind, "--host", "127.0.0.1"]
        args += ["--port", str(self.port)]
        with self.log_path.open("ab") as err:
            # A session of its own: a Ctrl-C in the terminal reaches only this
            # script, which then stops every role itself.
            self.proc = subprocess.Popen(
                args,
                cwd=self._workdir,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self._started = time.monotonic()
        self._reaper.add(self.proc)
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with (self._workdir / f"{self.name}.out").open("ab") as out:
            for raw in self.proc.stdout:
                out.write(raw)
                line = raw.decode(errors="replace").strip()
                if line.startswith(READY_PREFIX) and not self._ready.is_set():
                    self.ready_s = time.monotonic() - self._started
                    self._ready.set()

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.05):
                log(f"{self.name} ready at {self.url} (pid {self.pid})")
                return
            if self.proc.poll() is not None:
                raise RoleError(
                    f"{self.name} exited with {self.proc.returncode} before ready;"
                    f" log {self.log_path}:\n{self.log_tail()}"
                )
        raise RoleError(
            f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}"
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} ignored SIGTERM for {timeout:.0f} s; killing it")
            self.kill()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def stop_roles(roles: list[Role], timeout: float = 20.0) -> None:
    for role in roles:
        role.terminate()
    for role in roles:
        role.wait_stopped(timeout)


@contextmanager
def running(roles: list[Role], timeout: float) -> Iterator[list[Role]]:
    """Start the roles together, wait until each is ready, stop them after."""
    try:
        for role in roles:
            role.start()
        for role in roles:
            role.wait_ready(timeout)
        yield roles
    finally:
        stop_roles(roles)


def role_env(opts: argparse.Namespace, home: Path, bundles: Path) -> dict[str, str]:
    """This script's environment without KDCUBE_*, plus the run's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDCUBE_")}
    env.update(
        KDCUBE_REDIS_URL=REDIS_URL,
        KDCUBE_POSTGRES_DSN=POSTGRES_DSN,
        KDCUBE_AUTH="dev",
        KDCUBE_PROJECT=opts.project,
        KDCUBE_HOME=str(home),
        KDCUBE_BUNDLES=str(bundles),
    )
    return env


# --- turns: one or more load generators at once ----------------------------------


@dataclass(frozen=True)
class Snapshot:
    t: float  # time.monotonic()
    cpu_s: dict[str, float]  # role name -> CPU seconds of its process tree
    rss_kb: dict[str, int]
    redis: int
    redis_calls: dict[str, int]  # command -> calls


def snapshot(roles: list[Role]) -> Snapshot:
    cpu, rss = {}, {}
    for role in roles:
        s = sample_tree(role.pid)
        cpu[role.name], rss[role.name] = s.cpu_s, s.rss_kb
    total, calls = redis_counts()
    return Snapshot(time.monotonic(), cpu, rss, total, calls)


class Window:
    """The union of the load generators' measured windows: sampled when the
    first one starts measuring and when the last one stops."""

    def __init__(self, loadgens: int, roles: list[Role]) -> None:
        self._loadgens, self._roles = loadgens, roles
        self._lock = threading.Lock()
        self._starts = self._ends = 0
        self.start: Snapshot | None = None
        self.end: Snapshot | None = None
        self.marks: list[tuple[str, int, float]] = []

    def phase(self, index: int, name: str) -> None:
        with self._lock:
            self.marks.append((name, index, time.monotonic()))
            if name == "measure_start":
                self._starts += 1
                if self._starts == 1:
                    self.start = snapshot(self._roles)
            elif name == "measure_end":
                self._ends += 1
                if self._ends == self._loadgens:
                    self.end = snapshot(self._roles)


@dataclass
class Loadgen:
    url: str
    users: int
    user_prefix: str
    out: Path
    proc: subprocess.Popen[str] | None = None
    result: dict[str, Any] = field(default_factory=dict)


def split_users(users: int, ingress: int) -> list[int]:
    """Users per ingress: all on the first at C=1, otherwise as even as can be."""
    if users == 1:
        return [1]
    base, extra = divmod(users, ingress)
    return [base + (1 if i < extra else 0) for i in range(ingress)]


def follow(lg: Loadgen, index: int, window: Window) -> None:
    assert lg.proc is not None and lg.proc.stderr is not None
    for line in lg.proc.stderr:
        try:
            name = json.loads(line)["phase"]
        except (ValueError, KeyError, TypeError):
            sys.stderr.write(f"  loadgen {index}: {line}")
            continue
        window.phase(index, str(name))


def turns_row(
    users: int,
    ingress: list[Role],
    roles: list[Role],
    opts: argparse.Namespace,
    reaper: Reaper,
    workdir: Path,
) -> dict[str, Any]:
    shares = split_users(users, len(ingress))
    log(f"turns: C={users} as {shares} on {len(shares)} ingress, {opts.duration} s")
    loadgens = [
        Loadgen(role.url, n, f"c{users}i{i}u", workdir / f"loadgen-{users}-{i}.json")
        for i, (role, n) in enumerate(zip(ingress, shares, strict=False))
    ]
    window = Window(len(loadgens), roles)
    loadavg = os.getloadavg()
    pg0 = pg_read(schema_of(opts.project))
    with RedisSampler() as sampler:
        _drive(loadgens, window, opts, reaper)
        assert window.end is not None
        # Postgres backends publish their statistics at most once a second, and
        # one that goes idle with some unpublished waits 10 s
        # (PGSTAT_IDLE_INTERVAL) before it does: so the last read waits that
        # long after the load ends. Meanwhile Redis's rate with our roles idle
        # again shows whether another client was busy around this row.
        time.sleep(max(0.0, window.end.t + opts.pg_settle - time.monotonic()))
    pg1 = pg_read(schema_of(opts.project))
    assert window.start is not None
    row = row_figures(users, loadgens, window, (pg0, pg1), opts)
    row["loadavg_before"] = loadavg
    after = (window.end.t + 1.0, window.end.t + opts.pg_settle)
    row["redis"]["median_per_s"] = sampler.median_rate(window.start.t, window.end.t)
    row["redis"]["idle_after_per_s"] = sampler.mean_rate(*after)
    row["redis"]["idle_after_median_per_s"] = sampler.median_rate(*after)
    return row


def _drive(
    loadgens: list[Loadgen],
    window: Window,
    opts: argparse.Namespace,
    reaper: Reaper,
) -> None:
    """Run the load generators together until all are done."""
    followers = []
    for i, lg in enumerate(loadgens):
        cmd = [
            str(LOADGEN_BIN),
            *("-mode", "turns", "-url", lg.url, "-users", str(lg.users)),
            *("-user-prefix", lg.user_prefix, "-stream-prefix", f"{opts.project}-{i}"),
            *("-duration", f"{opts.duration}s", "-turn-timeout", "30s"),
            *("-warmup-turns", str(opts.warmup_turns)),
            *("-prompt-size", str(PROMPT_BYTES), "-out", str(lg.out)),
            *("-max-runtime", f"{opts.duration + 90}s"),
        ]
        lg.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        reaper.add(lg.proc)
        thread = threading.Thread(target=follow, args=(lg, i, window), daemon=True)
        thread.start()
        followers.append(thread)

    for lg in loadgens:
        assert lg.proc is not None
        try:
            # loadgen stops itself at -max-runtime; this is the backstop.
            code = lg.proc.wait(timeout=opts.duration + 120)
        except subprocess.TimeoutExpired:
            lg.proc.kill()
            code = lg.proc.wait(timeout=10)
        if code != 0:
            raise RuntimeError(f"loadgen for {lg.url} exited with {code}")
    for thread in followers:
        thread.join(timeout=10)
    for lg in loadgens:
        lg.result = json.loads(lg.out.read_text())

    if window.start is None or window.end is None:
        raise RuntimeError("a load generator never reported its measured window")


def row_figures(
    users: int,
    loadgens: list[Loadgen],
    window: Window,
    pg: tuple[PgReading, PgReading],
    opts: argparse.Namespace,
) -> dict[str, Any]:
    assert window.start is not None and window.end is not None
    start, end = window.start, window.end
    results = [lg.result for lg in loadgens]
    turns = sum(int(r["turns"]) for r in results)
    warmup = sum(int(r["users_started"]) * opts.warmup_turns for r in results)
    window_s = end.t - start.t
    cpu_ms = {
        name: (end.cpu_s[name] - start.cpu_s[name]) * 1000 for name in start.cpu_s
    }
    pg0, pg1 = pg
    client_ms = sum(float(r["client"]["cpu_ms"]) for r in results)
    return {
        "users": users,
        "loadgens": [
            {"url": lg.url, "users": lg.users, "user_prefix": lg.user_prefix}
            for lg in loadgens
        ],
        "turns": turns,
        "warmup_turns": warmup,
        "window_s": window_s,
        # Each load generator's rate is over its own window; they overlap.
        "turns_per_s": sum(float(r["turns_per_s"]) for r in results),
        "turns_per_s_union_window": turns / window_s if window_s > 0 else None,
        "first_delta_ms": [r["first_delta_ms"] for r in results],
        "final_ms": [r["final_ms"] for r in results],
        "errors": sum(int(r["errors"]["total"]) for r in results),
        "cpu_ms": cpu_ms,
        "cpu_ms_per_turn": {k: per(v, turns) for k, v in cpu_ms.items()},
        "server_cpu_ms_per_turn": per(sum(cpu_ms.values()), turns),
        "rss_kb_end": end.rss_kb,
        "client_cpu_ms": client_ms,
        "client_cpu_ms_per_turn": per(client_ms, turns),
        # per_turn and background: filled in by apply_background at the end.
        "redis": {
            "commands": end.redis - start.redis,
            "seconds": window_s,
            "turns_counted": turns,
            # Not background-corrected; see redis_counts about scripts.
            "calls_per_turn": calls_per_turn(start, end, turns),
        },
        "postgres": {
            "transactions": pg1.xacts - pg0.xacts,
            "seconds": pg1.t - pg0.t,
            "turns_counted": turns + warmup,
            # The project's own tables: untouched by other users of the server.
            "row_writes_per_turn": per(pg1.writes - pg0.writes, turns + warmup),
            "scans_per_turn": per(pg1.scans - pg0.scans, turns + warmup),
        },
        "phase_marks": [
            {"phase": name, "loadgen": i, "t_s": t - start.t}
            for name, i, t in window.marks
        ],
        "loadgen": results,
    }


def per(total: float, items: int) -> float | None:
    return total / items if items > 0 else None


def apply_background(topologies: list[dict[str, Any]], rates: list[Rates]) -> Rates:
    """Subtract the quietest background measured (the lowest of the medians
    and of the Postgres rates), over each figure's own span."""
    quiet = Rates(
        sum(r.seconds for r in rates),
        min(r.redis_per_s for r in rates),
        min(r.redis_mean_per_s for r in rates),
        min(r.pg_per_s for r in rates),
    )
    for topo in topologies:
        for row in topo["rows"]:
            if "error" in row:
                continue
            redis, pg = row["redis"], row["postgres"]
            redis["background"] = quiet.redis_per_s * redis["seconds"]
            redis["per_turn"] = per(
                redis["commands"] - redis["background"], redis["turns_counted"]
            )
            median = redis.get("median_per_s")
            redis["per_turn_median"] = (
                None
                if median is None or not row["turns"]
                else (median - quiet.redis_per_s) * redis["seconds"] / row["turns"]
            )
            pg["background"] = quiet.pg_per_s * pg["seconds"]
            pg["per_turn"] = per(
                pg["transactions"] - pg["background"], pg["turns_counted"]
            )
    return quiet


def calls_per_turn(start: Snapshot, end: Snapshot, turns: int) -> dict[str, float]:
    deltas = {
        name: calls - start.redis_calls.get(name, 0)
        for name, calls in end.redis_calls.items()
    }
    if turns <= 0:
        return {}
    ranked = sorted(deltas.items(), key=lambda kv: -kv[1])
    return {name: round(n / turns, 2) for name, n in ranked if n > 0}


def idle_rates(roles: list[Role], seconds: float) -> dict[str, Any]:
    """Redis, Postgres and CPU of the topology with no client; this also lets
    start-up's Postgres statistics get published before the first row."""
    time.sleep(1.0)
    a, p0 = snapshot(roles), pg_transactions()
    # Idle roles talk to Redis in bursts every 2 s (blocked claims end and
    # start again), so the median is over 2 s slices, which each hold one.
    with RedisSampler(interval=2.0) as sampler:
        time.sleep(seconds)
    b, p1 = snapshot(roles), pg_transactions()
    span = b.t - a.t
    return {
        "seconds": span,
        "redis_per_s": sampler.median_rate(a.t - 1, b.t + 1),
        "redis_mean_per_s": (b.redis - a.redis) / span,
        "pg_per_s": (p1 - p0) / span,
        "cpu_ms_per_s": {k: (b.cpu_s[k] - a.cpu_s[k]) * 1000 / span for k in a.cpu_s},
        "rss_kb": b.rss_kb,
    }


def run_topology(
    n_ingress: int,
    n_proc: int,
    opts: argparse.Namespace,
    env: dict[str, str],
    workdir: Path,
    reaper: Reaper,
) -> dict[str, Any]:
    name = f"{n_ingress} ingress + {n_proc} proc"
    log(f"topology {name}")
    ingress = [
        Role("ingress", f"t{n_ingress}x{n_proc}-ingress{i + 1}", env, workdir, reaper)
        for i in range(n_ingress)
    ]
    procs = [
        Role("proc", f"t{n_ingress}x{n_proc}-proc{i + 1}", env, workdir, reaper)
        for i in range(n_proc)
    ]
    roles = ingress + procs
    report: dict[str, Any] = {"name": name, "rows": []}
    try:
        with running(roles, opts.start_timeout):
            report["roles"] = {
                r.name: {
                    "kind": r.kind,
                    "pid": r.pid,
                    "url": r.url,
                    "ready_s": r.ready_s,
                }
                for r in roles
            }
            report["idle"] = idle_rates(roles, opts.pg_settle)
            for users in opts.concurrency:
                try:
                    row = turns_row(users, ingress, roles, opts, reaper, workdir)
                except (RuntimeError, OSError, ValueError, KeyError) as exc:
                    log(f"{name} C={users} failed: {exc}")
                    report["rows"].append({"users": users, "error": str(exc)})
                    break
                report["rows"].append(row)
                dead = [r.name for r in roles if r.proc and r.proc.poll() is not None]
                if dead:
                    report["error"] = f"died during the run: {', '.join(dead)}"
                    break
    except RoleError as exc:
        log(f"{name}: {exc}")
        report["error"] = str(exc)
    report["logs"] = {r.name: log_summary(r.log_path) for r in roles}
    return report


# --- recovery: SIGKILL the processor running a turn ---------------------------------


@dataclass(frozen=True)
class Frame:
    at: float  # time.monotonic() when read
    route: str
    data: dict[str, Any]

    @property
    def turn_id(self) -> str | None:
        conversation = self.data.get("conversation")
        if isinstance(conversation, dict):
            value = conversation.get("turn_id")
            return str(value) if value is not None else None
        return None

    @property
    def type(self) -> str | None:
        value = self.data.get("type")
        return str(value) if value is not None else None


class SSEStream:
    """GET /sse/stream read in a thread; frames go to a queue, time-stamped."""

    def __init__(self, port: int, stream_id: str, user: str) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self._conn.sock = self._sock
        self._conn.request(
            "GET",
            f"/sse/stream?stream_id={stream_id}",
            headers={
                "Authorization": f"Bearer dev-{user}",
                "Accept": "text/event-stream",
            },
        )
        self._sock.settimeout(30)  # keepalives come every 10 s
        self._resp = self._conn.getresponse()
        if self._resp.status != 200:
            body = self._resp.read(2000).decode(errors="replace")
            self.close()
            raise RuntimeError(f"GET /sse/stream: {self._resp.status} {body}")
        self.frames: queue.Queue[Frame | None] = queue.Queue()
        self.seen: list[Frame] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        route, data = "", ""
        try:
            while True:
                raw = self._resp.readline()
                if not raw:
                    break
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line.startswith("event:"):
                    route = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif line == "" and route:
                    body = json.loads(data) if data else {}
                    self.frames.put(Frame(time.monotonic(), route, body))
                    route, data = "", ""
        except Exception:  # any failure ends the stream, like EOF
            pass
        finally:
            self.frames.put(None)
            try:
                self._conn.close()
            except Exception:
                pass

    def wait_for(self, match: Callable[[Frame], bool], timeout: float) -> Frame | None:
        """The first frame that matches, or None at the timeout or stream end."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = self.frames.get(timeout=left)
            except queue.Empty:
                return None
            if frame is None:
                self.frames.put(None)  # stays ended for later waits
                return None
            self.seen.append(frame)
            if match(frame):
                return frame
        return None

    def close(self) -> None:
        """End the stream; the reader thread sees EOF and closes the rest."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=5)


def post_json(url: str, body: dict[str, Any], user: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer dev-{user}",
            "Content-Type": "application/json",
        },
        method="POST",
    )
    try:
        with HTTP.open(request, timeout=10) as resp:
            answer = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode(errors="replace")
        raise RuntimeError(f"POST {url}: {exc.code} {detail}") from exc
    if not isinstance(answer, dict):
        raise RuntimeError(f"POST {url}: not a JSON object: {answer!r}")
    return answer


TERMINAL = ("chat_complete", "chat_error")


def recovery_round(
    index: int,
    ingress: Role,
    victim: Role,
    env: dict[str, str],
    workdir: Path,
    reaper: Reaper,
    opts: argparse.Namespace,
) -> tuple[dict[str, Any], Role]:
    """One round; returns its figures and the processor the next round kills."""
    user, stream_id = "recovery", f"rec{index}-{secrets.token_hex(3)}"
    result: dict[str, Any] = {"round": index, "victim_pid": victim.pid}
    stream = SSEStream(ingress.port, stream_id, user)
    try:
        if stream.wait_for(lambda f: f.route == "ready", 10) is None:
            raise RuntimeError("no ready frame on the stream")
        prompt = f"recovery round {index} ".ljust(PROMPT_BYTES, "x")
        ack = post_json(
            f"{ingress.url}/sse/chat?stream_id={stream_id}",
            {
                "bundle_id": "long",
                "external_events": [
                    {
                        "type": "event.user.prompt",
                        "payload": {"mime": "text/plain", "event": {"text": prompt}},
                    }
                ],
            },
            user,
        )
        turn_id, conversation = str(ack["turn_id"]), str(ack["conversation_id"])
        result["turn_id"] = turn_id

        def of_turn(routes: tuple[str, ...]) -> Callable[[Frame], bool]:
            return lambda f: f.route in routes and f.turn_id == turn_id

        first = stream.wait_for(of_turn(("chat_delta", *TERMINAL)), 15)
        if first is None or first.route != "chat_delta":
            raise RuntimeError(f"no first chat_delta: {first}")

        successor = Role("proc", f"rec-proc{index + 2}", env, workdir, reaper)
        successor.start()
        successor.wait_ready(opts.start_timeout)
        result["successor_pid"], result["successor_ready_s"] = (
            successor.pid,
            successor.ready_s,
        )
        # Frames that arrived while the successor started: the turn must still run.
        ended = stream.wait_for(of_turn(TERMINAL), 0.0)
        died = victim.proc is None or victim.proc.poll() is not None
        killed_at = time.monotonic()
        victim.kill()
        if ended is not None or died:
            result["error"] = (
                f"victim died on its own (exit {victim.proc and victim.proc.returncode})"
                if died
                else f"the turn ended ({ended and ended.route}) before the kill"
            )
            return result, successor
        seen_before = len(stream.seen)
        rerun = stream.wait_for(
            lambda f: (
                f.turn_id == turn_id
                and (
                    (f.route == "chat_service" and f.type == "turn.rerun")
                    or f.route in TERMINAL
                )
            ),
            opts.recovery_timeout,
        )
        after_kill = stream.seen[seen_before:]
        result["routes_after_kill"] = sorted(
            {f"{f.route}:{f.type}" for f in after_kill}
        )
        if rerun is None:
            result["outcome"] = "timeout"
            result["error"] = (
                f"the turn went on {opts.recovery_timeout} s after the kill"
            )
            return result, successor
        if rerun.route != "chat_service":
            # The turn ended instead of rerunning (chat_error turn_interrupted).
            result["outcome"] = "ended"
            result["kill_to_end_s"] = rerun.at - killed_at
            result["ending"] = {"route": rerun.route, "data": rerun.data.get("data")}
            return result, successor
        result["outcome"] = "rerun"
        result["recovery_s"] = rerun.at - killed_at
        resumed = stream.wait_for(of_turn(("chat_delta", *TERMINAL)), 10)
        if resumed is not None and resumed.route == "chat_delta":
            result["rerun_to_delta_s"] = resumed.at - rerun.at

        post_json(
            f"{ingress.url}/sse/cancel?stream_id={stream_id}",
            {"conversation_id": conversation},
            user,
        )
        end = stream.wait_for(of_turn(TERMINAL), 15)
        result["ending"] = None if end is None else end.data.get("data")
        return result, successor
    finally:
        stream.close()


def round_note(result: dict[str, Any]) -> str:
    if "recovery_s" in result:
        return f"turn.rerun {result['recovery_s']:.2f} s after the kill"
    if "kill_to_end_s" in result:
        data = result["ending"].get("data") or {}
        return (
            f"no rerun: {result['ending']['route']} {data.get('error_type')}"
            f" ({data.get('reason')}) {result['kill_to_end_s']:.2f} s after the kill"
        )
    return str(result.get("error"))


def run_recovery(
    opts: argparse.Namespace,
    env: dict[str, str],
    workdir: Path,
    reaper: Reaper,
) -> dict[str, Any]:
    log(f"recovery: {opts.rounds} rounds, KDCUBE_LEASE_S={opts.lease_s}")
    ingress = Role("ingress", "rec-ingress", env, workdir, reaper)
    victim = Role("proc", "rec-proc1", env, workdir, reaper)
    started = [ingress, victim]
    report: dict[str, Any] = {"lease_s": opts.lease_s, "rounds": []}
    deadline = time.monotonic() + opts.recovery_budget
    try:
        for role in started:
            role.start()
        for role in started:
            role.wait_ready(opts.start_timeout)
        for index in range(opts.rounds):
            if time.monotonic() > deadline:
                log(f"recovery: time budget of {opts.recovery_budget} s spent")
                report["stopped_early"] = f"budget {opts.recovery_budget} s"
                break
            try:
                result, victim = recovery_round(
                    index, ingress, victim, env, workdir, reaper, opts
                )
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                log(f"recovery round {index} failed: {exc}")
                report["rounds"].append({"round": index, "error": str(exc)})
                break
            started.append(victim)
            report["rounds"].append(result)
            log(f"recovery round {index}: {round_note(result)}")
    except RoleError as exc:
        log(f"recovery: {exc}")
        report["error"] = str(exc)
    finally:
        stop_roles([r for r in started if r.proc is not None])
    report["logs"] = {r.name: log_summary(r.log_path) for r in started}
    return report


# --- logs, summaries, tables -------------------------------------------------------


def log_summary(path: Path) -> dict[str, Any]:
    """Counts of a role's log lines by level, and the first warnings/errors."""
    levels: dict[str, int] = {}
    notable: dict[str, int] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            entry = json.loads(line)
            level, event = str(entry.get("level", "?")), str(entry.get("event", "?"))
        except (ValueError, AttributeError):
            level, event = "text", line[:160]
        levels[level] = levels.get(level, 0) + 1
        if level not in ("info", "debug"):
            key = f"{level}: {event}"
            notable[key] = notable.get(key, 0) + 1
    return {"lines": len(lines), "levels": levels, "notable": notable}


def nearest_rank(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def latency_pairs(summaries: list[dict[str, Any]]) -> str:
    parts = [f"{s['p50']:.1f}/{s['p95']:.1f}" if s.get("n") else "-" for s in summaries]
    return " | ".join(parts)


def print_topology(topo: dict[str, Any], opts: argparse.Namespace) -> None:
    rows = [r for r in topo["rows"] if "error" not in r]
    names = list(topo.get("roles", {}))
    idle = topo.get("idle", {})
    title = (
        f"Turns, {topo['name']}: echo 4 chunks, no delay; {opts.duration} s per row;"
        " latencies ms p50/p95"
    )
    if any(len(r["loadgens"]) > 1 for r in rows):
        title += " per load generator (ingress1 | ingress2), not merged"
    if idle:
        title += (
            f"\n  idle topology: Redis {fmt(idle['redis_per_s'])} cmd/s,"
            f" Postgres {idle['pg_per_s']:.2f} xact/s"
        )
    if not rows:
        print(f"\n{title}\n  no rows: {topo.get('error') or topo['rows']}")
        return
    short = {n: n.split("-", 1)[1] for n in names}
    header = [
        "C",
        "turns",
        "turns/s",
        "first-delta",
        "final",
        *(f"{short[n]} CPU-ms/turn" for n in names),
        "srv CPU-ms/turn",
        "cli CPU-ms/turn",
        "Redis cmd/turn",
        "PG xact/turn",
        "PG writes/turn",
        "errors",
    ]
    table = []
    flagged = []
    for r in rows:
        # Our roles' traffic is steady: a window total well above the median
        # rate, or much more than our idle rate right after the row, means
        # another client was busy on the shared servers.
        redis = r["redis"]
        total, median = redis.get("per_turn"), redis.get("per_turn_median")
        after = redis.get("idle_after_per_s")
        limit = 2 * (idle.get("redis_per_s") or 0.0) + 20
        why = []
        if total is not None and median is not None and total > 1.05 * median:
            why.append(f"window total {total:.0f}/turn")
        if after is not None and after > limit:
            why.append(f"{after:.0f} cmd/s in the {opts.pg_settle:.0f} s after")
        mark = "*" if why else ""
        if why:
            flagged.append(f"C={r['users']} ({', '.join(why)})")
        table.append(
            [
                str(r["users"]),
                str(r["turns"]),
                fmt(r["turns_per_s"]),
                latency_pairs(r["first_delta_ms"]),
                latency_pairs(r["final_ms"]),
                *(fmt(r["cpu_ms_per_turn"][n], 2) for n in names),
                fmt(r["server_cpu_ms_per_turn"], 2),
                fmt(r["client_cpu_ms_per_turn"], 2),
                fmt(median, 1) + mark,
                fmt(r["postgres"]["per_turn"], 2) + mark,
                fmt(r["postgres"]["row_writes_per_turn"], 2),
                str(r["errors"]),
            ]
        )
    print_table(title, header, table)
    if flagged:
        print(
            "  * other clients were busy on the shared servers: "
            + "; ".join(flagged)
            + ". Redis cmd/turn is from the median rate and stands; PG xact/turn"
            " of those rows is likely inflated (PG writes/turn counts only our"
            " schema)."
        )
    for r in rows:
        top = list(r["redis"]["calls_per_turn"].items())[:8]
        calls = ", ".join(f"{name} {n:.1f}" for name, n in top)
        print(f"  C={r['users']} Redis calls/turn by command: {calls}")
    for r in topo["rows"]:
        if "error" in r:
            print(f"  C={r['users']} FAILED: {r['error']}")
    if topo.get("error"):
        print(f"  FAILED: {topo['error']}")


def recovery_summary(rec: dict[str, Any]) -> dict[str, Any]:
    rounds = rec["rounds"]
    times = [float(r["recovery_s"]) for r in rounds if "recovery_s" in r]
    resumes = [float(r["rerun_to_delta_s"]) for r in rounds if "rerun_to_delta_s" in r]
    starts = [
        float(r["successor_ready_s"]) for r in rounds if r.get("successor_ready_s")
    ]
    ended = [r for r in rounds if r.get("outcome") == "ended"]
    endings: dict[str, int] = {}
    for r in ended:
        data = r["ending"].get("data") or {}
        key = f"{r['ending']['route']} {data.get('error_type')}/{data.get('reason')}"
        endings[key] = endings.get(key, 0) + 1
    return {
        "rounds": len(rounds),
        "measured": len(times),
        "recovery_s": spread(times),
        "ended_instead": len(ended),
        "kill_to_end_s": spread([float(r["kill_to_end_s"]) for r in ended]),
        "endings": endings,
        "rerun_to_delta_s_p50": nearest_rank(resumes, 0.5),
        "proc_ready_s_p50": nearest_rank(starts, 0.5),
        "errors": [r["error"] for r in rounds if "error" in r],
    }


def spread(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": nearest_rank(values, 0.5),
        "p95": nearest_rank(values, 0.95),
        "max": max(values) if values else None,
        "min": min(values) if values else None,
    }


def print_recovery(rec: dict[str, Any]) -> None:
    s = rec["summary"]
    title = (
        "Recovery after SIGKILL of the processor running a turn"
        f" (KDCUBE_LEASE_S={rec['lease_s']}; echo 50 chunks, 100 ms apart);"
        " seconds from the kill to chat_service turn.rerun"
    )
    rows = [
        [
            "kill -> turn.rerun",
            str(s["rounds"]),
            str(s["measured"]),
            *(fmt(s["recovery_s"][k], 2) for k in ("p50", "p95", "max", "min")),
            fmt(s["rerun_to_delta_s_p50"], 3),
            fmt(s["proc_ready_s_p50"], 2),
        ]
    ]
    if s["ended_instead"]:
        rows.append(
            [
                "kill -> chat_error instead",
                str(s["rounds"]),
                str(s["ended_instead"]),
                *(fmt(s["kill_to_end_s"][k], 2) for k in ("p50", "p95", "max", "min")),
                "-",
                fmt(s["proc_ready_s_p50"], 2),
            ]
        )
    header = ["figure", "rounds", "n", "p50", "p95", "max", "min"]
    print_table(title, [*header, "rerun->delta p50", "proc ready p50"], rows)
    for ending, count in s["endings"].items():
        print(
            f"  {count} of {s['rounds']} rounds ended the turn without a rerun: {ending}"
        )
    for error in s["errors"]:
        print(f"  round error: {error}")
    if rec.get("error"):
        print(f"  FAILED: {rec['error']}")


def print_logs(report: dict[str, Any]) -> None:
    notable: dict[str, int] = {}
    parts = [*report.get("topologies", []), report.get("recovery") or {}]
    for part in parts:
        for summary in part.get("logs", {}).values():
            for key, count in summary.get("notable", {}).items():
                notable[key] = notable.get(key, 0) + count
    if notable:
        print("Server log lines above info level, all roles:")
        for key, count in sorted(notable.items(), key=lambda kv: -kv[1]):
            print(f"  {count:6d}  {key}")
    else:
        print("Server logs: nothing above info level.")


# --- cleanup ------------------------------------------------------------------------


def cleanup_backends(project: str) -> dict[str, Any]:
    """Delete the project's Redis keys and drop its Postgres schema."""
    done: dict[str, Any] = {}
    try:
        keys = [
            k
            for k in redis_cli("--scan", "--pattern", f"*{project}*", timeout=60).split(
                "\n"
            )
            if k
        ]
        for i in range(0, len(keys), 500):
            redis_cli("DEL", *keys[i : i + 500])
        left = redis_cli("--scan", "--pattern", f"*{project}*").split()
        done["redis_keys_deleted"], done["redis_keys_left"] = len(keys), len(left)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        done["redis_error"] = str(exc)
    schema = f"kdcube_{TENANT}_{project}"
    try:
        psql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        done["postgres_schema_dropped"] = schema
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        done["postgres_error"] = str(exc)
    log(f"cleanup: {done}")
    return done


# --- main ---------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def topology_list(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        a, _, b = item.strip().partition("x")
        pairs.append((int(a), int(b)))
    return pairs


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--concurrency", type=int_list, default=[1, 10, 50])
    p.add_argument(
        "--topologies",
        type=topology_list,
        default=[(1, 1), (2, 2)],
        help="comma list of INGRESSxPROC, e.g. 1x1,2x2",
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per turns row")
    p.add_argument("--warmup-turns", type=int, default=1)
    p.add_argument(
        "--background-s",
        type=float,
        default=None,
        help="seconds of background Redis/Postgres traffic to measure "
        "(default: --duration)",
    )
    p.add_argument(
        "--pg-settle",
        type=float,
        default=11.0,
        help="seconds after a row's load before the last Postgres read (its "
        "backends publish idle statistics after 10 s)",
    )
    p.add_argument("--rounds", type=int, default=20, help="recovery rounds")
    p.add_argument(
        "--lease-s", type=float, default=2.0, help="recovery: KDCUBE_LEASE_S"
    )
    p.add_argument("--recovery-timeout", type=float, default=30.0)
    p.add_argument(
        "--recovery-budget",
        type=float,
        default=200.0,
        help="recovery: start no round after this many seconds",
    )
    p.add_argument("--skip-turns", action="store_true")
    p.add_argument("--skip-recovery", action="store_true")
    p.add_argument("--start-timeout", type=float, default=60.0)
    p.add_argument("--project", default=f"bench{secrets.token_hex(4)}")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir")
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    opts = p.parse_args(argv)
    if opts.background_s is None:
        opts.background_s = float(opts.duration)
    return opts


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def preflight() -> None:
    for tool in ("redis-cli", "psql"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found on PATH")
    if redis_cli("PING").strip() != "PONG":
        raise SystemExit(f"no Redis at {REDIS_URL}")
    psql("SELECT 1")
    if not KDCUBE.exists():
        raise SystemExit(f"{KDCUBE} missing: install the venv first")


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    preflight()
    raise_file_limit()
    build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="kdcube-dist-"))
    log(f"project {opts.project}; logs in {workdir}")
    bundles = workdir / "bundles.yaml"
    bundles.write_text(
        bundles_yaml(4, 0.0)
        + "    - id: long\n"
        + f"      path: {json.dumps(str(ECHO_BUNDLE))}\n"
        + "      module: entrypoint\n"
        + "      config: {chunks: 50, delay_s: 0.1}\n"
    )
    env = role_env(opts, workdir / "home", bundles)
    reaper = Reaper()
    report: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "options": {k: str(v) for k, v in vars(opts).items()},
        "project": opts.project,
        "redis": REDIS_URL,
        "postgres": POSTGRES_DSN,
        "topologies": [],
    }
    began = time.monotonic()
    failed = False
    try:
        if not opts.skip_turns:
            # Background traffic before and after the turns, with none of ours.
            rates = [measure_background(opts.background_s)]
            for n_ingress, n_proc in opts.topologies:
                report["topologies"].append(
                    run_topology(n_ingress, n_proc, opts, env, workdir, reaper)
                )
            rates.append(measure_background(opts.background_s))
            report["background"] = {
                "measured": [asdict(r) for r in rates],
                "subtracted": asdict(apply_background(report["topologies"], rates)),
            }
        if not opts.skip_recovery:
            rec_env = dict(env, KDCUBE_LEASE_S=f"{opts.lease_s:g}")
            recovery = run_recovery(opts, rec_env, workdir, reaper)
            recovery["summary"] = recovery_summary(recovery)
            report["recovery"] = recovery
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        report["interrupted"] = True
        failed = True
    finally:
        reaper.kill_all()
        report["cleanup"] = cleanup_backends(opts.project)
        report["elapsed_s"] = time.monotonic() - began

    opts.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = opts.results_dir / f"distributed-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")

    if "background" in report:
        b = report["background"]
        print(
            "\nBackground on the shared servers with none of ours running, before"
            " / after the turns: Redis "
            + " / ".join(
                f"{r['redis_per_s']:.1f} (mean {r['redis_mean_per_s']:.1f})"
                for r in b["measured"]
            )
            + " cmd/s median of 0.5 s slices, Postgres "
            + " / ".join(f"{r['pg_per_s']:.2f}" for r in b["measured"])
            + " xact/s; the lower of each is subtracted below"
        )
    for topo in report["topologies"]:
        print_topology(topo, opts)
    if "recovery" in report:
        print_recovery(report["recovery"])
    print()
    print_logs(report)
    log(f"results written to {path} after {report['elapsed_s']:.0f} s")
    if opts.keep_logs or failed:
        log(f"role logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
