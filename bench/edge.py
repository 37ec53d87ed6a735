#!/usr/bin/env python3
"""Benchmark kdcube's front doors: the same load direct, through `kdcube serve
edge`, and through the nginx edge of edge/openresty.

For each group of bench/run.py (turns, streams) and each front door, starts a
fresh `kdcube run` as run.py does, puts the door in front of it, and drives
the door with run.py's scenarios and the Go load generator:

- direct: the `kdcube run` port itself, whose in-process edge is the baseline;
- edge: `kdcube serve edge` in a process of its own, with every upstream URL
  pointing at the `kdcube run` port and its per-address rate limit off;
- nginx: the configuration `ops/edge/nginx.sh render` writes, with the chat
  rate limit off, run in the foreground by a private nginx.

Besides run.py's figures it samples the door's own processes (the edge
process, or nginx's workers) over the same measured window, and prints each
door's throughput and latency as a ratio of the direct figures. Writes
bench/results/edge-<timestamp>.json. Standard library only (plus
bench/run.py); see bench/README.md.

    .venv/bin/python bench/edge.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import grp
import importlib.util
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parent
NGINX_SH = BENCH.parent / "ops" / "edge" / "nginx.sh"
READY_PREFIX = "kdcube is ready at "
DOORS = ("direct", "edge", "nginx")

# What this benchmark asks of run.py unless the command line says otherwise:
# the processor's default of 32 turns at once would otherwise bound the 500
# streams, whichever door they come through.
RUN_DEFAULTS = [
    *("--scenarios", "turns,streams"),
    *("--concurrency", "1,10,50"),
    *("--stream-counts", "500"),
    *("--server-env", "KDCUBE_PROC_CONCURRENCY=1000"),
]


def _load_run() -> ModuleType:
    """bench/run.py as a module, loaded from its path so that this script does
    not depend on bench/ being on sys.path."""
    spec = importlib.util.spec_from_file_location("kdcube_bench_run", BENCH / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules while it executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = _load_run()
log: Callable[[str], None] = run.log


def _env_without_kdcube() -> dict[str, str]:
    # A caller's KDCUBE_* (TLS files, Redis, another edge's settings) would
    # change what the door does; each door gets only what is set here.
    return {k: v for k, v in os.environ.items() if not k.startswith("KDCUBE_")}


def _sum_samples(pids: list[int]) -> Any:
    """One run.Sample for several process trees: CPU and RSS summed."""
    samples = [run.sample_tree(pid) for pid in pids]
    return run.Sample(
        t=time.time(),
        cpu_s=sum(s.cpu_s for s in samples),
        rss_kb=sum(s.rss_kb for s in samples),
        hwm_kb=max((s.hwm_kb for s in samples), default=0),
    )


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return

    proc.send_signal(sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        log(f"{name} ignored signal {sig} for 20 s; killing it")
        proc.kill()
        proc.wait(timeout=10)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- the front doors -----------------------------------------------------------


class Direct:
    """The `kdcube run` port itself: no process of its own to sample."""

    name = "direct"

    def __init__(self, server_url: str) -> None:
        self.url = server_url

    def start(self, timeout: float) -> None:
        return None

    def sample(self) -> Any:
        return None

    def stop(self) -> None:
        return None

    def log_tail(self) -> str:
        return ""


class KdcubeEdge:
    """`kdcube serve edge` in front of the server's port."""

    name = "edge"

    def __init__(self, command: list[str], upstream: str, workdir: Path) -> None:
        self._command, self._upstream, self._dir = command, upstream, workdir
        self._out, self._err = workdir / "edge.out", workdir / "edge.log"
        self.port = run.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> None:
        env = _env_without_kdcube()
        env.update(
            KDCUBE_HOME=str(self._dir / "home"),
            KDCUBE_INGRESS_URL=self._upstream,
            KDCUBE_PROC_URL=self._upstream,
            KDCUBE_METRICS_URL=self._upstream,
            # All the load comes from 127.0.0.1, which the per-address limit
            # would refuse; 0 turns it off.
            KDCUBE_EDGE_RATE_PER_S="0",
        )
        args = [
            *self._command,
            *("serve", "edge", "--host", "127.0.0.1", "--port", str(self.port)),
        ]
        log(f"starting {shlex.join(args)}")
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self.proc = subprocess.Popen(
                args, cwd=self._dir, env=env, stdout=out, stderr=err
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge exited with {self.proc.returncode}")

            if READY_PREFIX in self._out.read_text(errors="replace"):
                log(f"edge ready at {self.url} (pid {self.proc.pid})")
                return
            time.sleep(0.1)
        raise RuntimeError(f"edge not ready after {timeout:.0f} s")

    def sample(self) -> Any:
        assert self.proc is not None
        return run.sample_tree(self.proc.pid)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM, "edge")

    def log_tail(self) -> str:
        return _tail(self._err)


def nginx_binary(explicit: str | None) -> str:
    for candidate in (explicit, "nginx", "openresty"):
        if candidate and (found := shutil.which(candidate)):
            return found
    for path in ("/usr/sbin/nginx", "/usr/local/openresty/bin/openresty"):
        if os.access(path, os.X_OK):
            return path
    raise RuntimeError("nginx is not installed: ops/edge/nginx.sh install")


class Nginx:
    """nginx on the rendered edge/openresty configuration, in the foreground
    (daemon off), so the master is this script's child and its pid is ours."""

    name = "nginx"

    def __init__(self, binary: str, upstream_addr: str, workdir: Path, workers: str):
        self._binary, self._upstream = binary, upstream_addr
        self._dir, self._workers = workdir / "nginx", workers
        self.port = run.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker_pids: list[int] = []

    def start(self, timeout: float) -> None:
        env = _env_without_kdcube()
        env.update(
            KDCUBE_INGRESS_ADDR=self._upstream,
            KDCUBE_PROC_ADDR=self._upstream,
            KDCUBE_METRICS_ADDR=self._upstream,
            KDCUBE_EDGE_LISTEN=f"127.0.0.1:{self.port}",
            KDCUBE_EDGE_WORKERS=self._workers,
            # 10 r/s per address with a burst of 20 would refuse the load.
            KDCUBE_EDGE_CHAT_RATE="off",
            NGINX=self._binary,
        )
        if os.geteuid() == 0:
            # Workers would otherwise run as nobody, who cannot write the
            # logs in this root-owned temp dir.
            user = pwd.getpwuid(os.geteuid()).pw_name
            env["KDCUBE_EDGE_USER"] = f"{user} {grp.getgrgid(os.getegid()).gr_name}"
        subprocess.run(
            ["bash", str(NGINX_SH), "render", str(self._dir)],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        args = [
            *(self._binary, "-p", f"{self._dir}/", "-c", str(self._dir / "nginx.conf")),
            *("-e", str(self._dir / "logs" / "error.log"), "-g", "daemon off;"),
        ]
        log(f"starting {shlex.join(args)}")
        with (self._dir / "logs" / "stderr.log").open("wb") as err:
            self.proc = subprocess.Popen(
                args, env=env, stdout=subprocess.DEVNULL, stderr=err
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        want = int(self._workers) if self._workers.isdigit() else os.cpu_count() or 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}")

            # /health is nginx's own answer; the workers are the master's
            # children, all forked before it is ready to serve.
            self.worker_pids = run._tree(self.proc.pid)[1:]
            ok = run.http_get(self.url + "/health") == 200
            if ok and len(self.worker_pids) >= want:
                log(f"nginx ready at {self.url} (workers {self.worker_pids})")
                return
            time.sleep(0.1)
        raise RuntimeError(f"nginx not ready after {timeout:.0f} s")

    def sample(self) -> Any:
        # The workers only: they carry the traffic, the master just waits.
        return _sum_samples(self.worker_pids)

    def stop(self) -> None:
        # SIGQUIT: graceful stop, open connections are served to the end.
        _stop(self.proc, signal.SIGQUIT, "nginx")

    def log_tail(self) -> str:
        return _tail(self._dir / "logs" / "error.log")


Door = Direct | KdcubeEdge | Nginx


def make_door(name: str, server: Any, workdir: Path, opts: argparse.Namespace) -> Door:
    if name == "direct":
        return Direct(server.url)
    if name == "edge":
        return KdcubeEdge(shlex.split(opts.kdcube), server.url, workdir)
    return Nginx(
        nginx_binary(opts.nginx),
        f"127.0.0.1:{server.port}",
        workdir,
        opts.nginx_workers,
    )


# --- one group through one door -------------------------------------------------


class Probe:
    """Samples the door at each phase the load generator announces, right
    after run.py samples the server, so both cover the same window."""

    def __init__(self, door: Door) -> None:
        self._door = door
        self.samples: dict[str, Any] = {}

    def __call__(self, phase: str) -> None:
        sample = self._door.sample()
        if sample is not None:
            self.samples[phase] = sample


def door_figures(kind: str, result: dict[str, Any], probe: Probe) -> dict[str, Any]:
    a, b = probe.samples.get("measure_start"), probe.samples.get("measure_end")
    cpu_ms = None if a is None or b is None else (b.cpu_s - a.cpu_s) * 1000
    r = result["loadgen"]
    items = r["turns"] if kind == "turns" else r["completed"]
    return {
        "cpu_ms": cpu_ms,
        "cpu_ms_per_turn": run.per_item(cpu_ms, items),
        "rss_kb_end": b.rss_kb if b is not None else None,
        "samples": {k: asdict(v) for k, v in probe.samples.items()},
    }


def run_door(group: Any, name: str, opts: argparse.Namespace) -> list[dict[str, Any]]:
    """A fresh server and door for the group, as run.py gives each group a
    fresh server: every door starts from the same state."""
    env = {"KDCUBE_GATEWAY_CONFIG": str(run.gateway_off()), **dict(opts.server_env)}
    server = run.Server(shlex.split(opts.kdcube), group.chunks, group.delay_s, env)
    workdir = Path(tempfile.mkdtemp(prefix=f"kdcube-bench-{name}-"))
    results: list[dict[str, Any]] = []
    door: Door | None = None
    try:
        server.start(opts.start_timeout)
        door = make_door(name, server, workdir, opts)
        door.start(opts.start_timeout)
        for count in group.counts:
            loadavg = os.getloadavg()
            probe = Probe(door)
            try:
                result = run.SCENARIOS[group.name](
                    opts, door.url, server.pid, count, on_phase=probe
                )
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                # The server or door is then in an unknown state: end the group.
                log(f"{name} {group.name} {count} failed: {exc}")
                results.append(
                    {
                        "kind": group.name,
                        "door": name,
                        "count": count,
                        "error": str(exc),
                    }
                )
                break

            result["door"] = name
            result["loadavg_before"] = loadavg
            result["echo"] = {"chunks": group.chunks, "delay_s": group.delay_s}
            if name != "direct":
                result["door_process"] = door_figures(group.name, result, probe)
            results.append(result)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log(f"{name} {group.name}: start failed: {exc}")
        results.append({"kind": group.name, "door": name, "error": f"start: {exc}"})
    finally:
        if door is not None:
            door.stop()
        server.stop()

    if any("error" in r for r in results):
        log(f"server log ({server.log_path}):\n{server.log_tail()}")
        if door is not None and door.log_tail():
            log(f"{name} log:\n{door.log_tail()}")
    elif not opts.keep_dirs:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


# --- ratios and tables -----------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _p50(summary: dict[str, Any]) -> float | None:
    return summary["p50"] if summary.get("n") else None


def add_ratios(scenarios: list[dict[str, Any]]) -> None:
    """Each door's rate and p50 over the direct figure of the same row."""
    direct = {
        (s["kind"], s.get("users", s.get("streams"))): s
        for s in scenarios
        if s.get("door") == "direct" and "error" not in s
    }
    for s in scenarios:
        base = direct.get((s["kind"], s.get("users", s.get("streams"))))
        if "error" in s or base is None:
            continue

        r, b = s["loadgen"], base["loadgen"]
        if s["kind"] == "turns":
            s["vs_direct"] = {
                "turns_per_s": _ratio(r["turns_per_s"], b["turns_per_s"]),
                "final_p50": _ratio(_p50(r["final_ms"]), _p50(b["final_ms"])),
            }
        else:
            s["vs_direct"] = {
                "completion_p50": _ratio(
                    _p50(r["completion_ms"]), _p50(b["completion_ms"])
                ),
            }


def _door_cpu(s: dict[str, Any]) -> str:
    figures = s.get("door_process")
    return "-" if figures is None else run.fmt(figures["cpu_ms_per_turn"], 2)


def _times(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def turns_rows(scenarios: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in scenarios:
        r, srv, vs = s["loadgen"], s["server"], s.get("vs_direct", {})
        rows.append(
            [
                s["door"],
                str(s["users"]),
                str(r["turns"]),
                run.fmt(r["turns_per_s"]),
                run.pair(r["final_ms"]),
                run.fmt(srv["cpu_ms_per_turn"], 2),
                _door_cpu(s),
                run.fmt(r["client_cpu_ms_per_turn"], 2),
                _times(vs.get("turns_per_s")),
                _times(vs.get("final_p50")),
                str(r["errors"]["total"]),
            ]
        )
    return rows


def streams_rows(scenarios: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in scenarios:
        r, srv, vs = s["loadgen"], s["server"], s.get("vs_direct", {})
        rows.append(
            [
                s["door"],
                str(s["streams"]),
                f"{r['completed']}/{r['streams_opened']}",
                run.fmt(_p50(r["first_delta_ms"])),
                run.pair(r["completion_ms"]),
                run.fmt(r["delta_gap_ms"]["p99"] if r["delta_gap_ms"]["n"] else None),
                run.fmt(srv["cpu_ms_per_turn"], 2),
                _door_cpu(s),
                run.fmt(r["client"].get("cpu_ms_per_item"), 2),
                _times(vs.get("completion_p50")),
                str(r["errors"]["total"]),
            ]
        )
    return rows


def print_tables(report: dict[str, Any], opts: argparse.Namespace) -> None:
    ok = [s for s in report["scenarios"] if "error" not in s]
    # Rows of one count together, doors in the order asked for.
    order = {name: i for i, name in enumerate(report["doors"])}

    def rows_of(kind: str, key: str) -> list[dict[str, Any]]:
        chosen = [s for s in ok if s["kind"] == kind]
        return sorted(chosen, key=lambda s: (s[key], order[s["door"]]))

    if turns := rows_of("turns", "users"):
        run.print_table(
            f"Turns: echo {opts.turn_chunks} chunks, no delay; {opts.turn_duration} s "
            "per row; ms (p50 / p95); door CPU = edge process or nginx workers",
            [
                "door",
                "C",
                "turns",
                "turns/s",
                "final",
                "srv CPU-ms/turn",
                "door CPU-ms/turn",
                "cli CPU-ms/turn",
                "turns/s vs direct",
                "p50 vs direct",
                "errors",
            ],
            turns_rows(turns),
        )
    if streams := rows_of("streams", "streams"):
        run.print_table(
            f"Streams: one turn each at once, echo {opts.stream_chunks} chunks "
            f"{opts.stream_delay * 1000:.0f} ms apart; ms",
            [
                "door",
                "N",
                "done",
                "first-delta p50",
                "completion p50/p95",
                "gap p99",
                "srv CPU-ms/turn",
                "door CPU-ms/turn",
                "cli CPU-ms/turn",
                "p50 vs direct",
                "errors",
            ],
            streams_rows(streams),
        )
    for s in report["scenarios"]:
        if "error" in s:
            print(
                f"\nFAILED {s['door']} {s['kind']} {s.get('count', '')}: {s['error']}"
            )
    print()


# --- main --------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Every other option is bench/run.py's (python bench/run.py --help), "
        "with these defaults: " + " ".join(RUN_DEFAULTS) + ". Scenarios: turns, "
        "streams.",
    )
    p.add_argument(
        "--doors", default=",".join(DOORS), help="comma list of direct, edge, nginx"
    )
    p.add_argument(
        "--nginx-workers", default="auto", help="nginx worker_processes (auto: cores)"
    )
    p.add_argument("--nginx", help="nginx binary (default: nginx, else openresty)")
    p.add_argument(
        "--keep-dirs",
        action="store_true",
        help="keep the doors' temp dirs (logs, rendered nginx config)",
    )
    own, rest = p.parse_known_args(argv)
    opts: argparse.Namespace = run.parse_args([*RUN_DEFAULTS, *rest])
    for key, value in vars(own).items():
        setattr(opts, key, value)

    opts.door_list = [d for d in opts.doors.split(",") if d]
    unknown = set(opts.door_list) - set(DOORS)
    if unknown or not opts.door_list:
        p.error(f"--doors: want some of {', '.join(DOORS)}, got {opts.doors!r}")
    if not set(opts.scenarios.split(",")) <= {"turns", "streams"}:
        p.error("--scenarios: turns and streams only")
    return opts


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    nofile = run.raise_file_limit()
    # Through a door every stream holds two connections on this machine.
    if 2 * max([0, *opts.stream_counts]) + 1000 > nofile:
        log(f"warning: RLIMIT_NOFILE is {nofile}; large stream counts may fail")

    run.build_loadgen()
    report: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": run.machine_info(),
        "options": {k: str(v) for k, v in vars(opts).items()},
        "doors": opts.door_list,
        "scenarios": [],
    }
    for group in run.groups(opts):
        for name in opts.door_list:
            report["scenarios"].extend(run_door(group, name, opts))
    report["loadavg_end"] = os.getloadavg()
    add_ratios(report["scenarios"])

    opts.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = opts.results_dir / f"edge-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report, opts)
    log(f"results written to {path}")
    return 1 if any("error" in s for s in report["scenarios"]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
