"""The metrics role: reads the bus on every scrape and renders Prometheus text.

Processes record what only they see (turn outcomes, queue waits, gateway
refusals) as tallies on the bus, and announce their load in heartbeats; the
metrics role turns both into metrics without talking to any other process.
"""

from kdcube.metrics.app import MetricsApp
from kdcube.metrics.collector import BusMetrics

__all__ = ["BusMetrics", "MetricsApp"]
