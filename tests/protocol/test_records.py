"""Peer records: strict schema, signed envelope, every malformed value rejected with a reason."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from garden.protocol import signing
from garden.protocol.keys import DHTKeys
from garden.protocol.records import MAX_PEER_RECORD_BYTES, PeerInfo, RecordError, open_sealed, seal


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def peer_id(key: rsa.RSAPrivateKey) -> str:
    return signing.peer_id_of(signing.public_key_der(key))


def good_body(key: rsa.RSAPrivateKey, **changes: Any) -> dict[str, Any]:
    body = dict(
        v=1, peer_id=peer_id(key), version="0.1.0", state="online", roles=["shaker", "server"], cores=4,
        ram_bytes=8 << 30, gpu={"name": "RTX 3060", "memory_bytes": 12 << 30}, load=0.25,
        addresses=["/ip4/127.0.0.1/tcp/1/p2p/x"], client_mode=False, announced_at=time.time(),
    )  # fmt: skip
    body.update(changes)
    return body


def sealed(key: rsa.RSAPrivateKey, body: Any) -> bytes:
    return seal(msgpack.packb(body, use_bin_type=True), key)


def test_round_trip(key: rsa.RSAPrivateKey) -> None:
    info = PeerInfo.model_validate(good_body(key))
    decoded = PeerInfo.from_wire(info.to_wire(key), info.peer_id)
    assert decoded == info
    assert decoded.gpu is not None and decoded.gpu.name == "RTX 3060"


def test_unknown_fields_are_ignored_for_forward_compatibility(key: rsa.RSAPrivateKey) -> None:
    raw = sealed(key, good_body(key, future_field={"anything": 1}))
    assert PeerInfo.from_wire(raw, peer_id(key)).peer_id == peer_id(key)


@pytest.mark.parametrize(
    "changes",
    [
        {"cores": 2.0},  # float for int
        {"cores": "2"},  # str for int
        {"cores": True},  # bool for int
        {"cores": 0},  # out of range
        {"load": 1.5},
        {"load": float("nan")},
        {"ram_bytes": -1},
        {"roles": ["shaker", "cook"]},  # unknown role
        {"roles": "shaker"},  # str for list
        {"roles": {"shaker": 1}},  # dict for list
        {"state": "sleeping"},
        {"gpu": {"name": "x"}},  # missing field
        {"gpu": [1, 2]},  # list for dict
        {"addresses": ["a"] * 1000},  # too many
        {"peer_id": ""},
        {"v": "2"},
        {"announced_at": "yesterday"},
    ],
)
def test_schema_violations_are_rejected(key: rsa.RSAPrivateKey, changes: dict[str, Any]) -> None:
    with pytest.raises(RecordError, match="schema"):
        PeerInfo.from_wire(sealed(key, good_body(key, **changes)), peer_id(key))


@pytest.mark.parametrize(("version", "newer"), [(0, False), (2, True), (99, True)])
def test_another_protocol_version_is_told_apart_from_garbage(key: rsa.RSAPrivateKey, version: int, newer: bool) -> None:
    """Checked before the schema: a newer protocol may have changed any other field."""
    from garden.protocol.records import IncompatibleVersionError

    body = good_body(key, v=version, cores="many", brand_new={"x": 1})
    with pytest.raises(IncompatibleVersionError) as caught:
        PeerInfo.from_wire(sealed(key, body), peer_id(key))
    assert caught.value.version == version and caught.value.newer is newer
    assert caught.value.peer_id == peer_id(key)
    assert ("upgrade garden" in str(caught.value)) is newer


def test_this_versions_new_fields_are_optional(key: rsa.RSAPrivateKey) -> None:
    """Records of peers before contribution and pause were announced still read."""
    info = PeerInfo.from_wire(sealed(key, good_body(key)), peer_id(key))
    assert info.paused is False and info.contribution is None and info.working == ""


@pytest.mark.parametrize(
    "raw, reason",
    [
        (None, "not bytes"),
        (42, "not bytes"),
        ({"peer_id": "x"}, "not bytes"),
        ("text", "not bytes"),
        (b"\xc1\xff garbage", "not a signed envelope"),
        (msgpack.packb([1, 2, 3]), "not a signed envelope"),
        (msgpack.packb({"b": b"x", "k": b"y"}), "not a signed envelope"),
        (b"\x00" * (MAX_PEER_RECORD_BYTES + 1), "over the"),
        (b"\x92" * 100_000, "over the"),
    ],
)
def test_garbage_values_are_rejected(key: rsa.RSAPrivateKey, raw: Any, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        PeerInfo.from_wire(raw, peer_id(key))


def test_body_that_is_not_a_map_is_rejected(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(RecordError, match="not a map"):
        PeerInfo.from_wire(sealed(key, [1, 2]), peer_id(key))
    with pytest.raises(RecordError, match="not msgpack"):
        PeerInfo.from_wire(seal(b"\xc1", key), peer_id(key))


def test_record_signed_by_another_peer_is_rejected(key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey) -> None:
    """A peer cannot publish a record under someone else's id, even one naming that id."""
    forged = sealed(other_key, good_body(key))  # body names `key`'s peer, signed by another key
    with pytest.raises(RecordError, match="signed by"):
        PeerInfo.from_wire(forged, peer_id(key))


def test_record_naming_another_peer_is_rejected(key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey) -> None:
    raw = sealed(key, good_body(key, peer_id=peer_id(other_key)))
    with pytest.raises(RecordError, match="names peer"):
        PeerInfo.from_wire(raw, peer_id(key))


def test_tampered_body_fails_the_signature(key: rsa.RSAPrivateKey) -> None:
    envelope = msgpack.unpackb(sealed(key, good_body(key)))
    envelope["b"] = msgpack.packb(good_body(key, cores=64))
    with pytest.raises(RecordError, match="bad signature"):
        PeerInfo.from_wire(msgpack.packb(envelope, use_bin_type=True), peer_id(key))


def test_a_signature_checked_once_is_not_checked_again_and_a_forgery_always_is(
    key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hivemind validates every record of every search answer: the same bytes verify once (OPENED_CACHE)."""
    checks: list[bytes] = []
    verify = signing.verify

    def counting(public_key: bytes, body: bytes, signature: bytes) -> bool:
        checks.append(body)
        return verify(public_key, body, signature)

    monkeypatch.setattr(signing, "verify", counting)
    raw = sealed(key, good_body(key, announced_at=time.time() + 0.5))  # bytes no other test opened
    first = PeerInfo.from_wire(raw, peer_id(key))
    assert PeerInfo.from_wire(bytes(raw), peer_id(key)) == first and len(checks) == 1  # equal bytes, checked once
    with pytest.raises(RecordError, match="over the"):  # the size cap holds before the cache is asked
        open_sealed(raw, max_bytes=len(raw) - 1)
    envelope = msgpack.unpackb(raw)
    envelope["b"] = msgpack.packb(good_body(key, cores=64))
    forged = msgpack.packb(envelope, use_bin_type=True)
    for _ in range(2):
        with pytest.raises(RecordError, match="bad signature"):
            PeerInfo.from_wire(forged, peer_id(key))
    assert len(checks) == 3  # the forgery was checked both times


def test_non_string_subkey_is_rejected(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(RecordError, match="subkey"):
        PeerInfo.from_wire(sealed(key, good_body(key)), 12345)


def test_peer_id_matches_hivemind(key: rsa.RSAPrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2

    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    identity = crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    assert PeerID.from_identity(identity).to_base58() == peer_id(key)


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 65, "tab\there"])
def test_swarm_names_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="swarm name"):
        DHTKeys(bad)


def test_dht_validator_accepts_only_valid_records_under_peers(key: rsa.RSAPrivateKey) -> None:
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer

    from garden.protocol.validators import PeerRecordValidator

    keys = DHTKeys("test")
    validator = PeerRecordValidator(keys)
    peers_key = DHTID.generate(source=keys.peers).to_bytes()
    other_key = DHTID.generate(source="test/other").to_bytes()
    good = PeerInfo.model_validate(good_body(key)).to_wire(key)

    def record(dht_key: bytes, subkey: Any, value: Any) -> DHTRecord:
        return DHTRecord(dht_key, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), time.time() + 10)

    assert validator.validate(record(peers_key, peer_id(key), good))
    assert not validator.validate(record(peers_key, "QmSomeoneElse", good))
    assert not validator.validate(record(peers_key, peer_id(key), b"garbage"))
    assert not validator.validate(record(peers_key, peer_id(key), {"dict": "value"}))
    assert not validator.validate(DHTRecord(peers_key, b"\xc1", b"\xc1", time.time() + 10))  # undecodable
    assert validator.validate(record(other_key, "any", "thing"))  # other keys are not its business


@pytest.mark.parametrize(
    "announced_delta, lifetime, reason",
    [(-3 * 3600, 60, "stale"), (3600, 60, "in the future"), (0, 30 * 24 * 3600, "claims to live")],
)
def test_stale_future_and_immortal_records_are_refused(
    key: rsa.RSAPrivateKey, announced_delta: float, lifetime: float, reason: str
) -> None:
    now = time.time()
    info = PeerInfo.model_validate(good_body(key, announced_at=now + announced_delta))
    with pytest.raises(RecordError, match=reason):
        info.check_fresh(now + announced_delta + lifetime, now)


def test_fresh_record_passes(key: rsa.RSAPrivateKey) -> None:
    now = time.time()
    PeerInfo.model_validate(good_body(key, announced_at=now - 5)).check_fresh(now + 55, now)
