"""Watch the backing services so that ``/ready`` names the one that is down."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import structlog

from kdcube.bus import BusError
from kdcube.runtime.health import Health
from kdcube.store import StoreError

log = structlog.get_logger("kdcube.runtime")

_PROBE_TIMEOUT_S = 2.0

Probe = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Dependency:
    name: str
    probe: Probe


async def watch_dependencies(
    health: Health, dependencies: list[Dependency], *, interval_s: float = 2.0
) -> None:
    """Probe each dependency forever; mark it down or up in ``health``."""
    while True:
        for dependency in dependencies:
            await _check(health, dependency)
        await anyio.sleep(interval_s)


async def _check(health: Health, dependency: Dependency) -> None:
    reachable = False
    with anyio.move_on_after(_PROBE_TIMEOUT_S):
        try:
            await dependency.probe()
            reachable = True
        except (BusError, StoreError, OSError) as exc:
            log.debug(
                "dependency.probe_failed", dependency=dependency.name, error=str(exc)
            )

    if reachable and dependency.name in health.down:
        health.down.discard(dependency.name)
        log.info("dependency.up", dependency=dependency.name)
    elif not reachable and dependency.name not in health.down:
        health.down.add(dependency.name)
        log.warning("dependency.down", dependency=dependency.name)
