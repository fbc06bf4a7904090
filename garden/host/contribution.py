"""What this peer gave: rows shaken, samples trained, tokens served, hours online, per mission and in all.

Kept in the store (``contribution`` table), so a volunteer's record survives restarts and upgrades;
shown by ``garden status`` and the dashboard, and announced in the peer record so a lead sees who
helped. Work reports amounts with :meth:`Ledger.add` as it happens (in memory), and :meth:`Ledger.flush`
writes them every few seconds in one transaction: a crash loses at most those seconds.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from garden.protocol.records import ContributionTotals
from garden.store import Store

METRICS = ("rows_shaken", "shards_shaken", "samples_trained", "tokens_served", "seconds_online")
PEER = ""
"""The mission id under which peer-wide amounts (tokens served, time online) are kept."""


class Ledger:
    def __init__(self, store: Store):
        self.store = store
        self._pending: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._online_since = time.monotonic()

    def add(self, metric: str, amount: float, mission_id: str = PEER) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown contribution metric {metric!r}")
        if amount > 0:
            with self._lock:
                self._pending[(mission_id, metric)] += amount

    def flush(self) -> None:
        """Count the time online since the last flush, and write what is pending."""
        now = time.monotonic()
        with self._lock:
            self._pending[(PEER, "seconds_online")] += now - self._online_since
            self._online_since = now
            pending, self._pending = dict(self._pending), Counter()
        try:
            self.store.add_contribution(pending)
        except Exception:
            with self._lock:  # keep it for the next flush
                self._pending.update(pending)
            raise

    def _merged(self) -> dict[str, dict[str, float]]:
        stored = self.store.contribution()
        with self._lock:
            pending = dict(self._pending)
            online = time.monotonic() - self._online_since
        for (mission_id, metric), amount in pending.items():
            stored.setdefault(mission_id, {})[metric] = stored.get(mission_id, {}).get(metric, 0.0) + amount
        peer = stored.setdefault(PEER, {})
        peer["seconds_online"] = peer.get("seconds_online", 0.0) + online
        return stored

    def totals(self) -> ContributionTotals:
        """The peer as a whole: missions' amounts summed, with the peer-wide ones."""
        merged = self._merged()
        summed: Counter[str] = Counter()
        for metrics in merged.values():
            summed.update(metrics)
        return _totals(summed)

    def by_mission(self) -> dict[str, ContributionTotals]:
        return {mid: _totals(metrics) for mid, metrics in self._merged().items() if mid != PEER}


def _totals(metrics: dict[str, float]) -> ContributionTotals:
    return ContributionTotals(
        rows_shaken=int(metrics.get("rows_shaken", 0)),
        shards_shaken=int(metrics.get("shards_shaken", 0)),
        samples_trained=int(metrics.get("samples_trained", 0)),
        tokens_served=int(metrics.get("tokens_served", 0)),
        hours_online=metrics.get("seconds_online", 0.0) / 3600.0,
    )
