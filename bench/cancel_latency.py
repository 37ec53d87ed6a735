"""Cancel latency: from POST /sse/cancel to the turn's chat_error on its stream.

Starts `kdcube run` with a bundle that waits forever after its first delta,
then, N times: submit, wait for the first delta, cancel, and time until the
terminal event arrives. The figure includes the client's own work (httpx), so
it is an upper bound on the server's share.

    .venv/bin/python bench/cancel_latency.py --rounds 50
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx

REPO = Path(__file__).resolve().parent.parent
PROMPT = {
    "bundle_id": "sleeper",
    "external_events": [
        {"type": "event.user.prompt", "payload": {"event": {"text": "wait"}}}
    ],
}
AUTH = {"Authorization": "Bearer dev-bench"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bundles_file(folder: Path) -> Path:
    path = folder / "bundles.yaml"
    sleeper = REPO / "tests" / "bundles" / "sleeper"
    path.write_text(
        "bundles:\n  items:\n"
        f"    - id: sleeper\n      path: {sleeper}\n      module: entrypoint\n"
    )
    return path


async def next_frame(lines: AsyncIterator[str]) -> tuple[str, dict[str, object]]:
    route, data = "", "{}"
    async for line in lines:
        if line.startswith("event: "):
            route = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and route:
            return route, json.loads(data)
    raise EOFError


async def measure(url: str, rounds: int) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        stream_params = {"stream_id": "bench"}
        async with client.stream(
            "GET", "/sse/stream", params=stream_params, headers=AUTH
        ) as response:
            lines = response.aiter_lines()
            await next_frame(lines)
            for _ in range(rounds):
                ack = (
                    await client.post(
                        "/sse/chat", params=stream_params, json=PROMPT, headers=AUTH
                    )
                ).json()
                while (await next_frame(lines))[0] != "chat_delta":
                    pass
                started = time.perf_counter()
                await client.post(
                    "/sse/cancel",
                    json={"conversation_id": ack["conversation_id"]},
                    headers=AUTH,
                )
                while (await next_frame(lines))[0] != "chat_error":
                    pass
                latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()

    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        server = subprocess.Popen(
            [
                str(REPO / ".venv/bin/kdcube"),
                "run",
                "--port",
                str(port),
                "--bundles",
                str(bundles_file(Path(folder))),
            ],
            env={**os.environ, "KDCUBE_HOME": folder},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            print(server.stdout.readline().strip(), file=sys.stderr)
            latencies = anyio.run(measure, f"http://127.0.0.1:{port}", args.rounds)
        finally:
            server.terminate()
            server.wait(10)

    cuts = statistics.quantiles(latencies, n=20)
    print(
        f"cancel -> chat_error over {len(latencies)} rounds: "
        f"p50 {statistics.median(latencies):.1f} ms, p95 {cuts[18]:.1f} ms, "
        f"max {max(latencies):.1f} ms"
    )


if __name__ == "__main__":
    main()
