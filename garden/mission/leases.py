"""Shard leases on the DHT: who samples which shard of a mission, and whose result counts.

A shaker ``claim``s an open shard (a signed lease under ``lease:<shard>`` that expires on its own),
``renew``s it while it works, and ``mark_done``s it with its row count and row-set hash (a signed
record under ``done:<shard>:<peer>:<attempt>``, one per attempt). Records and their checks are
``garden.protocol.shards``; this module reads them from and writes them to a hivemind DHT.

Races are expected, not prevented: a lease is only "whoever the DHT kept", read back after storing,
and two peers can still both sample a shard (a slow peer whose lease expired, a killed peer that comes
back, two claims crossing in flight). They are settled afterwards: ``pick_winner`` chooses exactly one
done record per shard, identically on every peer that sees the same records, and
``ShardBoard.losing_attempts`` names the attempts whose rows must be dropped everywhere.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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
)

logger = logging.getLogger(__name__)

Lease = LeaseRecord
"""What ``claim`` hands out: the signed lease as stored (its ``attempt`` names this try at the shard)."""


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
    """One peer's view of a mission's shards, built from the shards key's DHT value.

    Every entry is decoded and checked (``decode_shard_entry``) and must belong to this mission and
    agree on its shard count; invalid ones are logged, counted in ``invalid_records`` and ignored, so a
    forger can add noise but never change a shard's state.

    :param entries: the DHT dictionary (``{subkey: (value, expiration_time)}``) or None if the key is empty
    :param mission_id: the mission the board is for
    :param shard_count: shards in the mission (``count_shards`` of the signed mission)
    :param now: DHT time that decides which leases are live
    :param created: the mission's creation time, when known: a done record leased before it is dropped
    :param void: subkeys of done records this peer holds void (their row sets were never served): left out
    :param distrusted: producers whose done records finished after a time are left out (producer -> DHT time:
        this peer refuted one of their row sets then)
    :param gone: peers seen leaving the swarm (``PeerDirectory.gone``): their live leases hold nothing, so a
        killed peer's shard is open once its peer record expired, not when its lease ends
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
    ):
        if isinstance(shard_count, bool) or not isinstance(shard_count, int) or shard_count < 1:
            raise ValueError(f"shard_count must be an int >= 1, got {shard_count!r}")
        self.mission_id, self.shard_count, self.now, self.gone = mission_id, shard_count, now, gone
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
        self.shards: list[ShardState] = [self._state(i, leases.get(i), results.get(i, [])) for i in range(shard_count)]

    @classmethod
    def from_found(
        cls, found: ValueWithExpiration[Any] | None, mission_id: str, shard_count: int, now: float, **checks: Any
    ) -> ShardBoard:
        """From what ``DHT.get(key, latest=True)`` returned; ``checks`` are the constructor's ``created``,
        ``void``, ``distrusted`` and ``gone``."""
        board = cls(None, mission_id, shard_count, now)
        if found is None:
            return board
        if not isinstance(found.value, (dict, DictionaryDHTValue)):
            board._drop("<whole key>", f"value is a {type(found.value).__name__}, not a dictionary")
            return board
        return cls(found.value, mission_id, shard_count, now, **checks)

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
            total=self.shard_count,
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

    :param dht: a running hivemind DHT (the daemon's ``GardenDHT``)
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
        """The mission's shards as the DHT has them now (latest value of every subkey)."""
        now = get_dht_time() if now is None else now
        found = await self._dht_call(
            "read", self.dht.get(self.keys.mission_shards(mission_id), latest=True, return_future=True)
        )
        return ShardBoard.from_found(
            found, mission_id, shard_count, now, created=self._created.get(mission_id),
            void=self.voided(mission_id), distrusted=self._distrusted.get(mission_id), gone=self._gone(),
        )  # fmt: skip

    async def claim(self, mission_id: str, shard_count: int, now: float | None = None) -> Lease | None:
        """Lease a random open shard (random, so that peers starting together spread out).

        Stores the lease, reads the shard back, and returns the lease only if the DHT kept this one;
        tries ``claim_tries`` shards, then returns None. None also when no shard is open (all leased or
        done: ``fetch(...).all_done`` tells which). The read-back narrows but cannot close the race
        between two claims in flight; their done records are settled by ``pick_winner``.
        """
        tried: set[int] = set()
        for _ in range(self.config.claim_tries):
            start = get_dht_time() if now is None else now
            board = await self.fetch(mission_id, shard_count, start)
            candidates = [i for i in board.open_shards() if i not in tried]
            if not candidates:
                return None
            shard = self._rng.choice(candidates)
            tried.add(shard)
            expires = start + self.config.lease_duration
            previous = board.shards[shard].lease
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
            after = await self.fetch(mission_id, shard_count)
            state = after.shards[shard]
            if state.status is ShardStatus.LEASED and state.lease is not None and state.lease.attempt == lease.attempt:
                logger.info("leased shard %d of mission %s until %.0f", shard, mission_id[:12], lease.expires)
                self._latest[lease.attempt] = lease
                return lease
            if not stored:
                logger.info("lease of shard %d of mission %s not stored: %s", shard, mission_id[:12], failure)
                continue
            logger.info("lost the race for shard %d of mission %s", shard, mission_id[:12])
        return None

    async def renew(self, lease: Lease, now: float | None = None) -> Lease:
        """Extend the lease by ``lease_duration`` from now. Raises ``LeaseLostError`` if another attempt
        holds the shard or any attempt finished it (stop sampling: the work would not count), and
        ``ShardDHTError`` if the DHT did not answer (keep working and retry: the lease may still hold)."""
        self._check_mine(lease)
        now = get_dht_time() if now is None else now
        state = (await self.fetch(lease.mission_id, lease.shard_count, now)).shards[lease.shard]
        if state.winner is not None:
            raise LeaseLostError(f"shard {lease.shard} was finished by {state.winner.peer_id} ({state.winner.attempt})")
        current = state.lease
        if current is not None and current.attempt != lease.attempt and current.active(now):
            raise LeaseLostError(f"shard {lease.shard} is leased by {current.peer_id} ({current.attempt}) now")
        floor = current.expires + RELEASE_MARGIN if current is not None else 0.0
        expires = max(now + self.config.lease_duration, floor)
        renewed = LeaseRecord.model_validate(lease.model_dump() | {"renewed": now, "expires": expires})
        if not await self._store(renewed, renewed.expires):
            # no node took it: a newer lease, or no node answered (a peer that just joined may not reach
            # the key's nodes yet). Only another attempt's lease means the work is lost; while the stored
            # lease is still this one, keep working and retry (giving up would leave the shard leased to
            # nobody until the lease expires)
            after = (await self.fetch(lease.mission_id, lease.shard_count)).shards[lease.shard]
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
        state = (await self.fetch(lease.mission_id, lease.shard_count)).shards[lease.shard]
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
        shard. Raises ``ShardDHTError`` if the DHT did not take it (retry: the record is idempotent per
        attempt) and ``ValueError`` for bad arguments."""
        self._check_mine(lease)
        held = self._latest.get(lease.attempt, lease)
        if held.renewed < lease.renewed:
            held = lease
        finished = get_dht_time() if now is None else now
        if finished > held.expires + MAX_CLOCK_SKEW:
            raise LeaseLostError(f"the lease of shard {lease.shard} ended {finished - held.expires:.0f} s ago")
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
        key = self.keys.mission_shards(done.mission_id)
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
        key = self.keys.mission_shards(record.mission_id)
        future = self.dht.store(
            key, record.to_wire(self._private_key), expiration_time, subkey=record.subkey, return_future=True
        )
        return bool(await self._dht_call("write", future))

    async def _dht_call(self, op: str, future: Any) -> Any:
        try:
            return await asyncio.wait_for(future, timeout=self.config.dht_timeout)
        except TimeoutError:
            raise ShardDHTError(f"DHT {op} timed out after {self.config.dht_timeout:.1f} s") from None
        except Exception as e:  # a dead DHT process (BrokenPipeError) or a failed search
            raise ShardDHTError(f"DHT {op} failed: {str(e)[:200]}") from e
