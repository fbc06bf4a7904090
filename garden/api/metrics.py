"""Prometheus metrics, collected from the Gardener's state at scrape time (nothing to keep in sync).

A registry per app rather than the process-global one, so several daemons in one test process do
not share counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from garden import __version__
from garden.daemon import Gardener


class GardenerCollector(Collector):
    def __init__(self, gardener: Gardener):
        self.gardener = gardener

    def collect(self) -> Iterator[Metric]:
        g = self.gardener
        yield InfoMetricFamily("garden", "This peer.", value={"version": __version__, "peer_id": g.peer_id})
        yield GaugeMetricFamily("garden_uptime_seconds", "Seconds since the daemon joined.", value=g.uptime_s)
        known = len(g.directory.known) if g.directory else 0
        yield GaugeMetricFamily("garden_peers_seen", "Peers seen at the last refresh, this one included.", known)
        requests = CounterMetricFamily(
            "garden_dht_requests", "DHT requests made by this daemon.", labels=["op", "outcome"]
        )
        if g.swarm is not None:
            for (op, outcome), count in sorted(g.swarm.stats.requests.items()):
                requests.add_metric([op, outcome], count)
        yield requests
        yield CounterMetricFamily(
            "garden_invalid_peer_records", "Invalid peer records refused or ignored.", value=g.invalid_peer_records
        )


def make_registry(gardener: Gardener) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GardenerCollector(gardener))
    return registry
