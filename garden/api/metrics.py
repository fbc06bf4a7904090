"""Prometheus metrics, collected from the Gardener's state at scrape time (nothing to keep in sync).

A registry per app rather than the process-global one, so several daemons in one test process do
not share counters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from garden import __version__
from garden.daemon.gardener import Gardener
from garden.mission.shaking import ShakingSnapshot
from garden.mission.training import TrainingSnapshot
from garden.net.transfer import TransferSnapshot


def by_label(
    family: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, doc: str, label: str, counts: dict[str, int]
) -> Metric:
    """One metric with a sample per ``counts`` key, that key as its one label."""
    metric = family(name, doc, labels=[label])
    for value, count in counts.items():
        metric.add_metric([value], count)
    return metric


class GardenerCollector(Collector):
    """Reads the services' snapshots at each scrape; it touches no service's internals."""

    def __init__(self, gardener: Gardener):
        self.gardener = gardener

    def collect(self) -> Iterator[Metric]:
        g = self.gardener
        counters = g.counters()
        yield InfoMetricFamily("garden", "This peer.", value={"version": __version__, "peer_id": g.peer_id})
        yield GaugeMetricFamily("garden_uptime_seconds", "Seconds since the daemon joined.", value=g.uptime_s)
        known = g.directory.snapshot().peers_seen
        yield GaugeMetricFamily("garden_peers_seen", "Peers seen at the last refresh, this one included.", known)
        requests = CounterMetricFamily(
            "garden_dht_requests", "DHT requests made by this daemon.", labels=["op", "outcome"]
        )
        for (op, outcome), count in sorted(counters.dht_requests.items()):
            requests.add_metric([op, outcome], count)
        yield requests
        yield CounterMetricFamily(
            "garden_invalid_peer_records",
            "Invalid peer records refused or ignored.",
            value=counters.invalid_peer_records,
        )
        yield by_label(CounterMetricFamily, "garden_invalid_mission_records",
                       "Invalid mission-related records refused or ignored.", "kind", counters.invalid_mission_records)
        yield by_label(GaugeMetricFamily, "garden_missions_ignored",
                       "Valid missions of other leads not kept now, by reason.", "reason", counters.missions_ignored)
        yield by_label(CounterMetricFamily, "garden_mission_index_reads",
                       "Reads of the mission index: heads (every refresh, a few hundred bytes a lead) and full (when "
                       "a head changed, or a minute passed).", "kind", counters.mission_index_reads)
        yield by_label(CounterMetricFamily, "garden_nudges",
                       "Nudges (look at the DHT now): sent (peers that answered this lead's), acted (another peer's "
                       "made this one look), ignored (within a second of an acted one), refused (unknown topic, "
                       "extra bytes).", "outcome", counters.nudges)  # fmt: skip
        lag = g.loop_lag.snapshot()
        yield HistogramMetricFamily(
            "garden_event_loop_lag_seconds",
            "How late the daemon's event loop woke from a short sleep (what a blocking call costs HTTP, Pause "
            "and lease renewals).",
            buckets=[*((str(b), c) for b, c in zip(lag.buckets, lag.counts, strict=True)), ("+Inf", lag.count)],
            sum_value=lag.total,
        )
        yield from _transfer_metrics(g.transfer.snapshot())
        shaking = g.work.snapshot()
        yield CounterMetricFamily(
            "garden_row_sets_refused",
            "Row sets refused: offered with no done record naming them, or fetched intact (hash right) with rows "
            "that were invalid or did not fit their shard.",
            value=shaking.row_sets_refused,
        )
        yield CounterMetricFamily(
            "garden_done_records_voided",
            "Winning done records held void here: no peer served their row set in --void-after, or it did not "
            "answer the shard; their shards were opened again.",
            value=shaking.done_records_voided,
        )
        yield from _mission_metrics(shaking)
        yield from _training_metrics(g.training.snapshot(), shaking)


def _transfer_metrics(stats: TransferSnapshot) -> Iterator[Metric]:
    transfer = CounterMetricFamily("garden_transfer_bytes", "Content bytes moved between peers.", labels=["way"])
    transfer.add_metric(["sent"], stats.bytes_sent)
    transfer.add_metric(["received"], stats.bytes_received)
    yield transfer
    refused = CounterMetricFamily(
        "garden_transfer_refused", "Transfers refused for bad content (the sender is avoided).", labels=["reason"]
    )
    for reason, count in sorted(stats.refused.items()):
        refused.add_metric([reason], count)
    yield refused
    memory = GaugeMetricFamily(
        "garden_transfer_serving_memory_bytes",
        "Memory spent on content served to peers: now, the most at once, and the cap (--max-serving-memory).",
        labels=["of"],
    )
    memory.add_metric(["used"], stats.serve_memory_used)
    memory.add_metric(["peak"], stats.serve_memory_peak)
    memory.add_metric(["cap"], stats.serve_memory)
    yield memory
    busy = "Fetches answered busy (no serving slot, or no room in --max-serving-memory)."
    yield CounterMetricFamily("garden_transfer_busy", busy, value=stats.busy)


def _mission_metrics(shaking: ShakingSnapshot) -> Iterator[Metric]:
    shards = GaugeMetricFamily(
        "garden_mission_shards", "Shards of a mission by state.", labels=["mission", "name", "state"]
    )
    rows = GaugeMetricFamily(
        "garden_mission_rows", "Rows of the shards done (winning attempts).", labels=["mission", "name"]
    )
    shaken = CounterMetricFamily(
        "garden_mission_rows_shaken", "Rows this peer sampled for a mission.", labels=["mission", "name"]
    )
    shards_shaken = CounterMetricFamily(
        "garden_mission_shards_shaken", "Shards this peer sampled for a mission.", labels=["mission", "name"]
    )
    held = GaugeMetricFamily("garden_mission_row_sets_held", "Row sets this peer holds.", labels=["mission", "name"])
    for mission_id, work in shaking.missions.items():
        labels = [mission_id, work.name]
        if work.shards is not None:
            for state in ("done", "leased", "open"):
                shards.add_metric([*labels, state], getattr(work.shards, state))
            rows.add_metric(labels, work.rows_done)
        shaken.add_metric(labels, work.rows_shaken)
        shards_shaken.add_metric(labels, work.shards_shaken)
        held.add_metric(labels, work.row_sets_held)
    yield from (shards, rows, shaken, shards_shaken, held)


TRAIN_GAUGES = {
    "epoch": "The swarm epoch this peer's trainer is at.",
    "samples_per_s": "Rows per second this peer's trainer trains on.",
    "peers": "Trainers in the swarm's latest progress report.",
    "loss": "DORPO loss of this peer's last step.",
    "kl": "Top-k KL to the teacher at this peer's last step.",
    "pref_acc": "Preference accuracy (lp+ > lp-) at this peer's last step.",
}
TRAIN_COUNTERS = {
    "samples": "Rows this peer's trainer trained on.",
    "skipped_steps": "Trainer steps with a non-finite loss or gradient (not applied, not sent).",
}


def _training_metrics(training: TrainingSnapshot, shaking: ShakingSnapshot) -> Iterator[Metric]:
    """``garden_train_<field>{mission, name}`` from each trainer's status (the fields of ``GET /missions/{id}``)."""
    labels = ["mission", "name"]
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        **{k: GaugeMetricFamily(f"garden_train_{k}", doc, labels=labels) for k, doc in TRAIN_GAUGES.items()},
        **{k: CounterMetricFamily(f"garden_train_{k}", doc, labels=labels) for k, doc in TRAIN_COUNTERS.items()},
    }
    for mission_id, status in training.workers.items():
        name = shaking.missions[mission_id].name if mission_id in shaking.missions else ""
        for key, family in families.items():
            value = getattr(status, key, None)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                family.add_metric([mission_id, name], value)
    yield from families.values()


def make_registry(gardener: Gardener) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GardenerCollector(gardener))
    return registry
