"""Uploads: throughput of one 20 MiB file, and server memory under 20 at once.

The file is a Word document (.docx, the largest allowed type: 25 MiB) built
here with zipfile: [Content_Types].xml first, a one-paragraph document and
a 20 MiB part of seeded random bytes, all stored uncompressed, so the
upload really is 20 MiB and clamd really reads it. Each upload is one
`POST /sse/chat` (multipart: `event_submission`, then the file) to the `echo`
bundle, timed from send to the 200 answer, which comes once the file is in
storage and scanned.

- Throughput: `kdcube run` in a child process on local storage, once with
  a private clamd (`ops/clamd/clamd.sh`, the EICAR-only database) and
  `KDCUBE_CLAMD_POLICY=required`, once without clamd. One warm-up upload,
  then `--runs` uploads one after another; the median.
- Memory: a fresh `kdcube run` with scanning, one warm-up upload, then
  `--concurrent` uploads at once while a thread reads the server's VmRSS from
  /proc/PID/status every 20 ms.

    .venv/bin/python bench/uploads.py          # about 1 minute
    .venv/bin/python bench/uploads.py --runs 3 --concurrent 10

Exits 1 when any upload was not accepted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway import Kdcube, auth, print_table, prompt, running  # noqa: E402

from kdcube.uploads.filetypes import HEAD_BYTES, classify  # noqa: E402

MIB = 1024 * 1024
CLAMD_SCRIPT = REPO / "ops" / "clamd" / "clamd.sh"
DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
FILE_NAME = "report.docx"
SAMPLE_EVERY_S = 0.02

CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels"'
    ' ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Default Extension="bin" ContentType="application/octet-stream"/>'
    '<Override PartName="/word/document.xml" ContentType="'
    f'{DOCX_MIME}.main+xml"/>'
    "</Types>"
)
RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Target="word/document.xml" Type="http://schemas.'
    'openxmlformats.org/officeDocument/2006/relationships/officeDocument"/>'
    "</Relationships>"
)
DOCUMENT = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
    "<w:body><w:p><w:r><w:t>kdcube upload benchmark</w:t></w:r></w:p></w:body>"
    "</w:document>"
)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def docx(payload_bytes: int) -> bytes:
    """A .docx of about `payload_bytes`, stored without compression."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("[Content_Types].xml", CONTENT_TYPES)
        archive.writestr("_rels/.rels", RELS)
        archive.writestr("word/document.xml", DOCUMENT)
        archive.writestr(
            "word/media/filler.bin", random.Random(7).randbytes(payload_bytes)
        )
    body = buffer.getvalue()
    kind = classify(body[:HEAD_BYTES], FILE_NAME)
    if kind.kind != "docx":
        raise RuntimeError(f"the generated file is {kind.kind}, not docx")
    return body


# --- clamd ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_clamd() -> Iterator[str]:
    """A clamd of our own on a free port; yields its tcp:// URL."""
    folder = Path(tempfile.mkdtemp(prefix="kdcube-bench-clamd-"))
    command = [str(CLAMD_SCRIPT), "start", str(folder), "--port", str(free_port())]
    try:
        started = subprocess.run(
            command, check=True, capture_output=True, text=True, timeout=60
        )
        url = next(w for w in started.stdout.split() if w.startswith("tcp://"))
        log(f"clamd at {url}")
        yield url
    finally:
        subprocess.run(
            [str(CLAMD_SCRIPT), "stop", str(folder)], capture_output=True, timeout=30
        )
        shutil.rmtree(folder, ignore_errors=True)


def scanning_env(clamd_url: str | None) -> dict[str, str]:
    if clamd_url is None:
        return {}
    return {"KDCUBE_CLAMD": clamd_url, "KDCUBE_CLAMD_POLICY": "required"}


# --- one upload ----------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    status: int
    seconds: float
    answer: str


async def upload(client: httpx.AsyncClient, body: bytes, user: str) -> Upload:
    started = time.perf_counter()
    try:
        answer = await client.post(
            "/sse/chat",
            data={"event_submission": json.dumps(prompt("read my report"))},
            files=[("files", (FILE_NAME, body, DOCX_MIME))],
            headers=auth(user),
        )
    except httpx.HTTPError as exc:
        return Upload(0, time.perf_counter() - started, repr(exc))
    return Upload(answer.status_code, time.perf_counter() - started, answer.text[:300])


async def scan_label(client: httpx.AsyncClient, user: str) -> str:
    """The `scan` of the attachment in `user`'s newest conversation."""
    listed = await client.get("/api/conversations", headers=auth(user))
    newest = listed.json()["conversations"][0]["conversation_id"]
    detail = await client.get(f"/api/conversations/{newest}", headers=auth(user))
    turn = detail.json()["turns"][-1]
    return str(turn["attachments"][0]["scan"])


def client_for(server: Kdcube) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=180, trust_env=False)


# --- throughput ----------------------------------------------------------------


@dataclass
class Throughput:
    scanning: str
    uploads: list[Upload]
    scan: str

    def row(self, size: int) -> list[str]:
        seconds = [u.seconds for u in self.uploads if u.status == 200]
        median = statistics.median(seconds) if seconds else float("nan")
        return [
            self.scanning,
            f"{size / MIB:.2f}",
            f"{len(seconds)}/{len(self.uploads)}",
            f"{median:.3f}",
            f"{min(seconds, default=float('nan')):.3f}",
            f"{max(seconds, default=float('nan')):.3f}",
            f"{size / MIB / median:.1f}",
            self.scan,
        ]


async def sequential(
    server: Kdcube, body: bytes, runs: int
) -> tuple[list[Upload], str]:
    async with client_for(server) as client:
        warm = await upload(client, body, "warm")
        if warm.status != 200:
            raise RuntimeError(f"warm-up upload failed: {warm}")
        done = [await upload(client, body, f"u{i}") for i in range(runs)]
        return done, await scan_label(client, "warm")


def throughput(body: bytes, runs: int, clamd_url: str | None) -> Throughput:
    label = "clamd, required" if clamd_url else "none"
    log(f"throughput, scanning {label}: {runs} uploads of {len(body) / MIB:.1f} MiB")
    with running(scanning_env(clamd_url)) as server:
        done, scan = anyio.run(sequential, server, body, runs, backend="trio")
    return Throughput(label, done, scan)


# --- memory --------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class RssSampler:
    """Reads a process's VmRSS every 20 ms in a thread and keeps the highest."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_kb = 0
        self.samples = 0

    def __enter__(self) -> RssSampler:
        self.peak_kb = rss_kb(self._pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.peak_kb = max(self.peak_kb, rss_kb(self._pid))
            self.samples += 1


@dataclass
class Memory:
    concurrent: int
    baseline_kb: int
    peak_kb: int
    after_kb: int
    samples: int
    wall_s: float
    uploads: list[Upload]

    def accepted(self) -> int:
        return sum(1 for u in self.uploads if u.status == 200)


async def at_once(client: httpx.AsyncClient, body: bytes, count: int) -> list[Upload]:
    done: list[Upload] = []

    async def one(user: str) -> None:
        done.append(await upload(client, body, user))

    async with anyio.create_task_group() as tasks:
        for i in range(count):
            tasks.start_soon(one, f"m{i}")
    return done


async def concurrent_memory(server: Kdcube, body: bytes, count: int) -> Memory:
    limits = httpx.Limits(max_connections=count + 2)
    async with httpx.AsyncClient(
        base_url=server.url, timeout=180, trust_env=False, limits=limits
    ) as client:
        warm = await upload(client, body, "warm")
        if warm.status != 200:
            raise RuntimeError(f"warm-up upload failed: {warm}")
        await anyio.sleep(1)
        baseline = rss_kb(server.pid)
        started = time.perf_counter()
        with RssSampler(server.pid) as sampler:
            done = await at_once(client, body, count)
        wall = time.perf_counter() - started
        await anyio.sleep(2)
        after = rss_kb(server.pid)
    return Memory(count, baseline, sampler.peak_kb, after, sampler.samples, wall, done)


def memory(body: bytes, count: int, clamd_url: str) -> Memory:
    log(f"memory: {count} uploads of {len(body) / MIB:.1f} MiB at once, with clamd")
    with running(scanning_env(clamd_url)) as server:
        return anyio.run(concurrent_memory, server, body, count, backend="trio")


# --- report --------------------------------------------------------------------


def print_memory(result: Memory, size: int) -> None:
    mib = 1024
    growth = (result.peak_kb - result.baseline_kb) / mib
    seconds = [u.seconds for u in result.uploads]
    print_table(
        [
            "uploads at once",
            "accepted",
            "wall s",
            "MiB/s total",
            "upload s p50/max",
            "RSS baseline MiB",
            "peak MiB",
            "peak - baseline MiB",
            "per upload MiB",
            "2 s after MiB",
        ],
        [
            [
                str(result.concurrent),
                f"{result.accepted()}/{result.concurrent}",
                f"{result.wall_s:.2f}",
                f"{size * result.accepted() / MIB / result.wall_s:.1f}",
                f"{statistics.median(seconds):.2f} / {max(seconds):.2f}",
                f"{result.baseline_kb / mib:.0f}",
                f"{result.peak_kb / mib:.0f}",
                f"{growth:.0f}",
                f"{growth / result.concurrent:.1f}",
                f"{result.after_kb / mib:.0f}",
            ]
        ],
    )
    print(f"({result.samples} RSS samples, every {SAMPLE_EVERY_S * 1000:.0f} ms)")


def failures(uploads: list[Upload]) -> list[Upload]:
    return [u for u in uploads if u.status != 200]


def print_failures(bad: list[Upload]) -> None:
    for status, count in Counter(u.status for u in bad).items():
        sample = next(u for u in bad if u.status == status)
        print(f"  {count} x {status}: {sample.answer}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=20, help="size of the file")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=20)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    body = docx(args.mib * MIB)
    log(f"load average at start: {os.getloadavg()}")
    with private_clamd() as clamd_url:
        rows = [throughput(body, args.runs, url) for url in (clamd_url, None)]
        held = memory(body, args.concurrent, clamd_url)

    print(
        f"\nSequential uploads of one {FILE_NAME} ({len(body):,} bytes), local"
        f" storage; {args.runs} runs after one warm-up; seconds from send to 200."
    )
    print_table(
        ["scanning", "MiB", "ok", "median s", "min s", "max s", "MiB/s", "scan"],
        [r.row(len(body)) for r in rows],
    )
    print(f"\n{args.concurrent} uploads at once, clamd required:")
    print_memory(held, len(body))
    bad = failures([u for r in rows for u in r.uploads] + held.uploads)
    print(f"\nnot accepted: {len(bad)}")
    print_failures(bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
