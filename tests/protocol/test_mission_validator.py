"""The DHT-side validator of mission records: signed missions under their id, cancels under
``cancel:<id>:<signer>``, rows announcements under their mission's rows key; everything else under ``missions``
refused and counted, and unrelated records left to other validators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from garden.data import DEMO_PROMPTS, demo_prompts
from garden.protocol import signing
from garden.protocol.checkpoints import StudentRecord
from garden.protocol.keys import DHTKeys
from garden.protocol.mission import (
    CancelRecord,
    IndexHead,
    SignedMission,
    cancel_subkey,
    index_digest,
    load_mission_toml,
    open_any_cancel,
    open_index_head,
    sign_cancel,
    sign_index_head,
    sign_mission,
)
from garden.protocol.mission_spec import canonical_msgpack
from garden.protocol.records import RecordError, seal
from garden.protocol.row_sets import RowsAnnouncement, rows_subkey
from garden.protocol.validators import MissionRecordValidator, check_missions_entry

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "capitals.toml"
KEYS = DHTKeys("validatortest")


@pytest.fixture(scope="module")
def lead() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # small: the tests only need speed


@pytest.fixture(scope="module")
def other() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture(scope="module")
def draft() -> Any:
    return load_mission_toml(EXAMPLE, {DEMO_PROMPTS: demo_prompts})


@pytest.fixture(scope="module")
def mission(draft: Any, lead: rsa.RSAPrivateKey) -> SignedMission:
    return sign_mission(draft, lead, now=1_700_000_000.0)


@pytest.fixture(scope="module")
def second(draft: Any, lead: rsa.RSAPrivateKey) -> SignedMission:
    return sign_mission(draft, lead, now=1_700_000_001.0)  # the same file signed again: another mission


def peer_id(key: rsa.RSAPrivateKey) -> str:
    return signing.peer_id_of(signing.public_key_der(key))


def record(key: str, subkey: Any, value: Any, expiration_time: float | None = None) -> DHTRecord:
    return DHTRecord(
        DHTID.generate(source=key).to_bytes(),
        MSGPackSerializer.dumps(subkey),
        MSGPackSerializer.dumps(value),
        get_dht_time() + 3600 if expiration_time is None else expiration_time,
    )


def rows_announcement(key: rsa.RSAPrivateKey, mission_id: str) -> RowsAnnouncement:
    return RowsAnnouncement(mission_id=mission_id, peer_id=peer_id(key), has_prompts=True, announced_at=get_dht_time())


def flip_signature(wire: bytes) -> bytes:
    flipped = bytearray(wire)
    flipped[-5] ^= 0xFF  # the envelope's last field is the signature
    return bytes(flipped)


def test_accepts_missions_cancels_and_announcements(
    mission: SignedMission, lead: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey
) -> None:
    validator = MissionRecordValidator(KEYS)
    mid = mission.mission_id
    announcement = rows_announcement(other, mid)
    good = [
        record(KEYS.missions, mid, mission.to_wire()),
        record(KEYS.missions, cancel_subkey(mid, peer_id(lead)), sign_cancel(mid, lead, reason="done")),
        # any key's cancel under its own subkey passes the DHT (it cannot know the lead); readers check the lead
        record(KEYS.missions, cancel_subkey(mid, peer_id(other)), sign_cancel(mid, other)),
        record(KEYS.mission_rows(mid), announcement.subkey, announcement.to_wire(other)),
        # not mission records: left to the other validators
        record(KEYS.peers, "QmSomePeer", b"anything"),
        record(KEYS.mission_shards(mid), "lease:1", b"anything"),
        record(DHTKeys("other").missions, mid, b"garbage"),  # another swarm's missions key
        record(KEYS.mission_rows(mid), "not-rows:x", b"garbage"),
        record("unrelated/key", "subkey", b"garbage"),
        DHTRecord(DHTID.generate(source="x").to_bytes(), b"\xc1", b"\xc1", get_dht_time() + 60),  # undecodable subkey
    ]
    for i, rec in enumerate(good):
        assert validator.validate(rec), f"record {i} refused"
    assert validator.rejected == 0


def test_refuses_forged_and_misplaced_records(
    mission: SignedMission, second: SignedMission, lead: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey
) -> None:
    validator = MissionRecordValidator(KEYS)
    mid, other_mid = mission.mission_id, second.mission_id
    announcement = rows_announcement(other, mid)
    bad = [
        record(KEYS.missions, other_mid, mission.to_wire()),  # a mission under another mission's id
        record(KEYS.missions, "my-mission", mission.to_wire()),  # ... or under any other subkey
        record(KEYS.missions, mid, flip_signature(mission.to_wire())),  # bad signature
        record(KEYS.missions, mid, b"\xc1garbage"),
        record(KEYS.missions, mid, "not bytes"),
        record(KEYS.missions, mid, b"\x00" * 30_000),  # oversized
        record(KEYS.missions, cancel_subkey(other_mid, peer_id(lead)), sign_cancel(mid, lead)),  # names another mission
        record(KEYS.missions, cancel_subkey(mid, peer_id(lead)), flip_signature(sign_cancel(mid, lead))),
        record(KEYS.missions, cancel_subkey(mid, peer_id(lead)), mission.to_wire()),  # a mission where a cancel belongs
        # a stranger's cancel under the lead's subkey: it could displace the lead's own
        record(KEYS.missions, cancel_subkey(mid, peer_id(lead)), sign_cancel(mid, other)),
        record(KEYS.missions, "cancel:" + mid, sign_cancel(mid, lead)),  # no signer in the subkey
        record(KEYS.missions, mid, sign_cancel(mid, lead)),  # a cancel where the mission belongs
        record(KEYS.missions, "lease:1", b"anything"),  # any other subkey under missions
        record(KEYS.missions, 7, mission.to_wire()),
        record(KEYS.missions, rows_subkey(peer_id(other)), announcement.to_wire(other)),
        record(KEYS.mission_rows(other_mid), announcement.subkey, announcement.to_wire(other)),  # another mission's
        record(KEYS.mission_shards(mid), announcement.subkey, announcement.to_wire(other)),  # another kind of key
        record(DHTKeys("other").mission_rows(mid), announcement.subkey, announcement.to_wire(other)),
        record(KEYS.mission_rows(mid), rows_subkey(peer_id(lead)), announcement.to_wire(other)),  # someone else's
        record(KEYS.mission_rows(mid), announcement.subkey, announcement.to_wire(lead)),  # signed by another key
        record(KEYS.mission_rows(mid), announcement.subkey, flip_signature(announcement.to_wire(other))),
        record(KEYS.mission_rows(mid), announcement.subkey, b"\xc1garbage"),
    ]
    for i, rec in enumerate(bad):
        assert not validator.validate(rec), f"forged record {i} accepted"
    assert validator.rejected == len(bad)
    # an undecodable value (not msgpack at the serializer's level) is refused, not raised
    raw = DHTRecord(DHTID.generate(source=KEYS.missions).to_bytes(), MSGPackSerializer.dumps(mid), b"\xc1", 0.0)
    assert not validator.validate(raw)
    assert validator.rejected == len(bad) + 1


def test_check_missions_entry(mission: SignedMission, lead: rsa.RSAPrivateKey) -> None:
    mid = mission.mission_id
    assert isinstance(check_missions_entry(mission.to_wire(), mid), SignedMission)
    cancel = check_missions_entry(sign_cancel(mid, lead, reason="why"), cancel_subkey(mid, peer_id(lead)))
    assert isinstance(cancel, CancelRecord) and cancel.reason == "why" and cancel.mission_id == mid
    assert open_any_cancel(sign_cancel(mid, lead), cancel_subkey(mid, peer_id(lead))).mission_id == mid
    with pytest.raises(RecordError, match="names mission"):
        check_missions_entry(sign_cancel(mid, lead), cancel_subkey("cd" * 32, peer_id(lead)))
    with pytest.raises(RecordError, match="subkey"):
        open_any_cancel(sign_cancel(mid, lead), cancel_subkey(mid, peer_id(lead)) + ":extra")
    with pytest.raises(RecordError, match="stored under"):
        check_missions_entry(mission.to_wire(), "cancel" + mid)
    with pytest.raises(RecordError):
        check_missions_entry(msgpack.packb({"b": b"", "k": b"", "s": b""}), mid)


def student(key: rsa.RSAPrivateKey, mission_id: str, **changes: Any) -> StudentRecord:
    fields: dict[str, Any] = {
        "mission_id": mission_id, "peer_id": peer_id(key), "name": "capitals", "epoch": 2, "manifest_sha256": "cd" * 32,
        "size": 1000, "base": "builtin:smollm2-135m", "architecture": "LlamaForCausalLM", "parameters": 1_000_000,
        "layers": 2, "tokenizer": "0123456789abcdef", "metrics": {"kl": 1.5, "top1": 0.4}, "published": 1000.0,
    } | changes  # fmt: skip
    return StudentRecord.model_validate(fields)


def test_published_students(mission: SignedMission, second: SignedMission, lead: rsa.RSAPrivateKey,
                            other: rsa.RSAPrivateKey) -> None:  # fmt: skip
    """Under ``<swarm>/students``: a student sealed by the peer it names, under its mission's id; whether that peer
    is the mission's lead needs the mission, which readers check (``garden.mission.students``)."""
    validator = MissionRecordValidator(KEYS)
    mid = mission.mission_id
    published = student(lead, mid)
    slot, theirs = f"{mid}:{peer_id(lead)}", student(other, mid)
    assert published.subkey == slot and published.model == f"mission:{mid}"
    assert StudentRecord.from_wire(published.to_wire(lead), slot) == published
    assert validator.validate(record(KEYS.students, slot, published.to_wire(lead)))
    # a stranger's record in its own slot passes the DHT (it cannot know the lead): readers drop it
    assert validator.validate(record(KEYS.students, theirs.subkey, theirs.to_wire(other)))
    bad = [
        record(KEYS.students, f"{second.mission_id}:{peer_id(lead)}", published.to_wire(lead)),  # another mission's
        record(KEYS.students, mid, published.to_wire(lead)),  # no publisher in the subkey
        record(KEYS.students, "capitals", published.to_wire(lead)),
        record(KEYS.students, slot, theirs.to_wire(other)),  # a stranger's record in the lead's slot
        record(KEYS.students, slot, published.to_wire(other)),  # sealed by another key than the one it names
        record(KEYS.students, slot, flip_signature(published.to_wire(lead))),
        record(KEYS.students, slot, b"\xc1garbage"),
        record(KEYS.students, slot, mission.to_wire()),  # a mission where a student belongs
    ]
    for i, rec in enumerate(bad):
        assert not validator.validate(rec), f"forged student record {i} accepted"
    assert validator.rejected == len(bad)
    too_many = {str(i): 1.0 for i in range(17)}
    for changes in ({"parameters": 0}, {"layers": 5000}, {"name": "Bad Name"}, {"metrics": too_many}):
        with pytest.raises(ValueError):
            student(lead, mid, **changes)


def test_index_heads_are_signed_by_the_lead_they_name_and_fresh(lead: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey,
                                                                mission: SignedMission, second: SignedMission) -> None:
    """A head is a lead's own word on its entries: a stranger cannot sign one for it, nor keep one for long."""
    validator, now = MissionRecordValidator(KEYS), get_dht_time()
    ids = [mission.mission_id, second.mission_id]
    raw = sign_index_head(lead, ids, [second.mission_id], now)
    head = open_index_head(raw, peer_id(lead), now + 600, now)
    assert head.lead == peer_id(lead) and head.missions == 2
    # the digest is the set's, in any order; a cancel changes it
    assert head.digest == index_digest(ids[::-1], [second.mission_id]) != index_digest(ids, [])
    assert validator.validate(record(KEYS.mission_heads, peer_id(lead), raw, now + 600))

    refused = {
        "another's head under the lead's subkey": (peer_id(lead), sign_index_head(other, ids, [], now), now + 600),
        "the lead's head under another subkey": (peer_id(other), raw, now + 600),
        "a head that would live a day": (peer_id(lead), raw, now + 24 * 3600),
        "a head from the past": (peer_id(lead), sign_index_head(lead, ids, [], now - 3 * 3600), now + 600),
        "garbage": (peer_id(lead), b"\x00" * 64, now + 600),
        "oversized": (peer_id(lead), b"\x00" * (64 * 1024), now + 600),
    }
    for what, (subkey, value, expiration) in refused.items():
        with pytest.raises(RecordError):
            open_index_head(value, subkey, expiration, now)
        assert not validator.validate(record(KEYS.mission_heads, subkey, value, expiration)), what
    assert validator.rejected == len(refused)
    # a head names its signer inside too: a body naming another lead is refused even when the envelope is right
    body = IndexHead(lead=peer_id(other), missions=0, digest=index_digest([], []), announced_at=now)
    forged = seal(canonical_msgpack(body.model_dump(mode="python")), lead)
    with pytest.raises(RecordError, match="names lead"):
        open_index_head(forged, peer_id(lead), now + 600, now)


def test_a_mission_or_head_checked_once_is_not_checked_again_and_a_forgery_always_is(
    draft: Any, lead: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every answer a search of ``missions`` gets carries every open mission, and hivemind validates each record
    of each: the same bytes are verified and their spec validated once (OPENED_MISSIONS); a forgery, a size
    over the cap and a head gone stale are refused every time."""
    from garden.protocol.mission_spec import MissionSpec

    verified: list[bytes] = []
    specs: list[bytes] = []
    verify, from_canonical = signing.verify, MissionSpec.from_canonical.__func__  # type: ignore[attr-defined]

    def counting_verify(public_key: bytes, body: bytes, signature: bytes) -> bool:
        verified.append(body)
        return verify(public_key, body, signature)

    def counting_spec(cls: type[MissionSpec], raw: bytes) -> MissionSpec:
        specs.append(raw)
        return from_canonical(cls, raw)

    monkeypatch.setattr(signing, "verify", counting_verify)
    monkeypatch.setattr(MissionSpec, "from_canonical", classmethod(counting_spec))
    validator, now = MissionRecordValidator(KEYS), get_dht_time()
    fresh = sign_mission(draft, lead, now=now + 0.25)  # bytes no other test opened
    assert (len(verified), len(specs)) == (1, 1)  # signing checks what it made
    raw = fresh.to_wire()
    for _ in range(3):
        assert validator.validate(record(KEYS.missions, fresh.mission_id, bytes(raw)))
    assert SignedMission.from_record(bytes(raw), fresh.mission_id) == fresh
    assert (len(verified), len(specs)) == (1, 1)
    # under another id: refused each time, though its signature is not checked again
    for _ in range(2):
        assert not validator.validate(record(KEYS.missions, "0" * 64, raw))
    flipped = msgpack.unpackb(raw)
    flipped["s"] = bytes([flipped["s"][0] ^ 1]) + flipped["s"][1:]
    forged = msgpack.packb(flipped, use_bin_type=True)
    for _ in range(2):
        assert not validator.validate(record(KEYS.missions, fresh.mission_id, forged))
    assert len(verified) == 3  # the forgery, both times
    assert not validator.validate(record(KEYS.missions, fresh.mission_id, raw + b"\0" * (20 * 1024)))
    assert validator.rejected == 5

    head = sign_index_head(lead, [fresh.mission_id], [], now)
    checked = len(verified)
    for _ in range(3):
        assert validator.validate(record(KEYS.mission_heads, peer_id(lead), bytes(head), now + 600))
    assert len(verified) == checked + 1
    # the signature is remembered, not the freshness: the same bytes claiming to live a day are refused
    assert not validator.validate(record(KEYS.mission_heads, peer_id(lead), head, now + 24 * 3600))
    with pytest.raises(RecordError, match="claims to live"):
        open_index_head(head, peer_id(lead), now + 24 * 3600, now)
