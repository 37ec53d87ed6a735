"""The chat ingress: REST and SSE in front of the queue and the relay."""

from kdcube.ingress.app import create_ingress_app
from kdcube.ingress.streams import StreamHub

__all__ = ["StreamHub", "create_ingress_app"]
