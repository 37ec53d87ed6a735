"""Which part of kdcube answers a path: upstream KDCube's edge table, reduced
to what kdcube serves.

The chat API, conversations and administration go to the ingress; bundle
integrations to the processor; metrics to the metrics role; ``/auth/`` to a
login proxy when one is configured; the edge answers its own health and the
UI's configuration; every other path belongs to the web UI, whose router
takes unknown paths (the SPA fallback).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Target", "route"]


class Target(StrEnum):
    INGRESS = "ingress"
    PROC = "proc"
    METRICS = "metrics"
    AUTH = "auth"
    EDGE = "edge"
    UI = "ui"


# Longest prefixes first: integrations live under /api/ and /admin/.
_PREFIXES: tuple[tuple[str, Target], ...] = (
    ("/api/integrations/", Target.PROC),
    ("/admin/integrations/", Target.PROC),
    ("/sse/", Target.INGRESS),
    ("/api/", Target.INGRESS),
    ("/admin/", Target.INGRESS),
    ("/auth/", Target.AUTH),
)
_EXACT: dict[str, Target] = {
    "/metrics": Target.METRICS,
    "/metrics.json": Target.METRICS,
    "/health": Target.EDGE,
    "/ready": Target.EDGE,
    "/config.json": Target.EDGE,
    "/api/conversations": Target.INGRESS,
    "/admin/bundles": Target.INGRESS,
    "/admin/gateway": Target.INGRESS,
}


def route(path: str) -> Target:
    exact = _EXACT.get(path)
    if exact is not None:
        return exact
    for prefix, target in _PREFIXES:
        if path.startswith(prefix):
            return target
    return Target.UI
