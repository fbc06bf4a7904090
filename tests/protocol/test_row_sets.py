"""Row sets: canonical bytes, their hash, strict decoding of a stranger's row set; and the signed
announcement of which row sets a peer holds."""

from __future__ import annotations

import secrets
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from garden.protocol import signing
from garden.protocol.records import RecordError, seal
from garden.protocol.row_sets import (
    MAX_HELD_PER_ANNOUNCEMENT,
    HeldRowSet,
    RowsAnnouncement,
    pack_encoded_rows,
    pack_row_set,
    row_set_sha256,
    rows_subkey,
    unpack_row_set,
)
from garden.protocol.rows import DorpoRow

MISSION = "ab" * 32


def make_row(i: int, prompt: str = "p") -> DorpoRow:
    rng = np.random.default_rng(i)
    logits = rng.normal(size=(3, 200)) * 3
    logps = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    top = np.argsort(-logps, axis=1)[:, :5]
    return DorpoRow.from_arrays(
        prompt=f"{prompt}{i}", chosen=f"answer {i}", rejected=None if i % 2 else "bad", chosen_ids=top[:, 0],
        topk_ids=top, topk_logprobs=np.take_along_axis(logps, top, axis=1), teacher="t", judge="reference",
        scores={"chosen": 1.0}, tokenizer="tok", vocab_size=49152,
    )  # fmt: skip


def rows(n: int = 3) -> list[DorpoRow]:
    return [make_row(i) for i in range(n)]


@pytest.fixture(scope="module")
def alice() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # small: the tests only need speed


@pytest.fixture(scope="module")
def mallory() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def peer_id(key: rsa.RSAPrivateKey) -> str:
    return signing.peer_id_of(signing.public_key_der(key))


# --- row-set bytes -----------------------------------------------------------------------------------


def test_round_trip_and_hash_of_encoded_rows() -> None:
    original = rows(4)
    packed = pack_row_set(original)
    back = unpack_row_set(packed)
    assert [r.row_id for r in back] == [r.row_id for r in original]
    assert back == original  # equal rows, arrays included
    bodies = [r.to_msgpack() for r in original]
    assert pack_encoded_rows(bodies) == packed  # what a holder rebuilds from its store is the same bytes
    assert row_set_sha256(pack_encoded_rows(bodies)) == row_set_sha256(packed)
    assert len(row_set_sha256(packed)) == 64
    assert unpack_row_set(pack_row_set([])) == []  # a judge may drop every prompt of a shard
    assert row_set_sha256(pack_row_set(original[::-1])) != row_set_sha256(packed)  # order is part of the hash


def test_unpack_refuses_bad_row_sets() -> None:
    good = rows(3)
    packed = pack_row_set(good)
    row = good[0]
    reordered = dict(reversed(list(row.model_dump(mode="python").items())))  # same content, keys in another order
    not_canonical = msgpack.packb(reordered, use_bin_type=True)
    assert not_canonical != row.to_msgpack()
    assert DorpoRow.from_msgpack(not_canonical) == row  # a valid row, only its encoding is off
    refused: dict[str, tuple[Any, dict[str, int]]] = {
        "a str": ("not bytes", {}),
        "a list": ([row.to_msgpack()], {}),
        "None": (None, {}),
        "over max_bytes": (packed, {"max_bytes": len(packed) - 1}),
        "not msgpack": (b"\xc1\xc1garbage", {}),
        "trailing bytes": (packed + b"\x00", {}),
        "a map, not a list": (msgpack.packb({"rows": [row.to_msgpack()]}, use_bin_type=True), {}),
        "a non-bytes item": (msgpack.packb([row.to_msgpack(), 5], use_bin_type=True), {}),
        "a str item": (msgpack.packb([row.to_msgpack(), "text"], use_bin_type=True), {}),
        "a row that is garbage": (msgpack.packb([row.to_msgpack(), b"\xc1"], use_bin_type=True), {}),
        "a non-canonical row": (msgpack.packb([good[1].to_msgpack(), not_canonical], use_bin_type=True), {}),
        "more rows than max_rows": (packed, {"max_rows": 2}),
    }
    for why, (raw, kwargs) in refused.items():
        with pytest.raises(RecordError):
            unpack_row_set(raw, **kwargs)
            pytest.fail(f"accepted: {why}")
    with pytest.raises(RecordError, match="row 1 is not canonically encoded"):
        unpack_row_set(msgpack.packb([good[1].to_msgpack(), not_canonical], use_bin_type=True))
    with pytest.raises(RecordError, match="over the"):
        unpack_row_set(packed, max_bytes=len(packed) - 1)
    assert len(unpack_row_set(packed, max_bytes=len(packed), max_rows=3)) == 3  # the limits are inclusive


# --- the announcement -----------------------------------------------------------------------------------


def held(shard: int = 0, attempt: str | None = None, producer: str = "QmProducer", n: int = 3) -> HeldRowSet:
    return HeldRowSet(
        shard=shard, attempt=attempt or secrets.token_hex(8), producer=producer,
        sha256=row_set_sha256(pack_row_set(rows(n))), rows=n,
    )  # fmt: skip


def announcement(key: rsa.RSAPrivateKey, **changes: Any) -> RowsAnnouncement:
    fields: dict[str, Any] = dict(
        mission_id=MISSION, peer_id=peer_id(key), has_prompts=True, row_sets=[held(0), held(1)],
        announced_at=1_700_000_000.0,
    )  # fmt: skip
    fields.update(changes)
    return RowsAnnouncement(**fields)


def test_announcement_round_trip(alice: rsa.RSAPrivateKey) -> None:
    record = announcement(alice)
    assert record.subkey == rows_subkey(peer_id(alice)) == f"rows:{peer_id(alice)}"
    assert RowsAnnouncement.from_wire(record.to_wire(alice), record.subkey) == record
    empty = announcement(alice, has_prompts=False, row_sets=[])
    assert RowsAnnouncement.from_wire(empty.to_wire(alice), empty.subkey) == empty


def test_announcement_forgeries_are_refused(alice: rsa.RSAPrivateKey, mallory: rsa.RSAPrivateKey) -> None:
    record = announcement(alice)
    wire = record.to_wire(alice)
    flipped = bytearray(wire)
    flipped[-5] ^= 0xFF  # inside the signature (the envelope's last field)
    refused: dict[str, tuple[Any, Any]] = {
        "under another peer's subkey": (wire, rows_subkey(peer_id(mallory))),
        "under the bare peer id": (wire, peer_id(alice)),
        "subkey not a string": (wire, 7),
        "signed by another key than peer_id": (record.to_wire(mallory), record.subkey),
        "bad signature": (bytes(flipped), record.subkey),
        "garbage": (b"\xc1garbage", record.subkey),
        "not bytes": ("text", record.subkey),
        "oversized": (b"\x00" * (64 * 1024 + 1), record.subkey),
    }
    for why, (raw, subkey) in refused.items():
        with pytest.raises(RecordError):
            RowsAnnouncement.from_wire(raw, subkey)
            pytest.fail(f"accepted: {why}")
    with pytest.raises(RecordError, match="signed by"):
        RowsAnnouncement.from_wire(record.to_wire(mallory), record.subkey)
    with pytest.raises(RecordError, match="stored under"):
        RowsAnnouncement.from_wire(wire, rows_subkey(peer_id(mallory)))


def test_announcement_schema_limits(alice: rsa.RSAPrivateKey) -> None:
    twice = held(0, attempt="0123456789abcdef")
    with pytest.raises(ValidationError, match="listed twice"):
        announcement(alice, row_sets=[twice, held(1), twice])
    too_many = [held(i, n=0) for i in range(MAX_HELD_PER_ANNOUNCEMENT + 1)]
    with pytest.raises(ValidationError):
        announcement(alice, row_sets=too_many)
    assert len(announcement(alice, row_sets=too_many[:-1]).row_sets) == MAX_HELD_PER_ANNOUNCEMENT

    # the same, signed by the right key but built by hand, is refused on the wire too
    body = announcement(alice).model_dump(mode="python")
    for row_sets in ([twice.model_dump(), twice.model_dump()], [h.model_dump() for h in too_many]):
        raw = seal(msgpack.packb({**body, "row_sets": row_sets}, use_bin_type=True), alice)
        with pytest.raises(RecordError):
            RowsAnnouncement.from_wire(raw, rows_subkey(peer_id(alice)))
