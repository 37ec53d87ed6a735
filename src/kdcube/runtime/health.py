"""Whether this process can take work, for ``/ready`` and for intake checks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Health:
    draining: bool = False
    down: set[str] = field(default_factory=set)
    """Dependencies currently unreachable, by name."""

    def begin_drain(self) -> None:
        self.draining = True

    def readiness(self) -> tuple[int, dict[str, object]]:
        if self.draining:
            return 503, {"status": "draining"}
        if self.down:
            return 503, {"status": "unavailable", "down": sorted(self.down)}
        return 200, {"status": "ready"}
