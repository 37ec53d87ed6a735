"""The embedded edge: the public front door in front of the roles.

It routes by path (``routes``), passes requests through to the roles in this
process or over HTTP (``proxy``) without buffering either direction, serves
the web UI (``static``), and guards the door: a token bucket per client IP
(``ratelimit``), request size limits and security headers (``app``).
"""

from kdcube.edge.app import EdgeApp, EdgeOptions
from kdcube.edge.routes import Target, route

__all__ = ["EdgeApp", "EdgeOptions", "Target", "route"]
