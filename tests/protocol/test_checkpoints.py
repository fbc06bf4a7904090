"""Checkpoint records (``m/<id>/ckpt``): sealed by their holder, stored under ``<epoch>:<holder>``, listing only
safe relative paths; anything else is refused with the reason."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from garden.protocol import signing
from garden.protocol.checkpoints import CheckpointFile, CheckpointRecord
from garden.protocol.records import RecordError, seal

MISSION = "ab" * 32
SHA = "cd" * 32


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # small: the tests only need speed


@pytest.fixture(scope="module")
def other() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def record(key: rsa.RSAPrivateKey, **changes: Any) -> CheckpointRecord:
    fields: dict[str, Any] = {
        "mission_id": MISSION, "epoch": 4, "peer_id": signing.peer_id_of(signing.public_key_der(key)),
        "files": [{"path": "model/model.safetensors", "size": 10, "sha256": SHA},
                  {"path": "adapter/adapter_config.json", "size": 2, "sha256": SHA}],
        "metrics": {"loss": 1.5}, "created": 1000.0,
    } | changes  # fmt: skip
    return CheckpointRecord.model_validate(fields)


def test_round_trip(key: rsa.RSAPrivateKey) -> None:
    good = record(key)
    back = CheckpointRecord.from_wire(good.to_wire(key), good.subkey)
    assert back == good and back.size == 12 and back.subkey == f"4:{good.peer_id}"
    assert back.file("model/model.safetensors") is not None and back.file("model/x") is None


@pytest.mark.parametrize(
    "path", ["model/../etc/passwd", "/etc/passwd", "other/x", "model/a/b", "model/", "model/.hidden", "model"]
)
def test_unsafe_paths_are_refused(key: rsa.RSAPrivateKey, path: str) -> None:
    with pytest.raises(ValidationError):
        CheckpointFile(path=path, size=1, sha256=SHA)


def test_refusals(key: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey) -> None:
    good = record(key)
    with pytest.raises(ValidationError, match="listed twice"):
        record(key, files=[{"path": "model/a", "size": 1, "sha256": SHA}] * 2)
    with pytest.raises(ValidationError, match="nothing to load"):
        record(key, files=[{"path": "adapter/a", "size": 1, "sha256": SHA}])
    with pytest.raises(RecordError, match="belongs under"):  # replayed as another epoch
        CheckpointRecord.from_wire(good.to_wire(key), f"5:{good.peer_id}")
    with pytest.raises(RecordError, match="is not <epoch>:<peer id>"):
        CheckpointRecord.from_wire(good.to_wire(key), "lease:4")
    with pytest.raises(RecordError, match="signed by"):  # a stranger publishing in the holder's name
        CheckpointRecord.from_wire(good.to_wire(other), good.subkey)
    body = msgpack.packb(good.model_dump(mode="python"), use_bin_type=True)
    forged = msgpack.unpackb(good.to_wire(key))
    forged["b"] = body.replace(b"loss", b"lose")
    with pytest.raises(RecordError, match="bad signature"):
        CheckpointRecord.from_wire(msgpack.packb(forged, use_bin_type=True), good.subkey)
    for garbage in (b"\\x00junk", 12, None, b"\\x00" * 20_000, seal(b"not msgpack", key)):
        with pytest.raises(RecordError):
            CheckpointRecord.from_wire(garbage, good.subkey)



def test_a_vouch_names_one_manifest_and_its_voucher(key: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey) -> None:
    from garden.mission.checkpoints import Catalog
    from garden.protocol.checkpoints import CheckpointVouch

    held = record(key)
    # the manifest is the files, whatever order a holder lists them in; another file's hash is another manifest
    assert record(key, files=list(reversed(held.model_dump()["files"]))).manifest_sha256 == held.manifest_sha256
    changed = record(key, files=[{"path": "model/model.safetensors", "size": 10, "sha256": "ef" * 32}])
    assert changed.manifest_sha256 != held.manifest_sha256
    voucher = signing.peer_id_of(signing.public_key_der(other))
    vouch = CheckpointVouch(mission_id=MISSION, epoch=4, peer_id=voucher, manifest_sha256=held.manifest_sha256,
                            metrics={"kl": 0.5}, created=1000.0)  # fmt: skip
    assert vouch.subkey == f"vouch:4:{voucher}"
    assert CheckpointVouch.from_wire(vouch.to_wire(other), vouch.subkey) == vouch
    assert vouch.vouches_for(held) and not vouch.vouches_for(changed)
    for raw, subkey, why in [
        (vouch.to_wire(key), vouch.subkey, "signed by"),  # in the lead's name, by someone else
        (vouch.to_wire(other), f"vouch:5:{voucher}", "belongs under"),  # replayed for another epoch
        (vouch.to_wire(other), f"4:{voucher}", "vouch:"),
        (b"\xc1", vouch.subkey, ""),
    ]:
        with pytest.raises(RecordError, match=why):
            CheckpointVouch.from_wire(raw, subkey)
    # a catalog counts a vouch only from a trusted voucher, and only for files some holder announces
    catalog = Catalog(records=[held], vouches=[vouch])
    assert catalog.vouched({voucher}) == {4: vouch} and catalog.vouched({"QmSomeoneElse"}) == {}
    assert Catalog(records=[changed], vouches=[vouch]).vouched({voucher}) == {}
