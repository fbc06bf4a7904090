"""Choosing a chain of servers that covers a model's layers, from the swarm's ``model/<ref>/blocks`` records.

A chain is a shortest path over layer boundaries: from boundary ``a`` a server whose range holds ``a`` can
take the client to any boundary ``b`` up to the end of its range, at a cost of the expected seconds of one
decode step there: its round trip plus ``(b - a)`` times its seconds per layer.

Routing trusts what this client measured, not what servers announce: a record's throughput is a claim any
peer can inflate (up to 1e9), and a server that attracts every route reads every hidden state. So each
server's round trip (calls that run no layer: open, close) and its seconds per layer (one-token steps: the
call's time beyond the round trip, divided by the layers it ran) are smoothed averages of this client's own
calls (:class:`Measurement`). A server not measured yet is tried once before routes settle on the fastest
measured one (it is assumed a little faster than that, :func:`guesses`); its announcement, clamped to
the median of the other servers' announcements, only decides which unmeasured server goes first. So a liar
is tried at most like any other server, once, and then ranked by what it did. A measurement not renewed
for :data:`MEASUREMENT_TTL` is forgotten, so a server that was slow once (a busy moment) is tried again.

Servers that failed recently are left out for ``ban_seconds``, so a dead peer whose record has not expired
yet is not chosen again and again; a server caught answering wrong hidden states (the client's spot check,
:mod:`garden.inference.client`) is left out far longer.
"""

from __future__ import annotations

import heapq
import logging
import statistics
import time
from collections import Counter
from collections.abc import Mapping
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
SMOOTHING = 0.2
"""Weight of a new call in a server's moving averages: ~5 calls to follow a change, one slow call moves
little."""
MEASUREMENT_TTL = 600.0
"""Seconds after which a server's measurement, not renewed by a call, is forgotten: the server counts as not
measured again (:func:`guesses`) and is tried again. A slow liar thus wins at most one route per TTL."""
EXPLORE = 0.9
"""A server not measured yet is assumed this fraction of the fastest measured server's seconds per layer (or
faster, if its bounded announcement says so): each is tried once before routes settle."""
MAX_MEASURED = 4096
"""Servers whose measurements a router keeps (identities are free: the oldest are forgotten first)."""


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


@dataclass
class Measurement:
    """What this client measured of one server (smoothed averages of its own calls).

    :param rtt: seconds of a call that runs no layer (open, close): the network and the server's overhead
    :param layer_seconds: seconds per layer of a one-token step beyond ``rtt`` (the decode step a chain
        repeats for every token); None until the server ran one for this client
    :param at: ``time.monotonic()`` of the last call measured"""

    rtt: float | None = None
    layer_seconds: float | None = None
    at: float = field(default_factory=time.monotonic, compare=False)


def _smooth(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * value


def bounded_priors(records: list[BlocksRecord]) -> dict[str, float]:
    """Each server's announced throughput, clamped to the median of the other servers' announcements.

    Why the median of the others: one liar (or fewer than half of them) cannot move it, so announcing 1e9
    earns a never-measured server the prior of a typical one, no more; an honest server announcing less
    than the median keeps its own figure. A server alone keeps its announcement (there is no choice to
    win)."""
    values = [r.throughput for r in records]
    priors: dict[str, float] = {}
    for i, record in enumerate(records):
        others = values[:i] + values[i + 1 :]
        cap = statistics.median(others) if others else record.throughput
        priors[record.peer_id] = min(record.throughput, cap)
    return priors


def hop_seconds(layers: int, guess: Measurement, measured: Measurement | None = None) -> float:
    """Expected seconds of one decode step over ``layers`` layers of a server: its measured round trip plus
    ``layers`` times its measured seconds per layer, each taken from ``guess`` while not measured."""
    known = measured or Measurement()
    rtt = known.rtt if known.rtt is not None else guess.rtt
    per_layer = known.layer_seconds if known.layer_seconds is not None else guess.layer_seconds
    return (rtt or 0.0) + layers * (per_layer or 0.0)


def guesses(records: list[BlocksRecord], measured: Mapping[str, Measurement]) -> dict[str, Measurement]:
    """What each server is assumed to take until this client measures it: the seconds per layer of its
    bounded announcement (:func:`bounded_priors`), but never slower than :data:`EXPLORE` times the fastest
    server measured; a round trip of :data:`DEFAULT_RTT`, or the shortest measured if shorter.

    Why optimistic: announcements are measured by each server on its own, often while it starts beside other
    work, and are not on the scale of this client's measurements; trusting a pessimistic one would let a
    measured liar that is merely less slow keep every route. So a server not measured yet is tried once (per
    :data:`MEASUREMENT_TTL`) before routes settle on the fastest measured, and announcements only decide
    which unmeasured server is tried first."""
    priors = bounded_priors(records)
    known = [measured[r.peer_id] for r in records if r.peer_id in measured]
    layer_times = [m.layer_seconds for m in known if m.layer_seconds is not None]
    ceiling = EXPLORE * min(layer_times) if layer_times else float("inf")
    rtt = min([DEFAULT_RTT, *(m.rtt for m in known if m.rtt is not None)])
    return {r.peer_id: Measurement(rtt=rtt, layer_seconds=min(1.0 / priors[r.peer_id], ceiling)) for r in records}


def shortest_chain(
    records: list[BlocksRecord],
    model: str,
    span: LayerSpan,
    measured: Mapping[str, Measurement] | None = None,
) -> list[Hop]:
    """The chain of least expected per-token latency covering ``span`` (each hop costed by
    :func:`hop_seconds` from ``measured``, else :func:`guesses`); raises :class:`CoverageError`."""
    measured = measured or {}
    assumed = guesses(records, measured)
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
                    total = cost + hop_seconds(b - a, assumed[r.peer_id], measured.get(r.peer_id))
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
    """The servers of one model as the swarm announces them, minus those that failed recently or lied, ranked
    by what this client measured of them.

    :param swarm: ``garden.net.swarm.Swarm`` (bounded DHT access)
    :param refresh_s: how long one read of the records is reused
    :ivar measurements: per server, what this client's calls measured (see :meth:`measured`)
    :ivar liars: servers banned by a spot check, with why (``garden.inference.client``)
    :ivar checks: spot checks by outcome (``agreed``, ``disagreed``, ``no second server``, ``witness failed``)
    """

    swarm: Any
    keys: DHTKeys
    model: str
    ban_seconds: float = 60.0
    refresh_s: float = 2.0
    invalid_records: Counter[str] = field(default_factory=Counter)
    measurements: dict[str, Measurement] = field(default_factory=dict)
    liars: dict[str, str] = field(default_factory=dict)
    checks: Counter[str] = field(default_factory=Counter)
    _banned: dict[str, float] = field(default_factory=dict)
    _cache: tuple[float, list[BlocksRecord]] | None = None

    async def servers(self, fresh: bool = False) -> list[BlocksRecord]:
        """Valid, unexpired records of this model (not counting banned servers)."""
        if fresh or self._cache is None or time.monotonic() - self._cache[0] > self.refresh_s:
            self._cache = (time.monotonic(), await read_blocks(self.swarm, self.keys, self.model, self.invalid_records))
        now = time.monotonic()
        return [r for r in self._cache[1] if self._banned.get(r.peer_id, 0.0) <= now]

    def ban(self, peer_id: str, seconds: float | None = None, lied: str | None = None) -> None:
        """Leave ``peer_id`` out of routing for ``seconds`` (default ``ban_seconds``); ``lied`` is set when a
        spot check caught it, and says how (kept in :attr:`liars`)."""
        seconds = self.ban_seconds if seconds is None else seconds
        if lied is None:
            logger.info("routing around server %s for %.0f s", peer_id, seconds)
        else:
            self.liars[peer_id] = lied
            logger.warning("server %s banned for %.0f s: %s", peer_id, seconds, lied)
        self._banned[peer_id] = max(self._banned.get(peer_id, 0.0), time.monotonic() + seconds)
        self._cache = None  # its record may be gone already: read again

    def banned(self, peer_id: str) -> bool:
        return self._banned.get(peer_id, 0.0) > time.monotonic()

    def measured(self, peer_id: str, seconds: float, layers: int = 0, tokens: int = 0) -> None:
        """Record a successful call to ``peer_id`` that took ``seconds`` and ran ``layers`` layers on
        ``tokens`` tokens: a call without layers renews the round trip; a one-token step renews the seconds
        per layer (its time beyond the round trip, over its layers). Longer steps (a prompt, a replay) are
        not what a chain repeats per token, and measure neither."""
        m = self._measurement(peer_id)
        if layers <= 0:
            m.rtt = _smooth(m.rtt, seconds)
        elif tokens == 1:
            beyond = max(seconds - (m.rtt if m.rtt is not None else 0.0), 0.0)
            m.layer_seconds = _smooth(m.layer_seconds, beyond / layers)

    def measured_pushed(self, peer_id: str, seconds: float, layers: int) -> None:
        """Record a one-token step that ``peer_id`` ran on ``layers`` layers for a server-to-server step, timed
        by this client as the ``seconds`` between the answer of the server before it and its own (it started
        when that one pushed, about when that one answered here). No round trip of its own is in that time,
        so it all counts as layers: a server that is slow on its layers shows it, whatever it announces, in
        the middle of a chain too (else such a server would be judged by its announcement for good)."""
        if layers > 0:
            m = self._measurement(peer_id)
            m.layer_seconds = _smooth(m.layer_seconds, max(seconds, 0.0) / layers)

    def _measurement(self, peer_id: str) -> Measurement:
        """``peer_id``'s measurement to update (a new one past :data:`MEASUREMENT_TTL`), stamped now."""
        now = time.monotonic()
        m = self.measurements.get(peer_id)
        if m is None or now - m.at > MEASUREMENT_TTL:
            if m is None and len(self.measurements) >= MAX_MEASURED:
                del self.measurements[min(self.measurements, key=lambda p: self.measurements[p].at)]
            m = self.measurements[peer_id] = Measurement(at=now)
        m.at = now
        return m

    def current(self) -> dict[str, Measurement]:
        """The measurements not older than :data:`MEASUREMENT_TTL`."""
        now = time.monotonic()
        return {p: m for p, m in self.measurements.items() if now - m.at <= MEASUREMENT_TTL}

    async def chain(self, span: LayerSpan | None = None) -> list[Hop]:
        """The best chain over ``span`` (the whole model by default). A gap is read again from the DHT before it is
        reported: the records in hand may be a read from before a server announced, or one that missed a record
        (on a loaded machine a DHT read came back without the only server of layers 20-30, which was serving)."""
        try:
            return self._chain(await self.servers(), span)
        except CoverageError:
            return self._chain(await self.servers(fresh=True), span)

    def _chain(self, records: list[BlocksRecord], span: LayerSpan | None) -> list[Hop]:
        if span is None:
            if not records:
                raise CoverageError(self.model, [], None)
            span = LayerSpan(0, max(r.num_layers for r in records))
        return shortest_chain(records, self.model, span, self.current())


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
