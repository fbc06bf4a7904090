"""Row sets: the rows one attempt sampled for one shard, as they travel between peers, and the signed
announcement of which row sets a peer holds (``<swarm>/m/<mission id>/rows``, docs/architecture.md "DHT keys").

A row set's bytes are a msgpack array of its rows' canonical encodings (``DorpoRow.to_msgpack``), in the
shard's prompt order. Its sha256 is what the done record names (``DoneRecord.row_set_sha256``), so a peer
that fetches a row set from a stranger checks it against a record the producer signed, and the bytes are
rebuilt exactly from the stored rows on any peer that holds them.

An announcement lives under the subkey ``rows:<peer id>`` (not the bare peer id) so that the DHT's
validator, which sees only key hashes, can tell it apart from other entries and check it; it is sealed with
the announcing peer's key, so nobody can claim that another peer holds (or does not hold) rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Self

import msgpack
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import Field, model_validator

from garden.protocol.mission import MissionId
from garden.protocol.records import RecordError, StrictRecord, decode_record, open_sealed, seal
from garden.protocol.rows import DorpoRow
from garden.protocol.shards import MAX_ROWS_PER_SHARD, MAX_SHARDS, AttemptId, PeerId, Sha256Hex

ROWS_RECORD_VERSION = 1
MAX_ROW_SET_BYTES = 64 * 1024 * 1024
"""Cap on one row set on the wire: a shard of 64 prompts with 64-token answers at k = 20 is ~0.4 MiB;
the cap leaves room for big shards and long answers while bounding what a stranger can make us buffer."""
MAX_HELD_PER_ANNOUNCEMENT = 320
"""Row sets one announcement may list (~150 bytes each, so ~48 KiB: DHT values should stay small). A peer
holding more of one mission lists the winning ones first (see ``garden.mission.book``)."""
MAX_ROWS_RECORD_BYTES = 64 * 1024
ROWS_PREFIX = "rows:"


# --- row-set bytes -----------------------------------------------------------------------------------


def pack_row_set(rows: Sequence[DorpoRow]) -> bytes:
    """The canonical bytes of a row set (what is hashed, served and fetched)."""
    packed: bytes = msgpack.packb([row.to_msgpack() for row in rows], use_bin_type=True)
    return packed


def pack_encoded_rows(bodies: Sequence[bytes]) -> bytes:
    """:func:`pack_row_set` from rows already encoded (as the store keeps them): no decode, same bytes."""
    packed: bytes = msgpack.packb(list(bodies), use_bin_type=True)
    return packed


def row_set_sha256(packed: bytes) -> str:
    return hashlib.sha256(packed).hexdigest()


def unpack_row_set(raw: Any, max_bytes: int = MAX_ROW_SET_BYTES, max_rows: int = MAX_ROWS_PER_SHARD) -> list[DorpoRow]:
    """Decode a row set from a stranger; raises only ``RecordError``. Every row is decoded strictly (its
    arrays checked), and must re-encode to the very bytes received: a row set that hashes right but holds
    non-canonical rows would make peers disagree on row ids."""
    if not isinstance(raw, bytes):
        raise RecordError(f"row set is {type(raw).__name__}, not bytes")
    if len(raw) > max_bytes:
        raise RecordError(f"row set is {len(raw)} bytes, over the {max_bytes}-byte cap")
    try:
        bodies = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_array_len=max_rows)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise RecordError(f"row set is not msgpack: {str(e)[:200]}") from None
    if not isinstance(bodies, list) or not all(isinstance(b, bytes) for b in bodies):
        raise RecordError("row set is not a list of encoded rows")
    rows = []
    for i, body in enumerate(bodies):
        try:
            row = DorpoRow.from_msgpack(body, max_bytes=len(body))
        except RecordError as e:
            raise RecordError(f"row {i}: {e}") from None
        if row.to_msgpack() != body:
            raise RecordError(f"row {i} is not canonically encoded")
        rows.append(row)
    return rows


# --- who holds what: the announcement -----------------------------------------------------------------


class HeldRowSet(StrictRecord):
    """One row set a peer holds: attempt ``attempt`` of ``producer`` at shard ``shard``."""

    shard: int = Field(ge=0, lt=MAX_SHARDS)
    attempt: AttemptId
    producer: PeerId
    sha256: Sha256Hex
    rows: int = Field(ge=0, le=MAX_ROWS_PER_SHARD)


class RowsAnnouncement(StrictRecord):
    """What one peer holds of one mission: its prompts (``has_prompts``) and row sets. Peers fetch prompts
    and rows from the peers that announce them; a row set announced by two peers is replicated."""

    v: int = Field(default=ROWS_RECORD_VERSION, ge=1)
    mission_id: MissionId
    peer_id: PeerId
    has_prompts: bool
    row_sets: list[HeldRowSet] = Field(default_factory=list, max_length=MAX_HELD_PER_ANNOUNCEMENT)
    announced_at: float = Field(ge=0.0)

    @model_validator(mode="after")
    def _one_entry_per_attempt(self) -> Self:
        attempts = [held.attempt for held in self.row_sets]
        if len(attempts) != len(set(attempts)):
            raise ValueError("a row set is listed twice")
        return self

    @property
    def subkey(self) -> str:
        return rows_subkey(self.peer_id)

    def to_wire(self, private_key: rsa.RSAPrivateKey) -> bytes:
        return seal(msgpack.packb(self.model_dump(mode="python"), use_bin_type=True), private_key)

    @classmethod
    def from_wire(cls, raw: Any, subkey: Any) -> RowsAnnouncement:
        """Decode and verify a value read under a mission's rows key; ``RecordError`` with the reason."""
        if not isinstance(subkey, str):
            raise RecordError(f"subkey is {type(subkey).__name__}, not a string")
        body, signer = open_sealed(raw, max_bytes=MAX_ROWS_RECORD_BYTES)
        record = decode_record(cls, body, "rows announcement")
        if signer != record.peer_id:
            raise RecordError(f"signed by {signer}, names peer {record.peer_id}")
        if subkey != record.subkey:
            raise RecordError(f"stored under {subkey[:80]!r}, belongs under {record.subkey!r}")
        return record


def rows_subkey(peer_id: str) -> str:
    return f"{ROWS_PREFIX}{peer_id}"


def is_rows_subkey(subkey: object) -> bool:
    return isinstance(subkey, str) and subkey.startswith(ROWS_PREFIX)
