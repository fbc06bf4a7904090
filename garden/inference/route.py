"""Choosing a chain of servers that covers a model's layers, from the swarm's ``model/<ref>/blocks`` records.

A chain is a shortest path over layer boundaries: from boundary ``a`` a server whose range holds ``a`` can
take the client to any boundary ``b`` up to the end of its range, at a cost of its round trip plus
``(b - a) / throughput`` (its announced layer-tokens per second, one token at a time: the decode step the
chain repeats for every token). Round trips are what the client measured on its calls to that server (a
default until then). Servers that failed recently are left out for ``ban_seconds``, so a dead peer whose
record has not expired yet is not chosen again and again.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hivemind.utils import get_dht_time

from garden.inference.blocks import LayerSpan
from garden.protocol.blocks import BlocksRecord
from garden.protocol.keys import DHTKeys
from garden.protocol.records import RecordError, check_fresh

logger = logging.getLogger(__name__)

DEFAULT_RTT = 0.005
"""Seconds assumed for a server's round trip before one is measured (a loopback hivemind call is ~1 ms)."""


class CoverageError(RuntimeError):
    """No chain covers the layers asked for; ``missing`` names the layer ranges no server holds."""

    def __init__(self, model: str, missing: list[LayerSpan], num_layers: int | None) -> None:
        spans = ", ".join(str(s) for s in missing) or "none"
        of = f" of {num_layers}" if num_layers else ""
        super().__init__(f"no server holds layers {spans}{of} of {model}")
        self.model, self.missing, self.num_layers = model, missing, num_layers


@dataclass(frozen=True)
class Hop:
    """One server of a chain and the layers it runs for this chain (within its announced range)."""

    peer_id: str
    span: LayerSpan
    record: BlocksRecord


def missing_spans(records: list[BlocksRecord], num_layers: int) -> list[LayerSpan]:
    covered = [False] * num_layers
    for r in records:
        for i in range(r.start, min(r.end, num_layers)):
            covered[i] = True
    gaps, start = [], None
    for i, held in enumerate([*covered, True]):
        if not held and start is None:
            start = i
        elif held and start is not None:
            gaps.append(LayerSpan(start, i))
            start = None
    return gaps


def shortest_chain(
    records: list[BlocksRecord], model: str, span: LayerSpan, rtt: dict[str, float] | None = None
) -> list[Hop]:
    """The chain of least expected per-token latency covering ``span``; raises :class:`CoverageError`."""
    rtt = rtt or {}
    inner = (p for r in records for p in (r.start, r.end) if span.start < p < span.end)
    points = sorted({span.start, span.end, *inner})
    best: dict[int, float] = {span.start: 0.0}
    back: dict[int, tuple[int, BlocksRecord]] = {}
    queue = [(0.0, span.start)]
    while queue:
        cost, a = heapq.heappop(queue)
        if a == span.end:
            break
        if cost > best.get(a, float("inf")):
            continue
        for r in records:
            if not r.start <= a < r.end:
                continue
            for b in points:
                if a < b <= min(r.end, span.end):
                    total = cost + rtt.get(r.peer_id, DEFAULT_RTT) + (b - a) / r.throughput
                    if total < best.get(b, float("inf")):
                        best[b], back[b] = total, (a, r)
                        heapq.heappush(queue, (total, b))
    if span.end not in back and span.start != span.end:
        num_layers = max((r.num_layers for r in records), default=None)
        gaps = missing_spans(records, num_layers or span.end)
        raise CoverageError(model, [g for g in gaps if g.start < span.end and g.end > span.start] or [span], num_layers)
    hops: list[Hop] = []
    b = span.end
    while b != span.start:
        a, r = back[b]
        hops.append(Hop(r.peer_id, LayerSpan(a, b), r))
        b = a
    return hops[::-1]


@dataclass
class Router:
    """The servers of one model as the swarm announces them, minus those that failed recently.

    :param swarm: ``garden.net.swarm.Swarm`` (bounded DHT access)
    :param refresh_s: how long one read of the records is reused
    """

    swarm: Any
    keys: DHTKeys
    model: str
    ban_seconds: float = 60.0
    refresh_s: float = 2.0
    invalid_records: Counter[str] = field(default_factory=Counter)
    rtt: dict[str, float] = field(default_factory=dict)
    _banned: dict[str, float] = field(default_factory=dict)
    _cache: tuple[float, list[BlocksRecord]] | None = None

    async def servers(self, fresh: bool = False) -> list[BlocksRecord]:
        """Valid, unexpired records of this model (not counting banned servers)."""
        if fresh or self._cache is None or time.monotonic() - self._cache[0] > self.refresh_s:
            self._cache = (time.monotonic(), await read_blocks(self.swarm, self.keys, self.model, self.invalid_records))
        now = time.monotonic()
        return [r for r in self._cache[1] if self._banned.get(r.peer_id, 0.0) <= now]

    def ban(self, peer_id: str, seconds: float | None = None) -> None:
        seconds = self.ban_seconds if seconds is None else seconds
        logger.info("routing around server %s for %.0f s", peer_id, seconds)
        self._banned[peer_id] = time.monotonic() + seconds
        self._cache = None  # its record may be gone already: read again

    def measured(self, peer_id: str, seconds: float) -> None:
        previous = self.rtt.get(peer_id)
        self.rtt[peer_id] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    async def chain(self, span: LayerSpan | None = None) -> list[Hop]:
        records = await self.servers()
        if span is None:
            if not records:
                raise CoverageError(self.model, [], None)
            span = LayerSpan(0, max(r.num_layers for r in records))
        return shortest_chain(records, self.model, span, self.rtt)


async def read_blocks(swarm: Any, keys: DHTKeys, model: str, invalid: Counter[str] | None = None) -> list[BlocksRecord]:
    """Every valid, fresh record under ``model/<model>/blocks``; invalid ones are logged and counted."""
    found = await swarm.get(keys.model_blocks(model), latest=True)
    records: list[BlocksRecord] = []
    items = found.value.items() if found is not None and hasattr(found.value, "items") else []
    now = get_dht_time()
    for subkey, item in items:
        try:
            raw, expiration_time = item
            record = BlocksRecord.from_wire(raw, subkey)
            check_fresh(record.announced_at, expiration_time, now)
            if record.model != model:
                raise RecordError(f"names model {record.model[:80]!r}")
        except (RecordError, TypeError, ValueError) as e:
            if invalid is not None:
                invalid["blocks"] += 1
            logger.warning("ignored an invalid blocks record under %r: %s", str(subkey)[:80], e)
            continue
        if expiration_time > now:
            records.append(record)
    # a client talks to servers of one model shape: the most common (num_layers, hidden_size) wins
    shapes = Counter((r.num_layers, r.hidden_size) for r in records)
    if len(shapes) > 1:
        shape = shapes.most_common(1)[0][0]
        odd = [r.peer_id for r in records if (r.num_layers, r.hidden_size) != shape]
        logger.warning("servers %s announce %s with another shape; left out", odd, model)
        records = [r for r in records if (r.num_layers, r.hidden_size) == shape]
    return sorted(records, key=lambda r: (r.start, r.peer_id))
