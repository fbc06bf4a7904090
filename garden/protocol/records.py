"""DHT records: strict schemas, msgpack encoding, and the signed envelope they travel in.

Every value a peer reads from the DHT came from a stranger. Decoding is therefore bounded (size cap
before msgpack sees the bytes), strict (no coercion: a float where an int belongs is an error), and
raises only ``RecordError``, which callers log and drop. Unknown fields are ignored, so a newer peer
can add fields without older peers dropping its records.
"""

from __future__ import annotations

import functools

from collections.abc import Callable

from typing import Any, Literal, TypeVar

import msgpack
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from garden.protocol import signing

PROTOCOL_VERSION = 1
"""Version of the record formats. Bumped only by an incompatible change; fields are added freely."""
MIN_PROTOCOL_VERSION = 1
"""Oldest version this garden still reads. A record outside [MIN, PROTOCOL_VERSION] is ignored
(``IncompatibleVersionError``) with one log line per peer, and ``garden status`` tells the owner."""

MAX_PEER_RECORD_BYTES = 16 * 1024
"""A signed peer record is ~1 KiB; anything much larger is garbage or an attack."""

MAX_SIGNED_BODY_BYTES = 64 * 1024
"""Largest body any signed record carries (a rows announcement); each record type caps its own, smaller."""

MAX_RECORD_TTL = 2 * 3600.0
"""Longest life a peer record may claim: twice the longest allowed announce period (1 h)."""
MAX_CLOCK_SKEW = 120.0
"""Seconds a peer's clock may run ahead of ours before its records count as forged."""

Role = Literal["shaker", "trainer", "server"]
ALL_ROLES: tuple[Role, ...] = ("shaker", "trainer", "server")
PeerState = Literal["online", "offline"]
"""``online``: announced and working. ``offline``: the peer's goodbye on a clean stop; readers drop
it at once instead of waiting for the record to expire."""


class RecordError(ValueError):
    """A DHT value that is not a valid record; the message says why (for the log line)."""


class IncompatibleVersionError(RecordError):
    """A well-signed record in a protocol version this garden does not speak."""

    def __init__(self, peer_id: str, version: int):
        newer = version > PROTOCOL_VERSION
        super().__init__(
            f"peer {peer_id} speaks protocol v{version}, this garden v{PROTOCOL_VERSION}: "
            + ("upgrade garden to work with it" if newer else "it runs an old garden and must upgrade")
        )
        self.peer_id, self.version, self.newer = peer_id, version, newer


class StrictRecord(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, allow_inf_nan=False)


class GpuInfo(StrictRecord):
    name: str = Field(max_length=200)
    memory_bytes: int = Field(ge=0)


class ContributionTotals(StrictRecord):
    """What a peer gave, in all (``garden.host.contribution``); announced so a lead sees who helped."""

    rows_shaken: int = Field(0, ge=0)
    shards_shaken: int = Field(0, ge=0)
    samples_trained: int = Field(0, ge=0)
    tokens_served: int = Field(0, ge=0)
    hours_online: float = Field(0.0, ge=0.0)


class PeerInfo(StrictRecord):
    """What a peer announces about itself under ``<swarm>/peers``, subkey = its peer id."""

    v: int = Field(default=PROTOCOL_VERSION, ge=1)
    peer_id: str = Field(min_length=1, max_length=128)
    version: str = Field(max_length=64)
    state: PeerState = "online"
    roles: list[Role] = Field(max_length=len(ALL_ROLES))
    cores: int = Field(ge=1, le=65536)
    ram_bytes: int = Field(ge=0)
    gpu: GpuInfo | None = None
    load: float = Field(ge=0.0, le=1.0, description="machine CPU utilisation over the last period, 0..1")
    addresses: list[str] = Field(default_factory=list, max_length=32)
    client_mode: bool = False
    reachability: Literal["public", "private", "unknown"] = Field(
        "unknown", description="whether others can dial it (private: through a relay, or not at all in client mode)"
    )
    announced_at: float = Field(ge=0.0, description="DHT time (seconds since the epoch) of this announce")
    paused: bool = Field(False, description="its owner paused it: it relays and may serve, but takes no work")
    working: str = Field("", max_length=200, description="what it does now, in words (working, paused, waiting: ...)")
    contribution: ContributionTotals | None = None

    def to_wire(self, private_key: rsa.RSAPrivateKey) -> bytes:
        """msgpack body sealed in an envelope signed with the peer's identity key."""
        return seal(msgpack.packb(self.model_dump(mode="python"), use_bin_type=True), private_key)

    @classmethod
    def from_wire(cls, raw: Any, subkey: Any) -> PeerInfo:
        """Decode and verify a value read under ``peers``; raises ``RecordError`` with the reason."""
        if not isinstance(subkey, str):
            raise RecordError(f"subkey is {type(subkey).__name__}, not a peer id string")
        body, signer = open_sealed(raw, max_bytes=MAX_PEER_RECORD_BYTES)
        if signer != subkey:
            raise RecordError(f"signed by {signer}, stored under {subkey}")
        info = cls._from_body(body)
        if info.peer_id != subkey:
            raise RecordError(f"record names peer {info.peer_id!r}, stored under {subkey}")
        return info

    def check_fresh(self, expiration_time: float, now: float) -> None:
        check_fresh(self.announced_at, expiration_time, now)

    @classmethod
    def _from_body(cls, body: bytes) -> PeerInfo:
        _check_version(body)
        return decode_record(cls, body, "body")


class SignedRecord(StrictRecord):
    """The envelope: ``b`` the msgpack body, ``k`` the signer's DER public key, ``s`` the signature."""

    b: bytes = Field(max_length=MAX_SIGNED_BODY_BYTES)
    k: bytes = Field(max_length=signing.MAX_PUBLIC_KEY_BYTES)
    s: bytes = Field(max_length=1024)


RecordT = TypeVar("RecordT", bound=BaseModel)


def decode_record(
    model: type[RecordT], raw: bytes, what: str, describe: Callable[[ValidationError], str] | None = None
) -> RecordT:
    """A msgpack map validated strictly as ``model``; raises only ``RecordError``, naming ``what`` and the
    failing field (``describe`` words it; default :func:`first_error`). Callers cap ``raw``'s size first:
    msgpack's own limits scale with the input."""
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise RecordError(f"{what} is not msgpack: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{what} is a {type(obj).__name__}, not a map")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise RecordError(f"{what} schema: {(describe or first_error)(e)}") from None


def _check_version(body: bytes) -> None:
    """Look at ``v`` before the schema: a newer protocol may have changed any other field."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:
        return  # decode_record says what is wrong
    if isinstance(obj, dict):
        version, peer_id = obj.get("v", PROTOCOL_VERSION), obj.get("peer_id")
        if type(version) is int and not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
            raise IncompatibleVersionError(str(peer_id)[:128], version)


def seal(body: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    envelope = SignedRecord(b=body, k=signing.public_key_der(private_key), s=signing.sign(private_key, body))
    return msgpack.packb(envelope.model_dump(), use_bin_type=True)


OPENED_CACHE = 2048
"""Sealed records whose signature was checked, remembered by their bytes: hivemind validates every record of every
answer a DHT search gets, and a shard board or the peer directory is read from several nodes every few seconds, so
the same few hundred records would otherwise be verified over and over (at 50 peers on one machine, most of the
CPU). A success only: a forgery is checked again each time it comes."""


def open_sealed(raw: Any, max_bytes: int) -> tuple[bytes, str]:
    """Check size, shape and signature; return (body, signer's peer id)."""
    if not isinstance(raw, bytes):
        raise RecordError(f"value is {type(raw).__name__}, not bytes")
    if len(raw) > max_bytes:
        raise RecordError(f"value is {len(raw)} bytes, over the {max_bytes}-byte cap")
    return _open_checked(raw)


@functools.lru_cache(maxsize=OPENED_CACHE)
def _open_checked(raw: bytes) -> tuple[bytes, str]:
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        envelope = SignedRecord.model_validate(obj)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise RecordError(f"not a signed envelope: {first_error(e)}") from None
    if not signing.verify(envelope.k, envelope.b, envelope.s):
        raise RecordError("bad signature")
    return envelope.b, signing.peer_id_of(envelope.k)


def check_fresh(announced_at: float, expiration_time: float, now: float) -> None:
    """Refuse an announcement that claims to live too long, is stale, or comes from the future: a
    self-signed record is still a lie if it would keep a dead peer listed for days."""
    if announced_at > now + MAX_CLOCK_SKEW:
        raise RecordError(f"announced {announced_at - now:.0f} s in the future")
    if now - announced_at > MAX_RECORD_TTL:
        raise RecordError(f"stale: announced {now - announced_at:.0f} s ago")
    if expiration_time - announced_at > MAX_RECORD_TTL + MAX_CLOCK_SKEW:
        raise RecordError(f"claims to live {expiration_time - announced_at:.0f} s, over {MAX_RECORD_TTL:.0f}")


def first_error(e: Exception) -> str:
    """The first problem of a validation error, as ``field.path: message`` (for one log line)."""
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}"[:300]
    return str(e)[:200]
