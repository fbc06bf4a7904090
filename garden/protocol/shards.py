"""Shard bookkeeping records under ``<swarm>/m/<mission id>/shards`` (docs/architecture.md, "DHT keys").

A mission's shards are kept in segments of :data:`SEGMENT_SHARDS`: shard S's records live under the key of
segment ``S // SEGMENT_SHARDS`` (:meth:`garden.protocol.keys.DHTKeys.shard_segment`; segment 0 is the
mission's shards key itself, so a mission of up to 32 shards has one key, as before segments). A claim,
renewal or done record reads one segment, a few dozen records, whatever the mission's size; only a view of
the whole mission reads them all. Three signed records share each segment's dictionary key:

* ``lease:<shard>`` holds a :class:`LeaseRecord`: "peer P works on shard S (attempt A) until T". Its DHT
  expiration time *is* ``expires``: hivemind keeps, per subkey, the value with the latest expiration, so
  a renewal overwrites the lease and a lease nobody renews vanishes on its own.
* ``done:<shard>:<peer id>:<attempt>`` holds a :class:`DoneRecord`: "attempt A of peer P sampled shard
  S into N rows whose row set hashes to H". One subkey per attempt, so a late finisher never overwrites
  an earlier one; :func:`pick_winner` chooses among them. It carries P's own lease for attempt A, as P
  signed it (the claim or its latest renewal), and counts only when it was finished while that lease held
  (``started <= finished <= expires``, with :data:`MAX_CLOCK_SKEW` of allowance); a reader that knows the
  mission also refuses a lease older than the mission (:meth:`DoneRecord.check_mission`). A backdated
  record (``finished = 0``) is refused. What this does not stop: a peer can sign a lease it never stored,
  so a done record is a claim, checked later by verification, not a proof of work.
* ``refuted:<shard>:<producer>:<attempt>:<refuter>`` holds a :class:`RefutationRecord`: "peer R recomputed
  row N of that attempt's row set (hash H) with the teacher and it does not hold: why". A claim like any
  other: readers obey it when R is someone they trust (the mission's lead, ``--trust-lead``), and a peer
  that holds the teacher re-checks the named row itself (``garden.mission.verification``).

Both are sealed with the worker's identity key (``garden.protocol.records.seal``) and carry that
worker's peer id, so no peer can lease, release or finish a shard in another peer's name. The subkey
is derived from the content and checked on decode, as peer records are.

This module is pure protocol (no hivemind import: that costs torch's ~3 s import); the hivemind
validator that applies these checks inside the DHT lives in ``garden.mission.leases``.
"""

from __future__ import annotations

import functools
import re
from abc import abstractmethod
from collections.abc import Iterable
from typing import Annotated, Any, Self

import msgpack
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import Field, StringConstraints, model_validator

from garden.protocol.mission import MissionId
from garden.protocol.records import (
    MAX_CLOCK_SKEW,
    OPENED_CACHE,
    RecordError,
    StrictRecord,
    decode_record,
    open_sealed,
    seal,
)

SHARD_RECORD_VERSION = 1
"""Version of the lease and done bodies (``v``); fields may be added, bump on an incompatible change."""
MAX_SHARD_RECORD_BYTES = 4 * 1024
"""Cap on a sealed lease/done record: ~0.3 KiB body + DER key (~0.3 KiB for RSA-2048, ~0.55 KiB for
4096) + signature (0.25/0.5 KiB) + envelope. Anything bigger is garbage or an attack."""
MAX_SHARDS = 1_000_000
"""Most shards in one mission (a mission holds at most 1,000,000 prompts, at least one per shard)."""
MAX_LEASE_SECONDS = 3600.0
"""Longest lease a record may claim. A longer one would let a vanished peer block a shard for hours."""
MAX_DONE_TTL = 7 * 24 * 3600.0
"""Longest a done record may be stored for in one go (holders re-store it to keep it alive longer)."""
MAX_ROWS_PER_SHARD = 1_000_000
RELEASE_MARGIN = 1e-3
"""Seconds a release marker outlives the lease it ends: hivemind only overwrites a subkey's value with
one that expires strictly later, so the marker must expire after the lease it replaces."""

SEGMENT_SHARDS = 32
"""Shards per segment key. A claim reads (twice) and checks every record of one segment, so a segment's size
is what a claim costs; at 32, a segment of leases and done records is ~40 KB."""

_ATTEMPT_PATTERN = r"^[0-9a-f]{16}$"
_SHA256_PATTERN = r"^[0-9a-f]{64}$"
AttemptId = Annotated[str, StringConstraints(pattern=_ATTEMPT_PATTERN)]
"""16 lowercase hex digits, random and new for every claim (``secrets.token_hex(8)``)."""
Sha256Hex = Annotated[str, StringConstraints(pattern=_SHA256_PATTERN)]
PeerId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")]
"""A base58 libp2p peer id (base58 has no ``:``, so it can sit inside a ``done:`` subkey)."""

_LEASE_SUBKEY = re.compile(r"^lease:(0|[1-9][0-9]{0,6})$")
LEASE_PREFIX = "lease:"
DONE_PREFIX = "done:"
REFUTED_PREFIX = "refuted:"
MAX_REASON = 200
"""Characters of a refutation's reason: enough for a verifier's message, no room for a payload."""


class _ShardRecord(StrictRecord):
    v: int = Field(default=SHARD_RECORD_VERSION, ge=1)
    mission_id: MissionId
    shard: int = Field(ge=0, lt=MAX_SHARDS)
    shard_count: int = Field(ge=1, le=MAX_SHARDS, description="shards in the mission, so range checks need no mission")
    peer_id: PeerId
    attempt: AttemptId

    @model_validator(mode="after")
    def _shard_in_range(self) -> Self:
        if self.shard >= self.shard_count:
            raise ValueError(f"shard {self.shard} is out of range for a mission of {self.shard_count} shards")
        return self

    @property
    @abstractmethod
    def subkey(self) -> str:
        """The subkey this record belongs under (derived from content, checked on decode)."""

    def to_wire(self, private_key: rsa.RSAPrivateKey) -> bytes:
        """msgpack body sealed with the worker's identity key (which must be ``peer_id``'s key)."""
        return seal(msgpack.packb(self.model_dump(mode="python"), use_bin_type=True), private_key)

    @classmethod
    def from_wire(cls, raw: Any, subkey: Any) -> Self:
        """Decode and verify a value read under the shards key; raises ``RecordError`` with the reason.

        Checks size, signature, schema, that the signer is the record's ``peer_id`` and that the
        subkey is the one this record belongs under (so a valid record cannot be replayed as another
        shard's lease)."""
        if not isinstance(subkey, str):
            raise RecordError(f"subkey is {type(subkey).__name__}, not a string")
        body, signer = open_sealed(raw, max_bytes=MAX_SHARD_RECORD_BYTES)
        record = decode_record(cls, body, "body")
        if signer != record.peer_id:
            raise RecordError(f"signed by {signer}, names peer {record.peer_id}")
        if record.subkey != subkey:
            raise RecordError(f"stored under {subkey[:80]!r}, belongs under {record.subkey!r}")
        return record


class LeaseRecord(_ShardRecord):
    """A worker's claim on one shard until ``expires`` (DHT time), or its release of that claim."""

    started: float = Field(ge=0.0, description="DHT time of the claim; renewals keep it")
    renewed: float = Field(ge=0.0, description="DHT time of the claim or of its latest renewal")
    expires: float = Field(ge=0.0, description="DHT time the lease ends; also its DHT expiration time")
    released: bool = Field(default=False, description="the worker gave the shard up: it is open again")

    @model_validator(mode="after")
    def _sane_duration(self) -> Self:
        if self.renewed < self.started:
            raise ValueError("lease renewed before it started")
        if not self.renewed < self.expires <= self.renewed + MAX_LEASE_SECONDS + RELEASE_MARGIN:
            raise ValueError(f"lease must end 0-{MAX_LEASE_SECONDS:.0f} s after its last renewal")
        return self

    @property
    def subkey(self) -> str:
        return lease_subkey(self.shard)

    def active(self, now: float) -> bool:
        """Does this record keep others off the shard at ``now``?"""
        return not self.released and self.expires > now

    def check_times(self, expiration_time: float, now: float) -> None:
        """The DHT expiration must be the lease's own end (else a renewal could not overwrite it, or a
        dead lease would linger), and a lease cannot be renewed in the future."""
        if self.renewed > now + MAX_CLOCK_SKEW:
            raise RecordError(f"lease renewed {self.renewed - now:.0f} s in the future")
        if abs(expiration_time - self.expires) > RELEASE_MARGIN / 2:
            raise RecordError(f"stored to expire at {expiration_time:.3f}, but the lease ends at {self.expires:.3f}")


class DoneRecord(_ShardRecord):
    """An attempt's result: the shard was sampled into ``rows`` rows whose row set hashes to
    ``row_set_sha256``; the rows themselves live in the workers' stores and replicas. ``lease`` is the
    producer's sealed lease for this attempt (see the module docstring)."""

    rows: int = Field(ge=0, le=MAX_ROWS_PER_SHARD)
    row_set_sha256: Sha256Hex
    finished: float = Field(ge=0.0, description="DHT time the worker finished the shard")
    teachers: dict[Annotated[str, StringConstraints(min_length=1, max_length=512)], Annotated[int, Field(ge=0)]] = (
        Field(default_factory=dict, max_length=8, description="rows per teacher reference (multi-teacher fallback)")
    )
    lease: bytes = Field(max_length=MAX_SHARD_RECORD_BYTES // 2, description="the producer's sealed lease")

    @model_validator(mode="after")
    def _finished_under_its_lease(self) -> Self:
        held = self.held_lease()
        mine = (held.mission_id, held.shard, held.shard_count, held.peer_id, held.attempt)
        if mine != (self.mission_id, self.shard, self.shard_count, self.peer_id, self.attempt):
            raise ValueError("its lease is not this attempt's (another mission, shard, peer or attempt)")
        if not held.started <= self.finished <= held.expires + MAX_CLOCK_SKEW:
            raise ValueError(
                f"finished at {self.finished:.0f}, outside its lease ({held.started:.0f} to {held.expires:.0f})"
            )
        return self

    def held_lease(self) -> LeaseRecord:
        """The lease this attempt was done under, decoded and checked (its signer is its ``peer_id``)."""
        try:
            return LeaseRecord.from_wire(self.lease, lease_subkey(self.shard))
        except RecordError as e:
            raise ValueError(f"its lease: {e}") from None

    def check_mission(self, created: float) -> None:
        """A shard cannot be leased before its mission was created (``created``: the signed mission's time)."""
        started = self.held_lease().started
        if started < created - MAX_CLOCK_SKEW:
            raise RecordError(f"leased at {started:.0f}, before the mission was created ({created:.0f})")

    @property
    def subkey(self) -> str:
        return done_subkey(self.shard, self.peer_id, self.attempt)

    def check_times(self, expiration_time: float, now: float) -> None:
        """A result cannot be finished in the future, nor stored for longer than ``MAX_DONE_TTL``:
        a backdated ``finished`` would win :func:`pick_winner` against honest peers."""
        if self.finished > now + MAX_CLOCK_SKEW:
            raise RecordError(f"finished {self.finished - now:.0f} s in the future")
        if expiration_time > now + MAX_DONE_TTL + MAX_CLOCK_SKEW:
            raise RecordError(f"stored for {expiration_time - now:.0f} s, over {MAX_DONE_TTL:.0f}")


class RefutationRecord(_ShardRecord):
    """A verifier's finding that a row set does not hold: ``peer_id`` (the verifier, who signs) recomputed row
    ``row`` of the row set ``row_set_sha256`` that ``producer`` sampled for ``shard`` as attempt ``attempt``,
    and it failed for ``reason``. Anyone with the teacher can recompute that one row to see who is right."""

    producer: PeerId
    row_set_sha256: Sha256Hex
    row: int = Field(ge=0, lt=MAX_ROWS_PER_SHARD, description="position of a failing row in the row set")
    reason: str = Field(max_length=MAX_REASON)
    at: float = Field(ge=0.0, description="DHT time of the finding")

    @property
    def subkey(self) -> str:
        return refuted_subkey(self.shard, self.producer, self.attempt, self.peer_id)

    def names(self, done: DoneRecord) -> bool:
        """Whether this refutes ``done`` (the same shard, attempt, producer and row set)."""
        return (self.shard, self.attempt, self.producer, self.row_set_sha256) == (
            done.shard, done.attempt, done.peer_id, done.row_set_sha256,
        )  # fmt: skip

    def check_times(self, expiration_time: float, now: float) -> None:
        if self.at > now + MAX_CLOCK_SKEW:
            raise RecordError(f"made {self.at - now:.0f} s in the future")
        if expiration_time > now + MAX_DONE_TTL + MAX_CLOCK_SKEW:
            raise RecordError(f"stored for {expiration_time - now:.0f} s, over {MAX_DONE_TTL:.0f}")


def segment_of(shard: int) -> int:
    """The segment whose key holds ``shard``'s records."""
    return shard // SEGMENT_SHARDS


def segment_count(shard_count: int) -> int:
    return -(-shard_count // SEGMENT_SHARDS)


def segment_span(segment: int, shard_count: int) -> range:
    """The shards of ``segment`` in a mission of ``shard_count`` shards (the last segment may be short)."""
    if not 0 <= segment < segment_count(shard_count):
        raise ValueError(f"segment {segment} is outside a mission of {shard_count} shards")
    return range(segment * SEGMENT_SHARDS, min((segment + 1) * SEGMENT_SHARDS, shard_count))


def lease_subkey(shard: int) -> str:
    return f"{LEASE_PREFIX}{shard}"


def done_subkey(shard: int, peer_id: str, attempt: str) -> str:
    return f"{DONE_PREFIX}{shard}:{peer_id}:{attempt}"


def refuted_subkey(shard: int, producer: str, attempt: str, refuter: str) -> str:
    return f"{REFUTED_PREFIX}{shard}:{producer}:{attempt}:{refuter}"


def is_shard_subkey(subkey: object) -> bool:
    """Does this subkey claim to be a lease, done or refutation entry (and so must pass their checks)?"""
    return isinstance(subkey, str) and subkey.startswith((LEASE_PREFIX, DONE_PREFIX, REFUTED_PREFIX))


ShardEntry = LeaseRecord | DoneRecord | RefutationRecord


def decode_shard_entry(raw: Any, subkey: Any, expiration_time: float, now: float) -> ShardEntry:
    """One entry of the shards dictionary, fully checked; raises ``RecordError`` (never anything else)."""
    if not isinstance(subkey, str):
        raise RecordError(f"subkey is {type(subkey).__name__}, not a string")
    if isinstance(expiration_time, bool) or not isinstance(expiration_time, (int, float)):
        raise RecordError(f"expiration time is {type(expiration_time).__name__}")
    record = _opened(raw, subkey) if isinstance(raw, bytes) else _open(raw, subkey)
    record.check_times(float(expiration_time), now)
    return record


def _open(raw: Any, subkey: str) -> ShardEntry:
    if _LEASE_SUBKEY.match(subkey):
        return LeaseRecord.from_wire(raw, subkey)
    if subkey.startswith(DONE_PREFIX):
        return DoneRecord.from_wire(raw, subkey)
    if subkey.startswith(REFUTED_PREFIX):
        return RefutationRecord.from_wire(raw, subkey)
    raise RecordError(f"unknown subkey {subkey[:80]!r}")


_opened = functools.lru_cache(maxsize=OPENED_CACHE)(_open)
"""Entries decoded and checked before, by their bytes and subkey (records are frozen; the times, which depend on
the DHT expiration and the clock, are checked on every read): see ``OPENED_CACHE``."""


def pick_winner(records: Iterable[DoneRecord]) -> DoneRecord | None:
    """The one attempt that counts for a shard: earliest ``finished``, ties by attempt id, then peer id.

    Pure and total, so every peer that sees the same set picks the same record. Why earliest finish
    rather than, say, the smallest row-set hash: the winner stays the winner when a *later* result shows
    up (the usual race: a slow peer whose lease expired finishes after the one that took over), so
    rows are not dropped and then restored. It can still change if a result that finished *earlier*
    reaches a peer late (a healed partition); callers must treat losing rows as droppable only after
    the winner's rows are replicated, and the drop must be idempotent.
    ``finished`` is self-reported: a peer can backdate its own record (a future date is refused on
    decode), which makes it win a race it took part in; it cannot finish a shard in another peer's name.
    """
    return min(records, key=lambda r: (r.finished, r.attempt, r.peer_id), default=None)
