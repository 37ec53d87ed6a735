"""The live gateway config: the deployment's board of ``gateway.yaml``.

See ``kdcube.bus.board`` for how a document applied in one process reaches
every other within about a second.
"""

from __future__ import annotations

from coredis import Redis

from kdcube.bus.board import POLL_S, Board, MemoryBoard, RedisBoard
from kdcube.bus.redis.keys import KeyLayout
from kdcube.gateway.config import GatewayConfig, parse_gateway_config

ConfigBoard = Board[GatewayConfig]


class GatewayCodec:
    topic = "gateway"

    def parse(self, text: str) -> GatewayConfig:
        return parse_gateway_config(text)

    def dump(self, value: GatewayConfig) -> str:
        return value.to_json()


def MemoryConfigBoard(baseline: GatewayConfig) -> MemoryBoard[GatewayConfig]:
    return MemoryBoard(GatewayCodec(), baseline)


def RedisConfigBoard(
    commands: Redis[str],
    keys: KeyLayout,
    baseline: GatewayConfig,
    *,
    poll_s: float = POLL_S,
) -> RedisBoard[GatewayConfig]:
    return RedisBoard(
        commands, keys.gateway_config(), GatewayCodec(), baseline, poll_s=poll_s
    )
