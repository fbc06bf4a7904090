"""Shard leases on the DHT: who samples which shard of a mission, and whose result counts.

A shaker ``claim``s an open shard (a signed lease under ``lease:<shard>`` that expires on its own),
``renew``s it while it works, and ``mark_done``s it with its row count and row-set hash (a signed
record under ``done:<shard>:<peer>:<attempt>``, one per attempt). Records and their checks are
``garden.protocol.shards``; this module reads them from and writes them to a hivemind DHT.

The records live in segments of ``SEGMENT_SHARDS`` shards, a DHT key each. A claim, a renewal and a done
record read only their shard's segment, so their cost does not grow with the mission; ``fetch`` (a view of
the whole mission: progress, winners, verification) reads every segment at once.

Races are expected, not prevented: a lease is only "whoever the DHT kept", read back after storing,
and two peers can still both sample a shard (a slow peer whose lease expired, a killed peer that comes
back, two claims crossing in flight). The one whose lease the DHT did not keep learns it at its next
renewal or, at the latest, from ``mark_done``, which publishes nothing over another attempt's live lease
or result. What still gets through (done records crossing in flight, a healed partition) is settled
afterwards: ``pick_winner`` chooses exactly one done record per shard, identically on every peer that sees
the same records, and ``ShardBoard.losing_attempts`` names the attempts whose rows must be dropped everywhere.

Why the DHT is used directly (``hivemind.DHT``, not ``garden.net.swarm.Swarm``): ``Swarm.get`` turns
a timeout into ``None``, which here would read as "no leases, every shard open" and make every peer
pile onto shard 0. Lease calls raise :class:`ShardDHTError` instead, and the caller retries.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import hivemind
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from garden.protocol import signing
from garden.protocol.keys import DHTKeys
from garden.protocol.records import MAX_CLOCK_SKEW, RecordError
from garden.protocol.shards import (
    MAX_LEASE_SECONDS,
    MAX_DONE_TTL,
    RELEASE_MARGIN,
    MAX_REASON,
    DoneRecord,
    LeaseRecord,
    RefutationRecord,
    decode_shard_entry,
    pick_winner,
    segment_count,
    segment_of,
    segment_span,
)

logger = logging.getLogger(__name__)

Lease = LeaseRecord
"""What ``claim`` hands out: the signed lease as stored (its ``attempt`` names this try at the shard)."""

SEGMENT_READS = 16
"""Segment keys ``fetch`` reads at once: a mission of 10,000 shards has 313, read 16 at a time."""


# --- reading: the board -------------------------------------------------------------------------------


class ShardStatus(enum.Enum):
    OPEN = "open"  # no done record and no live lease: anyone may claim it
    LEASED = "leased"  # a live lease, no done record yet: its holder is sampling it
    DONE = "done"  # at least one valid done record; ``ShardState.winner`` is the one that counts


@dataclass(frozen=True)
class ShardState:
    index: int
    status: ShardStatus
    lease: LeaseRecord | None  # the stored lease, live or not (None once it expired out of the DHT)
    results: tuple[DoneRecord, ...]  # every valid done record for this shard, winner first
    winner: DoneRecord | None


@dataclass(frozen=True)
class ShardSummary:
    total: int
    done: int
    leased: int
    open: int


class ShardBoard:
    """One peer's view of a mission's shards (all of them, or one segment's), built from the DHT values of
    their segment keys.

    Every entry is decoded and checked (``decode_shard_entry``) and must belong to this mission and
    agree on its shard count; invalid ones are logged, counted in ``invalid_records`` and ignored, so a
    forger can add noise but never change a shard's state.

    :param entries: the DHT dictionaries' entries (``{subkey: (value, expiration_time)}``) or None if empty
    :param mission_id: the mission the board is for
    :param shard_count: shards in the mission (``count_shards`` of the signed mission)
    :param now: DHT time that decides which leases are live
    :param created: the mission's creation time, when known: a done record leased before it is dropped
    :param void: subkeys of done records this peer holds void (their row sets were never served): left out
    :param distrusted: producers whose done records finished after a time are left out (producer -> DHT time:
        this peer refuted one of their row sets then)
    :param gone: peers seen leaving the swarm (``PeerDirectory.gone``): their live leases hold nothing, so a
        killed peer's shard is open once its peer record expired, not when its lease ends
    :param span: the shards read (one segment's, ``segment_span``); all of them by default. ``shards`` holds
        their states, ``state(i)`` finds one; a record of a shard outside it is dropped as misplaced
    """

    def __init__(
        self,
        entries: Mapping[Any, Any] | DictionaryDHTValue | None,
        mission_id: str,
        shard_count: int,
        now: float,
        created: float | None = None,
        void: frozenset[str] | set[str] = frozenset(),
        distrusted: Mapping[str, float] | None = None,
        gone: frozenset[str] = frozenset(),
        span: range | None = None,
    ):
        if isinstance(shard_count, bool) or not isinstance(shard_count, int) or shard_count < 1:
            raise ValueError(f"shard_count must be an int >= 1, got {shard_count!r}")
        span = range(shard_count) if span is None else span
        if span.step != 1 or not 0 <= span.start < span.stop <= shard_count:
            raise ValueError(f"span {span} is not a run of shards of a mission of {shard_count}")
        self.mission_id, self.shard_count, self.now, self.gone, self.span = mission_id, shard_count, now, gone, span
        self.invalid_records = 0
        leases: dict[int, LeaseRecord] = {}
        results: dict[int, list[DoneRecord]] = {}
        self.refutations: list[RefutationRecord] = []  # valid ones, whoever signed them: a claim to weigh
        self.stored: dict[str, tuple[bytes, float]] = {}  # subkey -> (value as stored, expiration) of valid entries
        for subkey, item in _items(entries):
            if subkey in void:
                continue
            try:
                raw, expiration_time = item
                record = decode_shard_entry(raw, subkey, expiration_time, now)
                if record.mission_id != mission_id or record.shard_count != shard_count:
                    raise RecordError(
                        f"record is for mission {record.mission_id[:12]}.. of {record.shard_count} shards, "
                        f"not {mission_id[:12]}.. of {shard_count}"
                    )
                if record.shard not in span:
                    raise RecordError(f"shard {record.shard} is not in the shards read ({span.start}-{span.stop - 1})")
                if isinstance(record, DoneRecord) and created is not None:
                    record.check_mission(created)
                refuted_at = (distrusted or {}).get(record.peer_id)
                if isinstance(record, DoneRecord) and refuted_at is not None and record.finished > refuted_at:
                    continue  # a producer refuted here: its later results are ignored
            except (RecordError, TypeError, ValueError) as e:
                self._drop(subkey, str(e))
                continue
            self.stored[record.subkey] = (raw, float(expiration_time))
            if isinstance(record, LeaseRecord):
                leases[record.shard] = record
            elif isinstance(record, RefutationRecord):
                self.refutations.append(record)
            else:
                results.setdefault(record.shard, []).append(record)
        self.shards: list[ShardState] = [self._state(i, leases.get(i), results.get(i, [])) for i in span]

    @classmethod
    def from_found(
        cls,
        found: Iterable[ValueWithExpiration[Any] | None],
        mission_id: str,
        shard_count: int,
        now: float,
        span: range | None = None,
        **checks: Any,
    ) -> ShardBoard:
        """From what ``DHT.get(key, latest=True)`` returned for each segment key read (their shards are
        ``span``); ``checks`` are the constructor's ``created``, ``void``, ``distrusted`` and ``gone``."""
        entries: dict[Any, Any] = {}
        not_dictionaries: list[str] = []
        for part in found:
            if part is None:
                continue
            if isinstance(part.value, (dict, DictionaryDHTValue)):
                entries.update(_items(part.value))
            else:
                not_dictionaries.append(type(part.value).__name__)
        board = cls(entries, mission_id, shard_count, now, span=span, **checks)
        for kind in not_dictionaries:
            board._drop("<a whole segment key>", f"value is a {kind}, not a dictionary")
        return board

    def state(self, shard: int) -> ShardState:
        """The state of ``shard``, which must be in the shards read."""
        if shard not in self.span:
            raise IndexError(f"shard {shard} is not in the shards read ({self.span.start}-{self.span.stop - 1})")
        return self.shards[shard - self.span.start]

    def _state(self, index: int, lease: LeaseRecord | None, results: list[DoneRecord]) -> ShardState:
        winner = pick_winner(results)
        ordered = tuple(sorted(results, key=lambda r: r is not winner))  # stable: winner first
        if winner is not None:
            status = ShardStatus.DONE
        elif lease is not None and lease.active(self.now) and lease.peer_id not in self.gone:
            status = ShardStatus.LEASED
        else:
            status = ShardStatus.OPEN
        return ShardState(index, status, lease, ordered, winner)

    def _drop(self, subkey: object, reason: str) -> None:
        self.invalid_records += 1
        logger.info("ignored an invalid shard record under %r: %s", str(subkey)[:80], reason)

    def open_shards(self) -> list[int]:
        return [s.index for s in self.shards if s.status is ShardStatus.OPEN]

    def summary(self) -> ShardSummary:
        count = {status: 0 for status in ShardStatus}
        for s in self.shards:
            count[s.status] += 1
        return ShardSummary(
            total=len(self.shards),
            done=count[ShardStatus.DONE],
            leased=count[ShardStatus.LEASED],
            open=count[ShardStatus.OPEN],
        )

    @property
    def all_done(self) -> bool:
        return all(s.status is ShardStatus.DONE for s in self.shards)

    def winners(self) -> dict[int, DoneRecord]:
        """Shard index -> the done record that counts, for finished shards."""
        return {s.index: s.winner for s in self.shards if s.winner is not None}

    def losing_attempts(self) -> list[DoneRecord]:
        """Done records that lost their shard: their rows must be dropped wherever they are held.
        Sorted by (shard, attempt) so every peer lists them in the same order."""
        losers = [r for s in self.shards for r in s.results if r is not s.winner]
        return sorted(losers, key=lambda r: (r.shard, r.attempt, r.peer_id))


def _check_not_taken(state: ShardState, lease: LeaseRecord, now: float, own_result: bool = False) -> None:
    """Raise ``LeaseLostError`` when the shard is finished (by another attempt than ``lease``'s, with
    ``own_result``: a done record being published again) or another attempt holds a live lease on it."""
    if state.winner is not None and not (own_result and state.winner.attempt == lease.attempt):
        raise LeaseLostError(f"shard {lease.shard} was finished by {state.winner.peer_id} ({state.winner.attempt})")
    current = state.lease
    if current is not None and current.attempt != lease.attempt and current.active(now):
        raise LeaseLostError(f"shard {lease.shard} is leased by {current.peer_id} ({current.attempt}) now")


def _items(entries: Mapping[Any, Any] | DictionaryDHTValue | None) -> list[tuple[Any, Any]]:
    if entries is None:
        return []
    return list(entries.items())


# --- writing: the manager -----------------------------------------------------------------------------


class LeaseError(RuntimeError):
    """Base of the lease bookkeeping errors."""


class ShardDHTError(LeaseError):
    """A DHT read or write failed or timed out; nothing is known about the shards. Retry later."""


class LeaseLostError(LeaseError):
    """The lease is no longer this attempt's: another attempt holds or finished the shard. Stop work."""


@dataclass(frozen=True)
class LeaseConfig:
    """:param lease_duration: seconds a claim lasts unless renewed (default 45 s). Renew every
        ``renew_period`` (a third of it) so that two missed renewals still keep the shard; shorter
        leases hand a dead peer's shard on sooner but cost more DHT writes.
    :param dht_timeout: seconds for one DHT read or write; a claim makes up to 2 per try
    :param done_expiration: seconds a done record is stored for; holders of the rows re-store it
    :param claim_tries: shards ``claim`` tries before giving up when other peers win the races
    """

    lease_duration: float = 45.0
    dht_timeout: float = 10.0
    done_expiration: float = 24 * 3600.0
    claim_tries: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.lease_duration <= MAX_LEASE_SECONDS:
            raise ValueError(f"lease_duration must be in (0, {MAX_LEASE_SECONDS:.0f}] s, got {self.lease_duration}")
        if not self.dht_timeout > 0:
            raise ValueError(f"dht_timeout must be > 0 s, got {self.dht_timeout}")
        if not 0 < self.done_expiration <= MAX_DONE_TTL:
            raise ValueError(f"done_expiration must be in (0, {MAX_DONE_TTL:.0f}] s, got {self.done_expiration}")
        if self.claim_tries < 1:
            raise ValueError(f"claim_tries must be >= 1, got {self.claim_tries}")

    @property
    def renew_period(self) -> float:
        return self.lease_duration / 3


class LeaseManager:
    """Claims, renews, releases and finishes shards for this peer, under its identity key.

    Example (inside the daemon's event loop)::

        manager = LeaseManager(swarm.dht, DHTKeys(swarm_name), identity_key)
        lease = await manager.claim(mission.id, shard_count)
        if lease is not None:
            ...  # sample shard lease.shard, calling ``await manager.renew(lease)`` every renew_period
            await manager.mark_done(lease, rows=len(rows), row_set_sha256=digest)

    :param dht: a running DHT with hivemind's interface (the daemon's ``ThreadDHT``, or a ``hivemind.DHT``)
    :param keys: the swarm's key names
    :param private_key: this peer's identity key; it signs every record, and its peer id is the worker's
    :param config: durations and timeouts
    :param rng: source of the random shard choice (seed it in tests)
    :param gone: the peers seen leaving the swarm (``PeerDirectory.gone``), read at each board
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        keys: DHTKeys,
        private_key: rsa.RSAPrivateKey,
        config: LeaseConfig | None = None,
        rng: random.Random | None = None,
        gone: Callable[[], frozenset[str]] | None = None,
    ):
        self.dht, self.keys, self._private_key = dht, keys, private_key
        self._gone = gone or frozenset
        self.config = config or LeaseConfig()
        self.peer_id = signing.peer_id_of(signing.public_key_der(private_key))
        self._rng = rng or random.Random()
        self._created: dict[str, float] = {}
        self._latest: dict[str, LeaseRecord] = {}  # attempt -> this peer's latest stored lease for it
        self._void: dict[str, set[str]] = {}  # mission id -> subkeys of done records held void here
        self._distrusted: dict[str, dict[str, float]] = {}  # mission id -> producer -> refuted at (DHT time)

    def know(self, mission_id: str, created: float) -> None:
        """The mission's creation time (from its signed record): boards read afterwards drop done records
        leased before it."""
        self._created[mission_id] = created

    def forget(self, mission_id: str) -> None:
        self._created.pop(mission_id, None)
        self._void.pop(mission_id, None)
        self._distrusted.pop(mission_id, None)

    def void(self, done: DoneRecord) -> None:
        """Hold ``done`` void on this peer: boards read afterwards leave it out, so its shard is open again
        unless another attempt finished it (see ``RowSetKeeper.settle``: no peer ever served its rows)."""
        self._void.setdefault(done.mission_id, set()).add(done.subkey)

    def voided(self, mission_id: str) -> frozenset[str]:
        return frozenset(self._void.get(mission_id, ()))

    def distrust(self, mission_id: str, producer: str, since: float) -> None:
        """Ignore ``producer``'s done records of the mission that finished after ``since`` (DHT time)."""
        self._distrusted.setdefault(mission_id, {}).setdefault(producer, since)

    async def fetch(self, mission_id: str, shard_count: int, now: float | None = None) -> ShardBoard:
        """The mission's shards as the DHT has them now (latest value of every subkey of every segment: the
        segments are read at once, and one that does not answer fails the whole read)."""
        return await self._read(mission_id, shard_count, range(segment_count(shard_count)), now)

    async def fetch_segment(
        self, mission_id: str, shard_count: int, segment: int, now: float | None = None
    ) -> ShardBoard:
        """One segment's shards (``segment_span``): what a claim, a renewal or a done record needs."""
        return await self._read(mission_id, shard_count, range(segment, segment + 1), now)

    async def _read(self, mission_id: str, shard_count: int, segments: range, now: float | None) -> ShardBoard:
        now = get_dht_time() if now is None else now
        in_flight = asyncio.Semaphore(SEGMENT_READS)

        async def read(segment: int) -> Any:
            async with in_flight:
                key = self.keys.shard_segment(mission_id, segment)
                return await self._dht_call("read", self.dht.get(key, latest=True, return_future=True))

        found = await asyncio.gather(*(read(s) for s in segments))
        span = range(segment_span(segments.start, shard_count).start, segment_span(segments[-1], shard_count).stop)
        return ShardBoard.from_found(
            found, mission_id, shard_count, now, span=span, created=self._created.get(mission_id),
            void=self.voided(mission_id), distrusted=self._distrusted.get(mission_id), gone=self._gone(),
        )  # fmt: skip

    async def _fetch_shard(self, mission_id: str, shard_count: int, shard: int, now: float | None = None) -> ShardState:
        board = await self.fetch_segment(mission_id, shard_count, segment_of(shard), now)
        return board.state(shard)

    def _segments_to_try(self, shard_count: int, hint: ShardBoard | None) -> list[int]:
        """The mission's segments in random order (so that peers starting together spread over them), those
        where ``hint`` (a recent board of the whole mission) saw an open shard first."""
        segments = list(range(segment_count(shard_count)))
        self._rng.shuffle(segments)
        if hint is not None and hint.span == range(shard_count):
            has_open = {segment_of(i) for i in hint.open_shards()}
            segments.sort(key=lambda s: s not in has_open)  # stable: still random within each group
        return segments

    async def claim(
        self, mission_id: str, shard_count: int, now: float | None = None, hint: ShardBoard | None = None
    ) -> Lease | None:
        """Lease a random open shard of a random segment (random, so that peers starting together spread out).

        Reads one segment at a time (first those where ``hint``, a recent ``fetch`` of the mission, saw open
        shards) until one has an open shard; stores the lease, reads the segment back, and returns the lease
        only if the DHT kept this one. Gives up after ``claim_tries`` lost races (or leases no node took) and
        returns None; None also when no segment has an open shard (all leased or done: ``fetch(...).all_done``
        tells which). The read-back narrows but cannot close the race between two claims in flight: the holder
        checks its lease again before its done record (``mark_done``), and the shaker soon after the claim;
        done records that still cross are settled by ``pick_winner``.
        """
        tried: set[int] = set()
        races = 0
        for segment in self._segments_to_try(shard_count, hint):
            while races < self.config.claim_tries:
                lease = await self._claim_in(mission_id, shard_count, segment, tried, now)
                if lease is None:  # nothing open here
                    break
                if lease is not False:
                    return lease
                races += 1
            else:
                return None
        return None

    async def _claim_in(
        self, mission_id: str, shard_count: int, segment: int, tried: set[int], now: float | None
    ) -> Lease | Literal[False] | None:
        """One try in ``segment``: the lease if this peer holds it now, False if the race (or the store) was
        lost, None if the segment has no open shard not tried yet."""
        start = get_dht_time() if now is None else now
        board = await self.fetch_segment(mission_id, shard_count, segment, start)
        candidates = [i for i in board.open_shards() if i not in tried]
        if not candidates:
            return None
        shard = self._rng.choice(candidates)
        tried.add(shard)
        expires = start + self.config.lease_duration
        previous = board.state(shard).lease
        if previous is not None:
            # a released (or just-expired) lease is only overwritten by one that expires later
            expires = max(expires, previous.expires + RELEASE_MARGIN)
        lease = LeaseRecord(
            mission_id=mission_id, shard=shard, shard_count=shard_count, peer_id=self.peer_id,
            attempt=secrets.token_hex(8), started=start, renewed=start, expires=expires,
        )  # fmt: skip
        try:
            stored = await self._store(lease, lease.expires)
        except ShardDHTError as e:
            stored, failure = False, str(e)
        else:
            failure = "no DHT node took it"
        # read back even when the store looked failed: a lease some node kept after all, that nobody
        # works on, would hold the shard until it expires
        state = await self._fetch_shard(mission_id, shard_count, shard)
        if state.status is ShardStatus.LEASED and state.lease is not None and state.lease.attempt == lease.attempt:
            logger.info("leased shard %d of mission %s until %.0f", shard, mission_id[:12], lease.expires)
            self._latest[lease.attempt] = lease
            return lease
        if not stored:
            logger.info("lease of shard %d of mission %s not stored: %s", shard, mission_id[:12], failure)
        else:
            logger.info("lost the race for shard %d of mission %s", shard, mission_id[:12])
        return False

    async def renew(self, lease: Lease, now: float | None = None) -> Lease:
        """Extend the lease by ``lease_duration`` from now. Raises ``LeaseLostError`` if another attempt
        holds the shard or any attempt finished it (stop sampling: the work would not count), and
        ``ShardDHTError`` if the DHT did not answer (keep working and retry: the lease may still hold)."""
        self._check_mine(lease)
        now = get_dht_time() if now is None else now
        state = await self._fetch_shard(lease.mission_id, lease.shard_count, lease.shard, now)
        _check_not_taken(state, lease, now)
        current = state.lease
        floor = current.expires + RELEASE_MARGIN if current is not None else 0.0
        expires = max(now + self.config.lease_duration, floor)
        renewed = LeaseRecord.model_validate(lease.model_dump() | {"renewed": now, "expires": expires})
        if not await self._store(renewed, renewed.expires):
            # no node took it: a newer lease, or no node answered (a peer that just joined may not reach
            # the key's nodes yet). Only another attempt's lease means the work is lost; while the stored
            # lease is still this one, keep working and retry (giving up would leave the shard leased to
            # nobody until the lease expires)
            after = await self._fetch_shard(lease.mission_id, lease.shard_count, lease.shard)
            held = after.lease
            if after.winner is None and held is not None and held.attempt == lease.attempt and held.active(now):
                raise ShardDHTError(f"the DHT did not take the renewal of shard {lease.shard}; its lease still holds")
            raise LeaseLostError(f"the DHT refused the renewal of shard {lease.shard}: it holds a newer lease")
        self._latest[lease.attempt] = renewed
        return renewed

    async def release(self, lease: Lease) -> bool:
        """Give the shard up before the lease ends (e.g. on shutdown), so others need not wait for the
        expiry. A release marker is a lease flagged ``released`` expiring just after the lease: hivemind
        has no delete, and only a later-expiring value overwrites a subkey. True if stored; False if
        the lease is not the stored one any more (nothing to release)."""
        self._check_mine(lease)
        self._latest.pop(lease.attempt, None)
        state = await self._fetch_shard(lease.mission_id, lease.shard_count, lease.shard)
        if state.lease is None or state.lease.attempt != lease.attempt or state.lease.released:
            return False
        marker = LeaseRecord.model_validate(
            state.lease.model_dump() | {"released": True, "expires": state.lease.expires + RELEASE_MARGIN}
        )
        return await self._store(marker, marker.expires)

    async def mark_done(
        self,
        lease: Lease,
        rows: int,
        row_set_sha256: str,
        now: float | None = None,
        teachers: Mapping[str, int] | None = None,
    ) -> DoneRecord:
        """Publish this attempt's result, with the attempt's latest lease (the claim, or the last renewal this
        manager stored). It counts only if finished while that lease held (see ``garden.protocol.shards``):
        a lease that ended (renewals failed) raises ``LeaseLostError``; another attempt may then finish the
        shard. So does a shard that another attempt finished or holds a live lease on now (two claims that
        crossed in flight): the other attempt's result is the one to count, and a second would be work done
        twice. Raises ``ShardDHTError`` if the DHT did not answer or take it (retry: the record is idempotent per
        attempt) and ``ValueError`` for bad arguments."""
        self._check_mine(lease)
        held = self._latest.get(lease.attempt, lease)
        if held.renewed < lease.renewed:
            held = lease
        finished = get_dht_time() if now is None else now
        if finished > held.expires + MAX_CLOCK_SKEW:
            raise LeaseLostError(f"the lease of shard {lease.shard} ended {finished - held.expires:.0f} s ago")
        state = await self._fetch_shard(lease.mission_id, lease.shard_count, lease.shard)
        _check_not_taken(state, lease, finished, own_result=True)
        done = DoneRecord(
            mission_id=lease.mission_id, shard=lease.shard, shard_count=lease.shard_count, peer_id=self.peer_id,
            attempt=lease.attempt, rows=rows, row_set_sha256=row_set_sha256, finished=max(finished, held.started),
            teachers=dict(teachers or {}), lease=held.to_wire(self._private_key),
        )  # fmt: skip
        if not await self._store(done, finished + self.config.done_expiration):
            raise ShardDHTError(f"no DHT peer stored the done record of shard {lease.shard}")
        self._latest.pop(lease.attempt, None)
        logger.info("shard %d of mission %s done: %d rows", lease.shard, lease.mission_id[:12], rows)
        return done

    async def keep_alive(self, board: ShardBoard, done: DoneRecord) -> bool:
        """Re-store a done record (the producer's signed bytes, unchanged) for another ``done_expiration``
        once less than half of it is left. Any peer may: the signature is the producer's. True if stored."""
        stored = board.stored.get(done.subkey)
        if stored is None:
            return False
        raw, expiration = stored
        now = get_dht_time()
        if expiration - now > self.config.done_expiration / 2:
            return False
        key = self.keys.shard_segment(done.mission_id, segment_of(done.shard))
        future = self.dht.store(key, raw, now + self.config.done_expiration, subkey=done.subkey, return_future=True)
        return bool(await self._dht_call("write", future))

    async def refute(self, done: DoneRecord, row: int, reason: str) -> RefutationRecord:
        """Publish, signed, that row ``row`` of ``done``'s row set failed this peer's check (``reason``), so
        that peers who trust this one, or who can check the row themselves, learn of it. Kept as long as a
        done record may be; raises ``ShardDHTError`` when no DHT peer stored it."""
        record = RefutationRecord(
            mission_id=done.mission_id, shard=done.shard, shard_count=done.shard_count, peer_id=self.peer_id,
            attempt=done.attempt, producer=done.peer_id, row_set_sha256=done.row_set_sha256, row=row,
            reason=reason[:MAX_REASON], at=get_dht_time(),
        )  # fmt: skip
        if not await self._store(record, record.at + MAX_DONE_TTL):
            raise ShardDHTError(f"no DHT peer stored the refutation of shard {done.shard}")
        return record

    def _check_mine(self, lease: Lease) -> None:
        if lease.peer_id != self.peer_id:
            raise ValueError(f"lease belongs to {lease.peer_id}, this peer is {self.peer_id}")

    async def _store(self, record: LeaseRecord | DoneRecord | RefutationRecord, expiration_time: float) -> bool:
        key = self.keys.shard_segment(record.mission_id, segment_of(record.shard))
        future = self.dht.store(
            key, record.to_wire(self._private_key), expiration_time, subkey=record.subkey, return_future=True
        )
        return bool(await self._dht_call("write", future))

    async def _dht_call(self, op: str, future: Any) -> Any:
        try:
            return await asyncio.wait_for(future, timeout=self.config.dht_timeout)
        except TimeoutError:
            raise ShardDHTError(f"DHT {op} timed out after {self.config.dht_timeout:.1f} s") from None
        except Exception as e:  # a stopped DHT node or a failed search
            raise ShardDHTError(f"DHT {op} failed: {str(e)[:200]}") from e
