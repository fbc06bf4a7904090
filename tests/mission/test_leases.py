"""Shard leases and done records: the record checks, the board's winner rule, and real hivemind DHTs
on 127.0.0.1 (three honest nodes, each with the shard validator) for claim / renew / expiry / races."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import secrets
from collections.abc import Iterator
from typing import Any

import hivemind
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from garden.protocol import signing
from garden.protocol.keys import DHTKeys
from garden.protocol.records import RecordError, seal
from garden.protocol.shards import (
    MAX_SHARD_RECORD_BYTES,
    DoneRecord,
    LeaseRecord,
    RefutationRecord,
    decode_shard_entry,
    done_subkey,
    pick_winner,
    refuted_subkey,
    segment_count,
    segment_of,
    segment_span,
)
from garden.protocol.validators import ShardRecordValidator
from garden.mission.leases import (
    LeaseConfig,
    LeaseLostError,
    LeaseManager,
    ShardBoard,
    ShardDHTError,
    ShardStatus,
    ShardSummary,
)

pytestmark = pytest.mark.heavy(6)  # seconds in `make check`: see tests/conftest.py

KEYS = DHTKeys("leasetest")
SHORT = LeaseConfig(lease_duration=4.0, dht_timeout=10.0)
"""For the test that waits for leases to end."""
HELD = LeaseConfig(lease_duration=60.0, dht_timeout=10.0)
"""For tests that never wait for a lease to end: with ``SHORT``, a test of many DHT calls on a loaded CI machine
outlived a lease it still counted as held (a claim found the shard open again)."""


SIGNERS: dict[str, rsa.RSAPrivateKey] = {}
"""Every key the tests made, by peer id: a done record embeds its producer's lease, sealed with its key."""


def new_key() -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # small: the tests only need speed
    SIGNERS[peer_id(key)] = key
    return key


def peer_id(key: rsa.RSAPrivateKey) -> str:
    return signing.peer_id_of(signing.public_key_der(key))


def mission_id() -> str:
    return secrets.token_hex(32)


def lease_for(key: rsa.RSAPrivateKey, mission: str, shard: int = 0, count: int = 3, **changes: Any) -> LeaseRecord:
    now = get_dht_time()
    fields: dict[str, Any] = dict(
        mission_id=mission, shard=shard, shard_count=count, peer_id=peer_id(key), attempt=secrets.token_hex(8),
        started=now - 600, renewed=now - 30, expires=now + 60,
    )  # fmt: skip
    fields.update(changes)
    return LeaseRecord(**fields)


def done_for(lease: LeaseRecord, finished: float, sha: str = "ab" * 32, rows: int = 4) -> DoneRecord:
    return DoneRecord(
        mission_id=lease.mission_id, shard=lease.shard, shard_count=lease.shard_count, peer_id=lease.peer_id,
        attempt=lease.attempt, rows=rows, row_set_sha256=sha, finished=finished,
        lease=lease.to_wire(SIGNERS[lease.peer_id]),
    )  # fmt: skip


# --- records and the pure winner rule -------------------------------------------------------------------


def test_records_roundtrip_and_refuse_forgeries() -> None:
    mine, other = new_key(), new_key()
    mission = mission_id()
    lease = lease_for(mine, mission, shard=1)
    assert LeaseRecord.from_wire(lease.to_wire(mine), "lease:1") == lease
    done = done_for(lease, finished=get_dht_time())
    assert DoneRecord.from_wire(done.to_wire(mine), done.subkey) == done
    assert done.subkey == f"done:1:{peer_id(mine)}:{lease.attempt}"

    refused = {
        "wrong subkey": (lease.to_wire(mine), "lease:2"),
        "signed by another peer": (lease.to_wire(other), "lease:1"),
        "garbage": (b"\xc1\xc1\xc1", "lease:1"),
        "not bytes": (42, "lease:1"),
        "oversized": (b"\x00" * (MAX_SHARD_RECORD_BYTES + 1), "lease:1"),
        "subkey not a string": (lease.to_wire(mine), 1),
    }
    for why, (raw, subkey) in refused.items():
        with pytest.raises(RecordError):
            LeaseRecord.from_wire(raw, subkey)
            pytest.fail(why)
    # a done record replayed as another peer's or another shard's
    with pytest.raises(RecordError, match="belongs under"):
        DoneRecord.from_wire(done.to_wire(mine), done_subkey(2, peer_id(mine), lease.attempt))

    with pytest.raises(ValueError, match="out of range"):
        lease_for(mine, mission, shard=3, count=3)
    with pytest.raises(ValueError, match="after its last renewal"):
        lease_for(mine, mission, expires=get_dht_time() + 2 * 3600)
    with pytest.raises(ValueError):
        done_for(lease, finished=1.0, sha="not a hash")
    # strict: no coercion of a string shard index
    with pytest.raises(ValueError):
        LeaseRecord.model_validate(lease.model_dump() | {"shard": "1"})

    now = get_dht_time()
    raw = lease.to_wire(mine)
    assert decode_shard_entry(raw, "lease:1", lease.expires, now) == lease
    # the same bytes again (decoded once, remembered): the times are still checked against this read
    with pytest.raises(RecordError, match="lease ends"):  # DHT expiration must be the lease's own end
        decode_shard_entry(raw, "lease:1", lease.expires + 3600, now)
    with pytest.raises(RecordError, match="belongs under"):  # and the subkey is part of what was remembered
        decode_shard_entry(raw, "lease:2", lease.expires, now)
    with pytest.raises(RecordError, match="future"):
        future = lease.model_copy(update={"started": now + 3000, "renewed": now + 3000, "expires": now + 3700})
        decode_shard_entry(done_for(future, now + 3600).to_wire(mine), done.subkey, now + 60, now)


def test_a_done_record_counts_only_under_its_producers_own_lease() -> None:
    """The attack: a throwaway key finishes any shard with a backdated record (finished = 0), which wins every
    race. A done record now carries the producer's lease for that attempt and must fall inside it."""
    alice, mallory = new_key(), new_key()
    mission, now = mission_id(), get_dht_time()
    lease = lease_for(mallory, mission, shard=0)
    assert done_for(lease, now).held_lease() == lease

    with pytest.raises(ValueError, match="outside its lease"):  # backdated
        done_for(lease, 0.0)
    with pytest.raises(ValueError, match="outside its lease"):  # long after its lease ended
        done_for(lease, lease.expires + 600)
    with pytest.raises(ValueError, match="lease"):  # no lease at all
        DoneRecord.model_validate({k: v for k, v in done_for(lease, now).model_dump().items() if k != "lease"})
    alices = lease_for(alice, mission, shard=0)
    stolen = done_for(lease, now).model_dump() | {"lease": alices.to_wire(alice)}  # someone else's lease
    with pytest.raises(ValueError, match="not this attempt's"):
        DoneRecord.model_validate(stolen)
    forged = done_for(lease, now).model_dump() | {"lease": alices.model_copy(update={"peer_id": peer_id(mallory)})
                                                  .to_wire(alice)}  # fmt: skip
    with pytest.raises(ValueError, match="signed by"):
        DoneRecord.model_validate(forged)
    other_shard = lease_for(mallory, mission, shard=1, attempt=lease.attempt)
    with pytest.raises(ValueError, match="belongs under"):  # a lease of another shard, same attempt id
        DoneRecord.model_validate(done_for(lease, now).model_dump() | {"lease": other_shard.to_wire(mallory)})

    # leased before the mission existed: readers that know the mission drop it
    early = done_for(lease, now)
    entries = {early.subkey: ValueWithExpiration(early.to_wire(mallory), now + 3600)}
    assert ShardBoard(entries, mission, 3, now).winners() == {0: early}
    late_mission = ShardBoard(entries, mission, 3, now, created=now - 60)
    assert late_mission.winners() == {} and late_mission.invalid_records == 1
    assert ShardBoard(entries, mission, 3, now, created=now - 3600).winners() == {0: early}
    # held void here (its rows were never served): left out, not counted invalid, the shard is open again
    voided = ShardBoard(entries, mission, 3, now, void={early.subkey})
    assert voided.winners() == {} and voided.invalid_records == 0 and 0 in voided.open_shards()


def test_winner_is_earliest_finish_and_stable_under_later_results() -> None:
    key = new_key()
    mission = mission_id()
    leases = [lease_for(key, mission, attempt=a, started=50.0) for a in ("0" * 16, "f" * 16, "1" * 16)]
    early, late, tie = done_for(leases[0], 100.0), done_for(leases[1], 200.0), done_for(leases[2], 100.0)
    assert pick_winner([late, early]) == early == pick_winner([early, late])
    assert pick_winner([early, tie, late]) == early  # tie on finish: smaller attempt id
    assert pick_winner([tie, early]) == early
    assert pick_winner([]) is None


def test_board_picks_one_winner_and_ignores_forged_entries(caplog: pytest.LogCaptureFixture) -> None:
    alice, bob, mallory = new_key(), new_key(), new_key()
    mission, now = mission_id(), get_dht_time()
    lease_a = lease_for(alice, mission, shard=0)
    lease_b = lease_for(bob, mission, shard=0)
    lease_1 = lease_for(bob, mission, shard=1)
    done_a, done_b = done_for(lease_a, now - 5), done_for(lease_b, now - 9)
    forged = lease_for(mallory, mission, shard=2).model_copy(update={"peer_id": peer_id(alice)})
    other_mission = lease_for(mallory, mission_id(), shard=0)
    wrong_count = done_for(lease_for(mallory, mission, shard=2, count=8), now)
    entries: dict[Any, Any] = {
        done_a.subkey: ValueWithExpiration(done_a.to_wire(alice), now + 3600),
        done_b.subkey: ValueWithExpiration(done_b.to_wire(bob), now + 3600),
        "lease:1": ValueWithExpiration(lease_1.to_wire(bob), lease_1.expires),
        "lease:2": ValueWithExpiration(forged.to_wire(mallory), forged.expires),
        "lease:0": ValueWithExpiration(other_mission.to_wire(mallory), other_mission.expires),
        wrong_count.subkey: ValueWithExpiration(wrong_count.to_wire(mallory), now + 3600),
        "done:2:x:y": ValueWithExpiration(done_a.to_wire(alice), now + 3600),  # replayed under another subkey
        "junk": ValueWithExpiration(b"\x00", now + 60),
        7: ValueWithExpiration("text", now + 60),
        "tuple-less": "not a pair",
    }
    with caplog.at_level(logging.INFO, logger="garden.mission.leases"):
        board = ShardBoard(entries, mission, 3, now)
    assert board.invalid_records == 7
    assert caplog.text.count("ignored an invalid shard record") == 7
    states = board.shards
    assert states[0].status is ShardStatus.DONE and states[0].winner == done_b  # bob finished first
    assert states[1].status is ShardStatus.LEASED and states[1].lease == lease_1
    assert states[2].status is ShardStatus.OPEN and states[2].lease is None
    assert board.losing_attempts() == [done_a]
    assert board.summary() == ShardSummary(total=3, done=1, leased=1, open=1)
    assert board.open_shards() == [2]
    assert not board.all_done
    # the same records in another order give the same answer
    reordered = ShardBoard(dict(reversed(list(entries.items()))), mission, 3, now)
    assert reordered.winners() == board.winners() and reordered.losing_attempts() == [done_a]
    # a lease past its end no longer holds the shard
    assert ShardBoard(entries, mission, 3, lease_1.expires + 1).shards[1].status is ShardStatus.OPEN


def shard_record(key: bytes | str, subkey: Any, value: Any, expiration_time: float) -> DHTRecord:
    key_bytes = key if isinstance(key, bytes) else DHTID.generate(source=key).to_bytes()
    return DHTRecord(key_bytes, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration_time)


def test_validator_refuses_forged_and_misplaced_records() -> None:
    alice, mallory = new_key(), new_key()
    mission = mission_id()
    key = KEYS.mission_shards(mission)
    validator = ShardRecordValidator(KEYS)
    lease = lease_for(alice, mission, shard=1)
    done = done_for(lease, get_dht_time())
    assert validator.validate(shard_record(key, "lease:1", lease.to_wire(alice), lease.expires))
    assert validator.validate(shard_record(key, done.subkey, done.to_wire(alice), get_dht_time() + 3600))
    # not a shard entry: left to other validators (peer records, other swarms)
    assert validator.validate(shard_record(KEYS.peers, "QmSomePeer", b"anything", get_dht_time() + 60))

    out_of_range = dict(done.model_dump(), shard=5, shard_count=3)
    bad = [
        shard_record(key, "lease:1", lease.to_wire(mallory), lease.expires),  # signed by someone else
        shard_record(key, "lease:2", lease.to_wire(alice), lease.expires),  # subkey does not match
        shard_record(key, "lease:1", b"\xc1garbage", lease.expires),
        shard_record(key, "lease:1", b"\x00" * 5000, lease.expires),  # oversized
        shard_record(key, "lease:1", lease.to_wire(alice), lease.expires + 600),  # outlives its lease
        shard_record(KEYS.mission_shards(mission_id()), "lease:1", lease.to_wire(alice), lease.expires),  # replay
        shard_record(DHTKeys("other").mission_shards(mission), "lease:1", lease.to_wire(alice), lease.expires),
        shard_record(key, done_subkey(5, peer_id(alice), lease.attempt), seal(msgpack.packb(out_of_range), alice), 0),
        shard_record(key, "done:1", done.to_wire(alice), get_dht_time() + 60),
        shard_record(KEYS.shard_segment(mission, 1), "lease:1", lease.to_wire(alice), lease.expires),  # not its segment
    ]
    for i, record in enumerate(bad):
        assert not validator.validate(record), f"forged record {i} accepted"
    assert validator.rejected == len(bad)


def test_a_missions_shards_are_kept_in_segments_of_32() -> None:
    assert [segment_of(i) for i in (0, 31, 32, 63, 64)] == [0, 0, 1, 1, 2]
    assert [segment_count(n) for n in (1, 32, 33, 500)] == [1, 1, 2, 16]
    assert segment_span(0, 12) == range(12) and segment_span(1, 70) == range(32, 64)
    assert segment_span(2, 70) == range(64, 70)
    with pytest.raises(ValueError, match="outside"):
        segment_span(3, 70)
    # segment 0 is the mission's shards key: a mission of up to 32 shards keeps the one key it always had
    mission = mission_id()
    assert KEYS.shard_segment(mission, 0) == KEYS.mission_shards(mission)
    assert KEYS.shard_segment(mission, 2) == KEYS.mission_shards(mission) + "/2"

    # a board of one segment holds its shards only: a record of another segment's shard is dropped as misplaced
    alice = new_key()
    now = get_dht_time()
    inside, outside = lease_for(alice, mission, shard=33, count=70), lease_for(alice, mission, shard=3, count=70)
    entries = {r.subkey: (r.to_wire(alice), r.expires) for r in (inside, outside)}
    board = ShardBoard(entries, mission, 70, now, span=segment_span(1, 70))
    assert [s.index for s in board.shards] == list(range(32, 64)) and board.invalid_records == 1
    assert board.state(33).lease == inside and board.state(33).status is ShardStatus.LEASED
    assert board.summary() == ShardSummary(total=32, done=0, leased=1, open=31)
    with pytest.raises(IndexError, match="not in the shards read"):
        board.state(3)
    with pytest.raises(ValueError, match="span"):
        ShardBoard(entries, mission, 70, now, span=range(60, 80))


class _SilentDHT:
    """A DHT whose requests never complete (a partitioned or wedged peer)."""

    def get(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    store = get


async def test_an_unanswered_dht_call_raises_instead_of_reading_as_empty() -> None:
    manager = LeaseManager(_SilentDHT(), KEYS, new_key(), LeaseConfig(dht_timeout=0.1))  # type: ignore[arg-type]
    with pytest.raises(ShardDHTError, match="timed out"):
        await manager.claim(mission_id(), 4)  # not None: an unread board must not look all open
    with pytest.raises(ValueError, match="lease_duration"):
        LeaseConfig(lease_duration=0)


# --- on real DHTs ---------------------------------------------------------------------------------------


VALIDATORS: list[ShardRecordValidator] = []
"""The validators of the module's DHT nodes (their refusal counters live in shared memory)."""


@pytest.fixture(scope="module")
def dhts() -> Iterator[list[hivemind.DHT]]:
    """Three honest nodes with the shard validator, shared by the DHT tests (each uses its own mission)."""
    started: list[hivemind.DHT] = []
    VALIDATORS[:] = [ShardRecordValidator(KEYS) for _ in range(3)]
    try:
        for validator in VALIDATORS:
            started.append(
                hivemind.DHT(
                    initial_peers=[str(m) for m in started[0].get_visible_maddrs()] if started else None,
                    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                    record_validators=[validator],
                    start=True,
                )
            )
        yield started
    finally:
        for dht in started:
            dht.shutdown()


async def test_lease_blocks_renews_expires_and_the_race_has_one_winner(dhts: list[hivemind.DHT]) -> None:
    a = LeaseManager(dhts[0], KEYS, new_key(), SHORT)
    b = LeaseManager(dhts[1], KEYS, new_key(), SHORT)
    c = LeaseManager(dhts[2], KEYS, new_key(), SHORT)
    mission = mission_id()

    lease_a = await a.claim(mission, 1)
    assert lease_a is not None and lease_a.shard == 0 and lease_a.peer_id == a.peer_id
    assert await b.claim(mission, 1) is None  # held by A
    first_end = lease_a.expires
    await asyncio.sleep(max(first_end - SHORT.lease_duration / 2 - get_dht_time(), 0.0))
    lease_a = await a.renew(lease_a)
    assert lease_a.expires > first_end
    # past the first lease's end: only the renewal holds it now (for half a lease more, a loaded machine's margin)
    await asyncio.sleep(max(first_end + 0.1 - get_dht_time(), 0.0))
    assert await b.claim(mission, 1) is None
    board = await c.fetch(mission, 1)
    assert board.shards[0].status is ShardStatus.LEASED and board.shards[0].lease == lease_a

    await asyncio.sleep(lease_a.expires - get_dht_time() + 0.2)  # A stalls; its lease runs out
    lease_b = await b.claim(mission, 1)
    assert lease_b is not None and lease_b.peer_id == b.peer_id and lease_b.attempt != lease_a.attempt
    with pytest.raises(LeaseLostError, match="leased by"):
        await a.renew(lease_a)

    # B finishes first; slow A, still within its lease's clock allowance, is told the shard is B's
    done_b = await b.mark_done(lease_b, rows=5, row_set_sha256=hashlib.sha256(b"b").hexdigest())
    with pytest.raises(LeaseLostError, match="finished by"):
        await a.mark_done(lease_a, rows=5, row_set_sha256=hashlib.sha256(b"a").hexdigest())
    # had A's done record crossed B's in flight, both would be stored: the earlier finish wins everywhere
    done_a = done_for(lease_a, get_dht_time(), sha=hashlib.sha256(b"a").hexdigest(), rows=5)
    assert await dhts[0].store(KEYS.mission_shards(mission), done_a.to_wire(SIGNERS[a.peer_id]),
                               get_dht_time() + 600, subkey=done_a.subkey, return_future=True)  # fmt: skip
    assert done_a.finished > done_b.finished
    for manager in (a, b, c):
        board = await manager.fetch(mission, 1)
        assert board.winners() == {0: done_b}, f"{manager.peer_id} sees another winner"
        assert board.losing_attempts() == [done_a]
        assert board.all_done and board.summary() == ShardSummary(total=1, done=1, leased=0, open=0)
        assert board.invalid_records == 0
    assert await c.claim(mission, 1) is None
    with pytest.raises(LeaseLostError, match="finished by"):
        await b.renew(lease_b)


async def test_the_lease_of_a_peer_seen_leaving_holds_nothing(dhts: list[hivemind.DHT]) -> None:
    """A lease of 10 minutes whose holder the directory saw leave (``PeerDirectory.gone``): the shard is open to
    the peer that saw it, whose claim outlasts the dead holder's lease (the DHT keeps the later one) and wins;
    a peer that did not see it leave still sees the shard leased; the holder, were it alive, loses it."""
    long = LeaseConfig(lease_duration=600.0, dht_timeout=10.0)
    holder = LeaseManager(dhts[0], KEYS, new_key(), long)
    left: set[str] = set()
    watcher = LeaseManager(dhts[1], KEYS, new_key(), long, gone=lambda: frozenset(left))
    unaware = LeaseManager(dhts[2], KEYS, new_key(), long)
    mission = mission_id()
    held = await holder.claim(mission, 1)
    assert held is not None
    assert await watcher.claim(mission, 1) is None  # alive: its lease holds
    left.add(holder.peer_id)
    assert (await watcher.fetch(mission, 1)).open_shards() == [0]
    assert (await unaware.fetch(mission, 1)).shards[0].status is ShardStatus.LEASED
    taken = await watcher.claim(mission, 1)
    assert taken is not None and taken.expires > held.expires
    board = await unaware.fetch(mission, 1)
    assert board.shards[0].status is ShardStatus.LEASED and board.shards[0].lease == taken
    with pytest.raises(LeaseLostError, match="leased by"):
        await holder.renew(held)
    left.discard(holder.peer_id)  # back: its old attempt still lost the shard
    assert (await watcher.fetch(mission, 1)).shards[0].lease == taken


async def test_every_shard_is_claimed_once_then_all_done(dhts: list[hivemind.DHT]) -> None:
    a = LeaseManager(dhts[0], KEYS, new_key(), HELD)
    b = LeaseManager(dhts[2], KEYS, new_key(), HELD)
    mission = mission_id()
    leases = [await a.claim(mission, 3) for _ in range(3)]
    assert all(lease is not None for lease in leases)
    assert sorted(lease.shard for lease in leases if lease is not None) == [0, 1, 2]
    assert await b.claim(mission, 3) is None
    assert (await b.fetch(mission, 3)).summary() == ShardSummary(total=3, done=0, leased=3, open=0)

    # a released shard is open at once, and can be claimed over the release marker
    first = leases[0]
    assert first is not None and await a.release(first)
    assert (await b.fetch(mission, 3)).open_shards() == [first.shard]
    taken = await b.claim(mission, 3)
    assert taken is not None and taken.shard == first.shard
    leases[0] = taken

    for lease in leases:
        assert lease is not None
        owner = b if lease.peer_id == b.peer_id else a
        await owner.mark_done(lease, rows=2, row_set_sha256="0f" * 32)
    board = await a.fetch(mission, 3)
    assert board.all_done and board.summary() == ShardSummary(total=3, done=3, leased=0, open=0)
    assert board.losing_attempts() == []


class _ReadsKept:
    """A DHT that notes the keys read through it."""

    def __init__(self, dht: hivemind.DHT):
        self.dht, self.read = dht, list[str]()

    def get(self, key: str, **kwargs: Any) -> Any:
        self.read.append(key)
        return self.dht.get(key, **kwargs)

    def store(self, *args: Any, **kwargs: Any) -> Any:
        return self.dht.store(*args, **kwargs)


async def test_a_mission_of_several_segments_is_claimed_a_segment_at_a_time(dhts: list[hivemind.DHT]) -> None:
    """70 shards, three segment keys: claims read one segment, records land under their shard's segment, and a
    view of the mission reads them all; the last claims find the one open shard wherever it is."""
    a = LeaseManager(dhts[0], KEYS, new_key(), HELD, rng=random.Random(1))
    b_dht = _ReadsKept(dhts[1])
    b = LeaseManager(b_dht, KEYS, new_key(), HELD, rng=random.Random(2))  # type: ignore[arg-type]
    mission, count = mission_id(), 70
    first = await a.claim(mission, count)
    assert first is not None
    raw = await dhts[2].get(KEYS.shard_segment(mission, segment_of(first.shard)), latest=True, return_future=True)
    assert raw is not None and f"lease:{first.shard}" in raw.value  # stored under its segment's own key
    for other in set(range(3)) - {segment_of(first.shard)}:
        assert await dhts[2].get(KEYS.shard_segment(mission, other), latest=True, return_future=True) is None

    # leave one shard of the last segment open; every claim by B from then on must find it, wherever it starts
    last_open = 69
    signer = SIGNERS[a.peer_id]
    now = get_dht_time()
    for shard in set(range(count)) - {first.shard, last_open}:
        lease = lease_for(signer, mission, shard=shard, count=count, started=now, renewed=now, expires=now + 60)
        done = done_for(lease, now + 1)
        assert await dhts[0].store(KEYS.shard_segment(mission, segment_of(shard)), done.to_wire(signer),
                                   now + 600, subkey=done.subkey, return_future=True)  # fmt: skip
    board = await b.fetch(mission, count)
    assert board.summary() == ShardSummary(total=70, done=68, leased=1, open=1) and board.invalid_records == 0
    full = 1 - segment_of(first.shard) if segment_of(first.shard) < 2 else 0  # a segment of done shards only
    assert (await b.fetch_segment(mission, count, full)).summary() == ShardSummary(total=32, done=32, leased=0, open=0)
    b_dht.read.clear()
    taken = await b.claim(mission, count, hint=board)  # the board saw shard 69 open: its segment is read first
    assert taken is not None and taken.shard == last_open
    assert b_dht.read == [KEYS.shard_segment(mission, 2)] * 2  # the claim, then the read-back
    assert await b.claim(mission, count) is None  # none open in any segment
    await a.mark_done(first, rows=1, row_set_sha256="0f" * 32)
    await b.mark_done(taken, rows=1, row_set_sha256="0f" * 32)
    assert (await a.fetch(mission, count)).all_done


async def test_a_lease_overwritten_in_flight_is_not_finished(dhts: list[hivemind.DHT]) -> None:
    """Two claims that cross both read their own lease back; the DHT keeps the later-expiring one. The other
    claimer finds out at its done record at the latest, and publishes nothing: no shard is done twice."""
    a = LeaseManager(dhts[0], KEYS, new_key(), HELD)
    b_key = new_key()
    mission = mission_id()
    lease_a = await a.claim(mission, 1)
    assert lease_a is not None
    now = get_dht_time()
    crossing = lease_for(b_key, mission, shard=0, count=1, started=now, renewed=now, expires=lease_a.expires + 1)
    assert await dhts[1].store(KEYS.mission_shards(mission), crossing.to_wire(b_key), crossing.expires,
                               subkey=crossing.subkey, return_future=True)  # fmt: skip
    with pytest.raises(LeaseLostError, match="leased by"):
        await a.mark_done(lease_a, rows=1, row_set_sha256="0f" * 32)
    assert (await a.fetch(mission, 1)).winners() == {}


async def test_forged_and_out_of_range_records_do_not_get_in(dhts: list[hivemind.DHT]) -> None:
    honest_key, mallory = new_key(), new_key()
    honest = LeaseManager(dhts[0], KEYS, honest_key, HELD)
    mission = mission_id()
    key = KEYS.mission_shards(mission)
    lease = await honest.claim(mission, 2)
    assert lease is not None
    rejected_before = sum(v.rejected for v in VALIDATORS)

    # Mallory (on an honest node) tries to take over the lease, and to finish a shard that is not there
    stolen = lease.model_copy(update={"attempt": "0" * 16, "expires": lease.expires + 30})
    out_of_range = dict(done_for(lease_for(mallory, mission, shard=0, count=2), get_dht_time()).model_dump(), shard=7)
    attempts = [
        (lease.subkey, stolen.to_wire(mallory), stolen.expires),  # the honest peer's id, Mallory's signature
        (lease.subkey, b"\xc1garbage", lease.expires + 30),
        (done_subkey(7, peer_id(mallory), "0" * 16), seal(msgpack.packb(out_of_range), mallory), get_dht_time() + 60),
    ]
    for subkey, value, expiration_time in attempts:
        assert not dhts[1].store(key, value, expiration_time, subkey=subkey), f"stored forged {subkey}"
    with pytest.raises(ValueError, match="belongs to"):  # a manager cannot finish another peer's lease
        await LeaseManager(dhts[1], KEYS, mallory, HELD).mark_done(lease, rows=1, row_set_sha256="0f" * 32)
    # a record valid on its own but for a mission of another size: stored, then ignored by readers
    wrong_count = lease_for(mallory, mission, shard=5, count=8, expires=get_dht_time() + 30)
    assert dhts[1].store(key, wrong_count.to_wire(mallory), wrong_count.expires, subkey=wrong_count.subkey)

    assert sum(v.rejected for v in VALIDATORS) > rejected_before
    board = await LeaseManager(dhts[2], KEYS, new_key(), HELD).fetch(mission, 2)
    assert board.shards[lease.shard].lease == lease  # the honest lease is intact
    assert board.invalid_records == 1  # the wrong-count record
    assert board.summary() == ShardSummary(total=2, done=0, leased=1, open=1)


async def test_a_done_record_is_kept_alive_by_holders_before_it_expires(dhts: list[hivemind.DHT]) -> None:
    producer = LeaseManager(dhts[0], KEYS, new_key(), LeaseConfig(lease_duration=2.0, done_expiration=20.0))
    mission = mission_id()
    lease = await producer.claim(mission, 1)
    assert lease is not None
    done = await producer.mark_done(lease, rows=3, row_set_sha256=hashlib.sha256(b"rows").hexdigest())
    first_expiry = (await producer.fetch(mission, 1)).stored[done.subkey][1]

    # another peer holding the rows: with 20 s of 20 left nothing is due; with a 60 s horizon it renews
    holder = LeaseManager(dhts[1], KEYS, new_key(), LeaseConfig(done_expiration=20.0))
    assert not await holder.keep_alive(await holder.fetch(mission, 1), done)
    keeper = LeaseManager(dhts[2], KEYS, new_key(), LeaseConfig(done_expiration=60.0))
    assert await keeper.keep_alive(await keeper.fetch(mission, 1), done)
    board = await producer.fetch(mission, 1)
    assert board.stored[done.subkey][1] > first_expiry + 30  # the producer's own bytes, stored for longer
    assert board.winners() == {0: done} and board.invalid_records == 0


# --- refutations ----------------------------------------------------------------------------------------


def refutation_of(
    done: DoneRecord, refuter: rsa.RSAPrivateKey, row: int = 1, at: float | None = None
) -> RefutationRecord:
    return RefutationRecord(
        mission_id=done.mission_id, shard=done.shard, shard_count=done.shard_count, peer_id=peer_id(refuter),
        attempt=done.attempt, producer=done.peer_id, row_set_sha256=done.row_set_sha256, row=row,
        reason="top-k log-probs off", at=get_dht_time() if at is None else at,
    )  # fmt: skip


def test_a_refutation_is_signed_by_its_verifier_and_names_one_result() -> None:
    producer, verifier, mallory = new_key(), new_key(), new_key()
    mission, now = mission_id(), get_dht_time()
    done = done_for(lease_for(producer, mission, shard=1), now)
    claim = refutation_of(done, verifier)
    assert claim.subkey == refuted_subkey(1, peer_id(producer), done.attempt, peer_id(verifier))
    assert RefutationRecord.from_wire(claim.to_wire(verifier), claim.subkey) == claim and claim.names(done)
    other = done_for(lease_for(producer, mission, shard=1), now)
    assert not claim.names(other)  # another attempt of the same shard
    with pytest.raises(RecordError, match="signed by"):  # in another verifier's name
        RefutationRecord.from_wire(claim.to_wire(mallory), claim.subkey)
    with pytest.raises(ValueError):
        refutation_of(done, verifier).model_validate(claim.model_dump() | {"reason": "x" * 201})
    with pytest.raises(RecordError, match="future"):
        future = refutation_of(done, verifier, at=now + 3600)
        decode_shard_entry(future.to_wire(verifier), future.subkey, now + 60, now)

    key = KEYS.mission_shards(mission)
    validator = ShardRecordValidator(KEYS)
    assert validator.validate(shard_record(key, claim.subkey, claim.to_wire(verifier), now + 3600))
    assert not validator.validate(shard_record(key, claim.subkey, claim.to_wire(mallory), now + 3600))
    assert not validator.validate(shard_record(key, claim.subkey + "x", claim.to_wire(verifier), now + 3600))
    assert not validator.validate(shard_record(key, claim.subkey, claim.to_wire(verifier), now + 30 * 86400))
    # on the board: kept aside as a claim; it changes no shard's state by itself
    entries = {
        done.subkey: ValueWithExpiration(done.to_wire(producer), now + 3600),
        claim.subkey: ValueWithExpiration(claim.to_wire(verifier), now + 3600),
    }
    board = ShardBoard(entries, mission, 3, now)
    assert board.refutations == [claim] and board.winners() == {1: done} and board.invalid_records == 0


async def test_a_refutation_is_obeyed_from_a_trusted_peer_and_only_weighed_from_a_stranger(
    dhts: list[hivemind.DHT], tmp_path: Any
) -> None:
    """A stranger's refutation of an honest row set changes nothing but which rows this peer checks next; the
    lead's (a peer this one trusts) voids the row set here, drops its rows and distrusts its producer."""
    from types import SimpleNamespace

    from garden.mission.verification import VerificationState, Verifier
    from garden.store import Store, StoredRowSet

    producer, lead, stranger, me = new_key(), new_key(), new_key(), new_key()
    mission = mission_id()
    made = LeaseManager(dhts[0], KEYS, producer)
    lease = await made.claim(mission, 2)
    assert lease is not None
    done = await made.mark_done(lease, rows=2, row_set_sha256=hashlib.sha256(b"rows").hexdigest())
    store = Store(tmp_path / "g.sqlite3")
    held = StoredRowSet(mission_id=mission, attempt=done.attempt, shard=done.shard, producer=done.peer_id,
                        sha256=done.row_set_sha256, rows=0, received_from="QmSomeone", added_at=0.0)  # fmt: skip
    store.add_row_set(held, [])

    async def never(job: Any) -> list:
        raise AssertionError("weighing a refutation runs no check by itself")

    leases = LeaseManager(dhts[1], KEYS, me)
    verifier = Verifier(store, leases, never, peer_id(me))
    subject: Any = SimpleNamespace(id=mission)
    verifier.missions[mission] = VerificationState(verified={done.attempt: done.peer_id})  # checked: a sample
    claim = await LeaseManager(dhts[2], KEYS, stranger).refute(done, row=1, reason="made up")
    board = await leases.fetch(mission, 2)
    assert board.refutations == [claim]
    assert not await verifier.consider(subject, board, trusted={peer_id(lead)}, can_check=True)
    state = verifier.missions[mission]
    assert done.attempt not in state.verified  # pending again: row 1 is checked at the next look
    assert state.claims[done.attempt] == {peer_id(stranger): claim}
    assert store.row_sets(mission) and (await leases.fetch(mission, 2)).winners() == {done.shard: done}
    assert not await verifier.consider(subject, board, trusted={peer_id(lead)}, can_check=True)  # once only

    await LeaseManager(dhts[2], KEYS, lead).refute(done, row=0, reason="row 0 fails")
    board = await leases.fetch(mission, 2)
    assert len(board.refutations) == 2
    assert await verifier.consider(subject, board, trusted={peer_id(lead)}, can_check=False)
    assert store.row_sets(mission) == [] and done.attempt in state.refuted
    assert (await leases.fetch(mission, 2)).winners() == {}  # void here: the shard is open again
    assert state.producers_refuted == {done.peer_id} and state.published == 0  # obeyed, not signed again
    store.close()

