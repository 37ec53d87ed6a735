#!/usr/bin/env python3
"""Benchmark kdcube on this machine: start a server, drive it, print a table.

Starts `kdcube run` on a free loopback port with a bundles file made for each
group of scenarios, drives it with the Go load generator in bench/loadgen,
samples the server's CPU time and RSS (its whole process tree) around each
measured window, prints tables and writes bench/results/<timestamp>.json.

Standard library only, so it runs under any Python 3.10+, including the
project's venv. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LOADGEN_SRC = BENCH / "loadgen"
LOADGEN_BIN = BENCH / ".build" / "loadgen"
# The gateway's per-user burst (160 turns a minute for a registered user)
# refuses the turns group within seconds, and its cap of 200 open streams per
# ingress (which stays on with the gateway off) refuses most of 500 streams.
# The benchmarks measure the runtime, not those quotas, so servers they start
# run without them unless --server-env KDCUBE_GATEWAY_CONFIG=... says otherwise.
GATEWAY_OFF = BENCH / ".build" / "gateway-off.yaml"
ECHO_BUNDLE = ROOT / "bundles" / "echo"
DEFAULT_KDCUBE = ROOT / ".venv" / "bin" / "kdcube"

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# The runner never follows proxy variables: every request goes to 127.0.0.1.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- server process tree: CPU and memory --------------------------------------


@dataclass(frozen=True)
class Sample:
    """CPU seconds and RSS of the server's process tree at one moment."""

    t: float
    cpu_s: float
    rss_kb: int
    hwm_kb: int  # the root process's own peak RSS (VmHWM)


def _children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue

        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is index 0)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _tree(root: int) -> list[int]:
    children = _children_of()
    pids: list[int] = []
    todo = [root]
    while todo and len(pids) < 10_000:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample_tree(root: int) -> Sample:
    """Sum CPU (utime+stime, plus cutime+cstime of reaped children) and RSS.

    A child that exits and is reaped moves its CPU into its parent's c-times,
    so the sum stays continuous. RSS is summed too, which counts pages shared
    by forked workers more than once: an upper bound.
    """
    cpu_ticks, rss_kb = 0, 0
    for pid in _tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue

        # utime, stime, cutime, cstime are stat fields 14-17.
        cpu_ticks += sum(int(x) for x in fields[11:15])
        rss_kb += int(fields[21]) * PAGE_KB  # field 24, resident pages

    return Sample(
        t=time.time(),
        cpu_s=cpu_ticks / CLOCK_TICKS,
        rss_kb=rss_kb,
        hwm_kb=_status_kb(root, "VmHWM"),
    )


class PeakSampler:
    """Samples the tree's RSS every `interval` seconds in a thread, keeps the max."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self._pid, self._interval = pid, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_kb = 0

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_kb = max(self.peak_kb, sample_tree(self._pid).rss_kb)


# --- the server ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bundles_yaml(chunks: int, delay_s: float) -> str:
    # json.dumps gives a valid YAML double-quoted scalar for the path.
    return (
        "bundles:\n"
        "  default_bundle_id: echo\n"
        "  items:\n"
        "    - id: echo\n"
        f"      path: {json.dumps(str(ECHO_BUNDLE))}\n"
        "      module: entrypoint\n"
        f"      config: {{chunks: {chunks}, delay_s: {delay_s}}}\n"
    )


def http_get(url: str, timeout: float = 2.0) -> int:
    try:
        with HTTP.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class Server:
    """`kdcube run` in a temp dir of its own, so its data never lands in the repo."""

    def __init__(
        self, command: list[str], chunks: int, delay_s: float, env: dict[str, str]
    ) -> None:
        self._command, self._chunks, self._delay_s = command, chunks, delay_s
        self._env = env
        self._dir = Path(tempfile.mkdtemp(prefix="kdcube-bench-"))
        self.log_path = self._dir / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float) -> None:
        bundles = self._dir / "bundles.yaml"
        bundles.write_text(bundles_yaml(self._chunks, self._delay_s))
        env = {**os.environ, "KDCUBE_HOME": str(self._dir / "home"), **self._env}
        args = [
            *self._command,
            *("run", "--host", "127.0.0.1", "--port", str(self.port)),
            *("--bundles", str(bundles)),
        ]
        log(f"starting {shlex.join(args)}")
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                args, cwd=self._dir, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")

            if http_get(self.url + "/ready") == 200:
                log(f"server ready at {self.url} (pid {self.pid})")
                return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout:.0f} s")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            log("server ignored SIGTERM for 20 s; killing it")
            self.proc.kill()
            self.proc.wait(timeout=10)


# --- the load generator --------------------------------------------------------


def build_loadgen() -> Path:
    """Build bench/.build/loadgen when missing or older than its sources."""
    sources = [*LOADGEN_SRC.glob("*.go"), LOADGEN_SRC / "go.mod"]
    newest = max(p.stat().st_mtime for p in sources)
    if LOADGEN_BIN.exists() and LOADGEN_BIN.stat().st_mtime >= newest:
        return LOADGEN_BIN

    log("building loadgen")
    LOADGEN_BIN.parent.mkdir(parents=True, exist_ok=True)
    # Standard library only: no module downloads, no toolchain switching.
    env = dict(os.environ, GOPROXY="off", GOTOOLCHAIN="local", CGO_ENABLED="0")
    subprocess.run(
        ["go", "build", "-o", str(LOADGEN_BIN), "."],
        cwd=LOADGEN_SRC,
        env=env,
        check=True,
        timeout=300,
    )
    return LOADGEN_BIN


@dataclass
class LoadgenRun:
    result: dict[str, Any]
    samples: dict[str, Sample] = field(default_factory=dict)
    peak_rss_kb: int = 0


# Called with "start" and then each phase loadgen announces, at the moment the
# server is sampled, so a caller can sample other processes over the same window.
PhaseHook = Callable[[str], None]


def run_loadgen(
    args: list[str],
    server_pid: int | None,
    timeout: float,
    on_phase: PhaseHook | None = None,
) -> LoadgenRun:
    """Run loadgen, sampling the server at each phase line it prints on stderr."""
    sample = (lambda: sample_tree(server_pid)) if server_pid else None
    samples: dict[str, Sample] = {}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [str(LOADGEN_BIN), *args, "-out", out.name]
        cmd += ["-max-runtime", f"{int(timeout)}s"]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        # loadgen stops itself at -max-runtime; this is the backstop.
        killer = threading.Timer(timeout + 30, proc.kill)
        killer.start()
        with PeakSampler(server_pid) if server_pid else _nothing() as peak:
            if sample:
                samples["start"] = sample()
            if on_phase:
                on_phase("start")
            _follow_phases(proc, sample, samples, on_phase)
            code = proc.wait()
        killer.cancel()
        if code != 0:
            raise RuntimeError(f"loadgen exited with {code}: {shlex.join(cmd)}")

        result = json.loads(Path(out.name).read_text())
    # The phase samples count too: the sampler thread may miss a short peak.
    peak_kb = max([getattr(peak, "peak_kb", 0), *(x.rss_kb for x in samples.values())])
    return LoadgenRun(result, samples, peak_kb)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _follow_phases(
    proc: subprocess.Popen[str],
    sample: Any,
    samples: dict[str, Sample],
    on_phase: PhaseHook | None = None,
) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        try:
            marker = json.loads(line)
            name = marker["phase"]
        except (ValueError, KeyError, TypeError):
            sys.stderr.write("  loadgen: " + line)
            continue

        if sample:
            samples[name] = sample()
        if on_phase:
            on_phase(name)


# --- scenarios -----------------------------------------------------------------


def cpu_ms_between(run: LoadgenRun, start: str, end: str) -> float | None:
    a, b = run.samples.get(start), run.samples.get(end)
    if a is None or b is None:
        return None
    return (b.cpu_s - a.cpu_s) * 1000


def per_item(total: float | None, items: int) -> float | None:
    if total is None or items <= 0:
        return None
    return total / items


def turns_scenario(
    opts: argparse.Namespace,
    url: str,
    pid: int | None,
    users: int,
    on_phase: PhaseHook | None = None,
) -> dict[str, Any]:
    log(f"turns: C={users} for {opts.turn_duration} s")
    args = [
        *("-mode", "turns", "-url", url, "-users", str(users)),
        *("-duration", f"{opts.turn_duration}s"),
        *("-warmup-turns", str(opts.warmup_turns), "-turn-timeout", "30s"),
    ]
    run = run_loadgen(args, pid, opts.turn_duration + 120, on_phase)
    r = run.result
    server_cpu = cpu_ms_between(run, "measure_start", "measure_end")
    end = run.samples.get("measure_end")
    return {
        "kind": "turns",
        "users": users,
        "loadgen": r,
        "server": {
            "cpu_ms": server_cpu,
            "cpu_ms_per_turn": per_item(server_cpu, r["turns"]),
            "rss_kb_end": end.rss_kb if end else None,
            "rss_kb_peak": run.peak_rss_kb or None,
            "samples": {k: asdict(v) for k, v in run.samples.items()},
        },
    }


def streams_scenario(
    opts: argparse.Namespace,
    url: str,
    pid: int | None,
    streams: int,
    on_phase: PhaseHook | None = None,
) -> dict[str, Any]:
    log(f"streams: N={streams} x {opts.stream_chunks} chunks, {opts.stream_delay} s")
    args = [
        *("-mode", "streams", "-url", url, "-streams", str(streams)),
        *("-expect-deltas", str(opts.stream_chunks), "-turn-timeout", "60s"),
        *("-connect-concurrency", str(opts.connect_concurrency)),
    ]
    run = run_loadgen(args, pid, 180, on_phase)
    r = run.result
    server_cpu = cpu_ms_between(run, "measure_start", "measure_end")
    return {
        "kind": "streams",
        "streams": streams,
        "loadgen": r,
        "server": {
            "cpu_ms": server_cpu,
            "cpu_ms_per_turn": per_item(server_cpu, r["completed"]),
            "connect_cpu_ms": cpu_ms_between(run, "start", "measure_start"),
            "rss_kb_peak": run.peak_rss_kb or None,
            "samples": {k: asdict(v) for k, v in run.samples.items()},
        },
    }


def idle_scenario(
    opts: argparse.Namespace,
    url: str,
    pid: int | None,
    streams: int,
    on_phase: PhaseHook | None = None,
) -> dict[str, Any]:
    log(f"idle: N={streams}, hold {opts.idle_hold} s")
    args = [
        *("-mode", "idle", "-url", url, "-streams", str(streams)),
        *("-hold", f"{opts.idle_hold}s"),
        *("-connect-concurrency", str(opts.connect_concurrency)),
    ]
    run = run_loadgen(args, pid, opts.idle_hold + 240, on_phase)
    # Let the server notice the disconnects and free what it will free.
    time.sleep(opts.settle)
    after = sample_tree(pid) if pid else None
    r = run.result
    before, holding = run.samples.get("start"), run.samples.get("holding")
    return {
        "kind": "idle",
        "streams": streams,
        "loadgen": r,
        "server": {
            "rss_kb_before": before.rss_kb if before else None,
            "rss_kb_open": holding.rss_kb if holding else None,
            "rss_kb_after": after.rss_kb if after else None,
            "rss_kb_peak": run.peak_rss_kb or None,
            "kb_per_stream": _kb_per_stream(before, holding, r["streams_opened"]),
            "connect_cpu_ms": cpu_ms_between(run, "start", "holding"),
            "hold_cpu_ms": cpu_ms_between(run, "holding", "closed"),
            "samples": {k: asdict(v) for k, v in run.samples.items()},
        },
    }


def _kb_per_stream(before: Sample | None, open_: Sample | None, n: int) -> float | None:
    if before is None or open_ is None or n <= 0:
        return None
    return (open_.rss_kb - before.rss_kb) / n


# --- tables --------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.0f}"


def pair(summary: dict[str, Any], a: str = "p50", b: str = "p95") -> str:
    if not summary.get("n"):
        return "-"
    return f"{summary[a]:.1f} / {summary[b]:.1f}"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def turns_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in results:
        r, srv = s["loadgen"], s["server"]
        rows.append(
            [
                str(s["users"]),
                str(r["turns"]),
                fmt(r["turns_per_s"]),
                pair(r["first_delta_ms"]),
                pair(r["final_ms"]),
                fmt(srv["cpu_ms_per_turn"], 2),
                fmt(r["client_cpu_ms_per_turn"], 2),
                f"{mb(srv['rss_kb_end'])} / {mb(srv['rss_kb_peak'])}",
                str(r["errors"]["total"]),
            ]
        )
    return rows


def streams_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in results:
        r, srv = s["loadgen"], s["server"]
        rows.append(
            [
                str(s["streams"]),
                f"{r['completed']}/{r['streams_opened']}",
                fmt(r["first_event_ms"]["p50"] if r["first_event_ms"]["n"] else None),
                fmt(r["first_delta_ms"]["p50"] if r["first_delta_ms"]["n"] else None),
                pair(r["completion_ms"]),
                fmt(r["delta_gap_ms"]["p99"] if r["delta_gap_ms"]["n"] else None),
                str(r["short_streams"]),
                fmt(srv["cpu_ms_per_turn"], 2),
                fmt(r["client"].get("cpu_ms_per_item"), 2),
                mb(srv["rss_kb_peak"]),
                str(r["errors"]["total"]),
            ]
        )
    return rows


def idle_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in results:
        r, srv = s["loadgen"], s["server"]
        rows.append(
            [
                str(s["streams"]),
                str(r["streams_opened"]),
                fmt(r["connect_s"], 2),
                mb(srv["rss_kb_before"]),
                mb(srv["rss_kb_open"]),
                mb(srv["rss_kb_after"]),
                fmt(srv["kb_per_stream"]),
                fmt(srv["connect_cpu_ms"], 0),
                fmt(r["client"]["cpu_ms_total"], 0),
                mb(r["client"]["maxrss_kb"]),
                str(r["dropped_early"]),
                str(r["errors"]["total"]),
            ]
        )
    return rows


def echo_label(opts: argparse.Namespace, chunks: int, delay_s: float) -> str:
    if opts.url:
        return "echo as configured on the server at --url"
    return f"echo {chunks} chunks, {delay_s * 1000:.0f} ms apart"


def print_tables(report: dict[str, Any], opts: argparse.Namespace) -> None:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    failures = []
    for s in report["scenarios"]:
        if "error" in s:
            failures.append(s)
        else:
            by_kind.setdefault(s["kind"], []).append(s)

    if "turns" in by_kind:
        print_table(
            f"Turns: {echo_label(opts, opts.turn_chunks, opts.turn_delay)}; "
            f"{opts.turn_duration} s per row; latencies in ms (p50 / p95)",
            [
                "C",
                "turns",
                "turns/s",
                "first-delta",
                "final",
                "srv CPU-ms/turn",
                "cli CPU-ms/turn",
                "srv RSS MB end/peak",
                "errors",
            ],
            turns_rows(by_kind["turns"]),
        )

    if "streams" in by_kind:
        print_table(
            "Streams: one turn each at once, "
            f"{echo_label(opts, opts.stream_chunks, opts.stream_delay)}; ms",
            [
                "N",
                "done",
                "first-event p50",
                "first-delta p50",
                "completion p50/p95",
                "gap p99",
                "short",
                "srv CPU-ms/turn",
                "cli CPU-ms/turn",
                "srv RSS MB peak",
                "errors",
            ],
            streams_rows(by_kind["streams"]),
        )

    if "idle" in by_kind:
        print_table(
            f"Idle streams: held {opts.idle_hold} s; RSS after = {opts.settle} s "
            "after all disconnect",
            [
                "N",
                "opened",
                "connect s",
                "RSS MB before",
                "open",
                "after",
                "KB/stream",
                "srv CPU-ms connect",
                "cli CPU-ms",
                "cli RSS MB",
                "dropped",
                "errors",
            ],
            idle_rows(by_kind["idle"]),
        )

    for f in failures:
        print(f"\nFAILED {f['kind']} {f.get('count', '')}: {f['error']}")
    print()


# --- orchestration -------------------------------------------------------------


def raise_file_limit(want: int = 65_536) -> int:
    """Raise RLIMIT_NOFILE for this process; the server and loadgen inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(hard, want)
    try:
        # Raising the hard limit needs root (CAP_SYS_RESOURCE); fall back if not.
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, timeout=10
        )
    except OSError:
        return None
    return out.stdout.decode().strip() or None


@dataclass(frozen=True)
class Group:
    """Scenarios that share one server started with one echo configuration."""

    name: str
    chunks: int
    delay_s: float
    counts: list[int]


def groups(opts: argparse.Namespace) -> list[Group]:
    wanted = set(opts.scenarios.split(","))
    all_groups = [
        Group("turns", opts.turn_chunks, opts.turn_delay, opts.concurrency),
        Group("streams", opts.stream_chunks, opts.stream_delay, opts.stream_counts),
        # Idle streams never post, so the echo settings do not matter.
        Group("idle", opts.turn_chunks, opts.turn_delay, opts.idle_counts),
    ]
    return [g for g in all_groups if g.name in wanted]


def gateway_off() -> Path:
    """The gateway config without quotas (see GATEWAY_OFF), written once."""
    GATEWAY_OFF.parent.mkdir(parents=True, exist_ok=True)
    GATEWAY_OFF.write_text(
        "enabled: false\nlimits: {max_sse_connections_per_instance: 100000}\n"
    )
    return GATEWAY_OFF


SCENARIOS = {
    "turns": turns_scenario,
    "streams": streams_scenario,
    "idle": idle_scenario,
}


def run_group(group: Group, opts: argparse.Namespace) -> list[dict[str, Any]]:
    if opts.url:
        return _run_counts(group, opts, opts.url, opts.server_pid)

    env = {"KDCUBE_GATEWAY_CONFIG": str(gateway_off()), **dict(opts.server_env)}
    server = Server(shlex.split(opts.kdcube), group.chunks, group.delay_s, env)
    idle_sample = None
    try:
        server.start(opts.start_timeout)
        idle_sample = sample_tree(server.pid)
        results = _run_counts(group, opts, server.url, server.pid)
    except (RuntimeError, OSError) as exc:
        log(f"{group.name}: server failed: {exc}")
        results = [{"kind": group.name, "error": f"server: {exc}"}]
    finally:
        server.stop()

    if any("error" in r for r in results):
        log(f"server log ({server.log_path}):\n{server.log_tail()}")

    for r in results:
        if "server" in r:
            r["server"]["rss_kb_at_start"] = idle_sample and idle_sample.rss_kb
    return results


def _run_counts(
    group: Group, opts: argparse.Namespace, url: str, pid: int | None
) -> list[dict[str, Any]]:
    """Run one scenario per count; a failure is recorded and ends the group,
    since the server is then in an unknown state."""
    results = []
    for count in group.counts:
        loadavg = os.getloadavg()
        try:
            result = SCENARIOS[group.name](opts, url, pid, count)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            log(f"{group.name} {count} failed: {exc}")
            results.append({"kind": group.name, "count": count, "error": str(exc)})
            break

        result["loadavg_before"] = loadavg
        result["echo"] = {"chunks": group.chunks, "delay_s": group.delay_s}
        results.append(result)
    return results


def write_report(report: dict[str, Any], results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = results_dir / f"{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"want KEY=VALUE, got {text!r}")
    return key, value


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--scenarios",
        default="turns,streams,idle",
        help="comma list of turns, streams, idle",
    )
    p.add_argument(
        "--concurrency", type=int_list, default=[1, 10, 50], help="turns: users per row"
    )
    p.add_argument(
        "--turn-duration", type=int, default=10, help="turns: measured seconds per row"
    )
    p.add_argument("--warmup-turns", type=int, default=1)
    p.add_argument("--turn-chunks", type=int, default=4)
    p.add_argument("--turn-delay", type=float, default=0.0)
    p.add_argument("--stream-counts", type=int_list, default=[20, 100, 500])
    p.add_argument("--stream-chunks", type=int, default=20)
    p.add_argument("--stream-delay", type=float, default=0.05)
    p.add_argument("--idle-counts", type=int_list, default=[1000, 10000])
    p.add_argument("--idle-hold", type=int, default=10, help="idle: seconds open")
    p.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="idle: seconds to wait after disconnect before reading RSS",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="short smoke run: 3 s rows, idle 1000 only, 3 s hold",
    )
    p.add_argument(
        "--kdcube",
        default=str(DEFAULT_KDCUBE),
        help="command that starts the server (gets `run --port ...`)",
    )
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=64,
        help="streams/idle: connections the client opens at once; keep it under "
        "the server's listen backlog (Hypercorn's default is 100)",
    )
    p.add_argument(
        "--server-env",
        type=env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the server, e.g. KDCUBE_PROC_CONCURRENCY=1000",
    )
    p.add_argument("--start-timeout", type=float, default=90.0)
    p.add_argument(
        "--url",
        help="use a running server instead of starting one "
        "(its bundle config is then whatever it has)",
    )
    p.add_argument(
        "--server-pid",
        type=int,
        help="with --url: the server's pid, to sample its CPU and RSS",
    )
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.turn_duration, opts.idle_hold, opts.settle = 3, 3, 2.0
        opts.idle_counts = [c for c in opts.idle_counts if c <= 1000] or [1000]
    return opts


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    nofile = raise_file_limit()
    if max([0, *opts.idle_counts, *opts.stream_counts]) + 1000 > nofile:
        log(f"warning: RLIMIT_NOFILE is {nofile}; large stream counts may fail")

    build_loadgen()
    report: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "options": {k: str(v) for k, v in vars(opts).items()},
        "scenarios": [],
    }
    for group in groups(opts):
        report["scenarios"].extend(run_group(group, opts))

    path = write_report(report, opts.results_dir)
    print_tables(report, opts)
    log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
