"""Missions: the mission file with its prompts, shards and per-prompt seeds, and the signed identity.

The spec's schema is ``garden.protocol.mission_spec``. The lead signs the spec together with the hash of
its prompt list with its libp2p identity key (``garden.protocol.signing``); the mission id is the sha256
of exactly the signed bytes, so nothing signed can change without changing the id, and no one but the
lead can produce a valid mission or cancel it. Wire format, sizes and rules: docs/missions.md.

This module imports nothing of garden outside ``garden.protocol``: the built-in prompt sets live in
``garden.data``, so :func:`load_mission_toml` takes them as a mapping from the caller.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import msgpack
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import Field, StringConstraints, ValidationError

from garden.protocol import signing
from garden.protocol.mission_spec import (
    MAX_SPEC_BYTES,
    MissionSpec,
    MissionSpecError,
    canonical_msgpack,
    describe_spec_error,
)
from garden.protocol.records import RecordError, SignedRecord, StrictRecord, check_fresh, decode_record, seal
from garden.protocol.rows import PromptRow, read_prompts_jsonl

MISSION_VERSION = 1
"""Version of the signed mission body (``v``). Fields may be added (older peers ignore them); bump on an
incompatible change."""
MAX_MISSION_RECORD_BYTES = 20 * 1024
"""Cap on a signed mission on the wire: 16 KiB body + key + signature + envelope overhead, rounded up."""
MAX_CANCEL_RECORD_BYTES = 4 * 1024
"""Cap on a signed cancel (~0.7 KiB with a 2048-bit key)."""
MAX_INDEX_HEAD_BYTES = 4 * 1024
"""Cap on a signed index head (~0.7 KiB with a 2048-bit key)."""
MAX_MISSION_PROMPTS = 1_000_000
"""Most prompts in one mission: the list is hashed and shipped whole."""
_MISSION_ID_PATTERN = r"^[0-9a-f]{64}$"
_SHA256_PATTERN = r"^[0-9a-f]{64}$"
_BUILTIN = "builtin:"
CANCEL_PREFIX = "cancel:"

MissionId = Annotated[str, StringConstraints(pattern=_MISSION_ID_PATTERN)]
"""sha256 hex (lowercase) of a mission's signed body."""
# --- the mission file and its prompts -----------------------------------------------------------------

BuiltinPrompts = Mapping[str, Callable[[], Sequence[PromptRow]]]
"""Built-in prompt sets by full name, e.g. ``{garden.data.DEMO_PROMPTS: garden.data.demo_prompts}``."""


def prompts_sha256(prompts: Sequence[PromptRow]) -> str:
    """sha256 hex of the canonical msgpack of the prompt list (every field of every row, maps sorted).
    Order matters: shards are slices of this list."""
    return hashlib.sha256(canonical_msgpack([p.model_dump(mode="python") for p in prompts])).hexdigest()


def pack_prompts(prompts: Sequence[PromptRow]) -> bytes:
    """The prompt list as it travels between peers; its sha256 is :func:`prompts_sha256`."""
    return canonical_msgpack([p.model_dump(mode="python") for p in prompts])


def unpack_prompts(raw: Any, mission: SignedMission, max_bytes: int = 256 * 1024 * 1024) -> tuple[PromptRow, ...]:
    """A prompt list from a stranger, decoded strictly and checked against what the lead signed;
    raises only ``RecordError``."""
    if not isinstance(raw, bytes):
        raise RecordError(f"prompts are {type(raw).__name__}, not bytes")
    if len(raw) > max_bytes:
        raise RecordError(f"prompts are {len(raw)} bytes, over the {max_bytes}-byte cap")
    try:
        items = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_array_len=MAX_MISSION_PROMPTS)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise RecordError(f"prompts are not msgpack: {str(e)[:200]}") from None
    if not isinstance(items, list):
        raise RecordError("prompts are not a list")
    try:
        prompts = tuple(PromptRow.model_validate(item) for item in items)
    except ValidationError as e:
        raise RecordError(f"prompts: {str(e).splitlines()[0][:200]}") from None
    verify_prompts(mission, prompts)
    return prompts


def count_shards(prompts_count: int, shard_size: int) -> int:
    return -(-prompts_count // shard_size)


def shard_prompts(prompts: Sequence[PromptRow], shard_size: int) -> list[list[PromptRow]]:
    """Shard ``i`` is ``prompts[i * shard_size : (i + 1) * shard_size]``; the last may be shorter."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    return [list(prompts[i : i + shard_size]) for i in range(0, len(prompts), shard_size)]


def prompt_seed(mission_id: str, prompt: PromptRow) -> int:
    """The sampling seed of one prompt in one mission: the first 8 bytes of
    sha256(mission id (ASCII hex) + canonical msgpack of the prompt row), big-endian, mod 2**63.

    It depends on nothing else (not the shard, the peer or the batch), so a shard that is re-sampled after
    its peer vanished mostly reproduces the same candidates, and the rows, being content-addressed, are
    not duplicated. "Mostly": batching and hardware still change floating-point results."""
    if not re.fullmatch(_MISSION_ID_PATTERN, mission_id):
        raise ValueError(f"mission id must be 64 lowercase hex characters, got {mission_id[:80]!r}")
    digest = hashlib.sha256(mission_id.encode("ascii") + canonical_msgpack(prompt.model_dump(mode="python"))).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


@dataclass(frozen=True)
class MissionDraft:
    """A validated spec and its prompts, ready to sign (:func:`sign_mission`).

    :param source: the TOML file it came from, for messages (None when built in code)
    """

    spec: MissionSpec
    prompts: tuple[PromptRow, ...]
    source: Path | None = None

    def __post_init__(self) -> None:
        where = f"{self.source}: " if self.source else ""
        if not self.prompts:
            raise MissionSpecError(f"{where}prompts: no prompts")
        if len(self.prompts) > MAX_MISSION_PROMPTS:
            raise MissionSpecError(f"{where}prompts: {len(self.prompts)} prompts, over {MAX_MISSION_PROMPTS}")
        if self.spec.judge.kind == "reference":  # ReferenceJudge refuses such a prompt: say so before signing
            for i, p in enumerate(self.prompts, start=1):
                if p.reference is None or not p.reference.strip():
                    raise MissionSpecError(
                        f"{where}judge.kind: 'reference' needs a reference answer on every prompt; "
                        f"prompt {i} ({p.prompt[:60]!r}) has none"
                    )

    @cached_property
    def prompts_sha256(self) -> str:
        return prompts_sha256(self.prompts)

    @property
    def shard_count(self) -> int:
        return count_shards(len(self.prompts), self.spec.shard_size)


def load_mission_toml(
    path: Path | str, builtin_prompts: BuiltinPrompts | None = None, prompts: Sequence[PromptRow] | None = None
) -> MissionDraft:
    """Read, validate and resolve a mission file; raises only ``MissionSpecError``, naming the file and key.

    ``prompts`` is a JSONL file of prompt rows (a relative path is relative to the TOML file, not to the
    working directory) or the name of a built-in set, looked up in ``builtin_prompts``. Given ``prompts`` (the
    owner's feedback), those are the mission's and the file's ``prompts`` key says ``feedback``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise MissionSpecError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise MissionSpecError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise MissionSpecError(f"{path}: not UTF-8: {e.reason}") from None
    if prompts is not None:
        data["prompts"] = FEEDBACK_PROMPTS
    try:
        spec = MissionSpec.model_validate(data)
    except ValidationError as e:
        raise MissionSpecError(f"{path}: {describe_spec_error(e)}") from None
    if prompts is not None:
        if not prompts:
            raise MissionSpecError(f"{path}: no prompts: the feedback holds no accepted or edited answer")
        return MissionDraft(spec=spec, prompts=tuple(prompts), source=path)
    return MissionDraft(spec=spec, prompts=tuple(_resolve_prompts(path, spec.prompts, builtin_prompts)), source=path)


FEEDBACK_PROMPTS = "feedback"
"""A mission's ``prompts`` when they are its lead's feedback (``garden mission create --from-feedback``)."""


def _resolve_prompts(toml_path: Path, ref: str, builtin: BuiltinPrompts | None) -> Sequence[PromptRow]:
    if ref.startswith(_BUILTIN):
        known = dict(builtin or {})
        if ref not in known:
            names = ", ".join(sorted(known)) or "none given"
            raise MissionSpecError(f"{toml_path}: prompts: unknown built-in prompt set {ref!r}; built-in: {names}")
        rows = known[ref]()
        if not rows:
            raise MissionSpecError(f"{toml_path}: prompts: the built-in set {ref!r} is empty")
        return rows
    written = Path(ref).expanduser()
    prompts_path = written if written.is_absolute() else toml_path.parent / written
    try:
        return read_prompts_jsonl(prompts_path)
    except OSError as e:
        raise MissionSpecError(f"{toml_path}: prompts: cannot read {prompts_path}: {e.strerror or e}") from None
    except ValueError as e:  # names the prompts file and line already
        raise MissionSpecError(f"{toml_path}: prompts: {e}") from None


# --- the signed mission ------------------------------------------------------------------------------


class MissionBody(StrictRecord):
    """The bytes the lead signs. Unknown fields are ignored (added by newer peers); the embedded spec is not
    (see :meth:`MissionSpec.from_canonical`).

    :param spec: :meth:`MissionSpec.canonical`
    :param lead: the lead's DER public key: in the body so that the mission id binds the lead, too
    :param created: the lead's clock at signing (seconds since the epoch); two ``create`` runs of one file
        are two missions
    """

    v: int = Field(default=MISSION_VERSION, ge=1)
    spec: bytes = Field(min_length=1, max_length=MAX_SPEC_BYTES)
    prompts_sha256: str = Field(pattern=_SHA256_PATTERN)
    prompts_count: int = Field(ge=1, le=MAX_MISSION_PROMPTS)
    shard_count: int = Field(ge=1, le=MAX_MISSION_PROMPTS)
    lead: bytes = Field(min_length=1, max_length=signing.MAX_PUBLIC_KEY_BYTES)
    created: float = Field(ge=0.0)


@dataclass(frozen=True)
class SignedMission:
    """A mission as the swarm knows it: the lead-signed body, verified. Build one with :func:`sign_mission`
    (the lead) or :meth:`from_wire` (everyone else); both verify, so holding one means it is genuine.

    On the wire (and as the DHT value under ``missions``, subkey = :attr:`mission_id`) it is the
    ``SignedRecord`` envelope every signed garden value uses: ``{b: body, k: lead key, s: signature}``.
    """

    body: MissionBody
    body_bytes: bytes
    signature: bytes
    spec: MissionSpec

    @property
    def mission_id(self) -> str:
        """sha256 hex of the signed body bytes (not of the envelope: its encoding is not canonical, and the
        signature adds nothing the body does not already fix)."""
        return hashlib.sha256(self.body_bytes).hexdigest()

    @property
    def lead(self) -> bytes:
        return self.body.lead

    @property
    def lead_peer_id(self) -> str:
        return signing.peer_id_of(self.body.lead)

    @property
    def spec_sha256(self) -> str:
        return hashlib.sha256(self.body.spec).hexdigest()

    @property
    def name(self) -> str:
        return self.spec.name

    def to_wire(self) -> bytes:
        envelope = SignedRecord(b=self.body_bytes, k=self.body.lead, s=self.signature)
        packed: bytes = msgpack.packb(envelope.model_dump(), use_bin_type=True)
        return packed

    @classmethod
    def from_wire(cls, raw: Any, max_bytes: int = MAX_MISSION_RECORD_BYTES) -> SignedMission:
        """Size-cap, decode strictly, verify the lead's signature, re-validate the spec; raises only
        ``RecordError`` with the reason (for one log line). The same bytes are checked once
        (:data:`OPENED_MISSIONS`)."""
        _check_bytes(raw, max_bytes, "mission")
        return _open_mission(raw)

    @classmethod
    def from_record(cls, raw: Any, subkey: Any) -> SignedMission:
        """A value read under ``missions``: :meth:`from_wire`, and it must be stored under its own id."""
        mission = cls.from_wire(raw)
        if subkey != mission.mission_id:
            raise RecordError(f"stored under {str(subkey)[:80]!r}, but its id is {mission.mission_id}")
        return mission


OPENED_MISSIONS = 256
"""Signed missions, cancels and index heads whose checks passed, remembered by their bytes. Every answer a search of
``<swarm>/missions`` gets carries every open mission, and hivemind validates each record of each answer: at 50 peers
with 100 open missions, re-verifying the signatures and re-validating the specs was half of a DHT host's CPU
(``benchmarks/scale.py``). A success only: a forgery is checked again each time it comes. Two caches (the checked
envelopes, the missions) keep up to this many records each, of at most 20 KiB, whoever signed them: 1 MiB for 100
open missions of ``examples/capitals.toml`` (measured), some 25 MiB should a stranger fill them with the largest."""


@functools.lru_cache(maxsize=OPENED_MISSIONS)
def _open_mission(raw: bytes) -> SignedMission:
    """:meth:`SignedMission.from_wire` past the size cap."""
    envelope = _verified_envelope(raw, "mission")
    body = decode_record(MissionBody, envelope.b, "mission body")
    if body.lead != envelope.k:
        raise RecordError("signed by another key than the mission's lead")
    spec = MissionSpec.from_canonical(body.spec)
    expected = count_shards(body.prompts_count, spec.shard_size)
    if body.shard_count != expected:
        raise RecordError(f"shard_count {body.shard_count}, but {body.prompts_count} prompts make {expected}")
    return SignedMission(body=body, body_bytes=envelope.b, signature=envelope.s, spec=spec)


def _check_bytes(raw: Any, max_bytes: int, what: str) -> None:
    if not isinstance(raw, bytes):
        raise RecordError(f"{what} is {type(raw).__name__}, not bytes")
    if len(raw) > max_bytes:
        raise RecordError(f"{what} is {len(raw)} bytes, over the {max_bytes}-byte cap")


def _open_envelope(raw: Any, max_bytes: int, what: str) -> SignedRecord:
    _check_bytes(raw, max_bytes, what)
    return _verified_envelope(raw, what)


@functools.lru_cache(maxsize=OPENED_MISSIONS)
def _verified_envelope(raw: bytes, what: str) -> SignedRecord:
    envelope = decode_record(SignedRecord, raw, f"{what} envelope")
    if not signing.verify(envelope.k, envelope.b, envelope.s):
        raise RecordError(f"{what}: bad signature")
    return envelope


def sign_mission(draft: MissionDraft, private_key: rsa.RSAPrivateKey, now: float | None = None) -> SignedMission:
    """The lead signs a draft with its identity key (``garden mission create``)."""
    body = MissionBody(
        spec=draft.spec.canonical(),
        prompts_sha256=draft.prompts_sha256,
        prompts_count=len(draft.prompts),
        shard_count=draft.shard_count,
        lead=signing.public_key_der(private_key),
        created=time.time() if now is None else float(now),
    )
    return SignedMission.from_wire(seal(canonical_msgpack(body.model_dump(mode="python")), private_key))


def verify_prompts(mission: SignedMission, prompts: Sequence[PromptRow]) -> None:
    """Refuse a prompt list that is not the one the lead signed (``RecordError`` saying what differs)."""
    if len(prompts) != mission.body.prompts_count:
        raise RecordError(f"{len(prompts)} prompts, but the mission has {mission.body.prompts_count}")
    digest = prompts_sha256(prompts)
    if digest != mission.body.prompts_sha256:
        raise RecordError(
            f"prompts hash {digest[:16]}..., but the mission signed {mission.body.prompts_sha256[:16]}..."
        )


# --- cancellation ------------------------------------------------------------------------------------


class CancelRecord(StrictRecord):
    """The lead's order to stop a mission (``garden mission cancel ID``), signed with the lead's key."""

    v: int = Field(default=MISSION_VERSION, ge=1)
    mission_id: MissionId
    reason: str = Field(default="", max_length=200)
    cancelled_at: float = Field(ge=0.0)


def sign_cancel(mission_id: str, private_key: rsa.RSAPrivateKey, reason: str = "", now: float | None = None) -> bytes:
    """The signed cancel on the wire; any key can sign one, only the lead's is obeyed (:func:`open_cancel`)."""
    record = CancelRecord(mission_id=mission_id, reason=reason, cancelled_at=time.time() if now is None else float(now))
    return seal(canonical_msgpack(record.model_dump(mode="python")), private_key)


def open_cancel(raw: Any, mission: SignedMission, max_bytes: int = MAX_CANCEL_RECORD_BYTES) -> CancelRecord:
    """A verified cancel of ``mission``: signed by its lead's key and naming its id; else ``RecordError``."""
    envelope = _open_envelope(raw, max_bytes, "cancel")
    if envelope.k != mission.lead:
        raise RecordError(f"cancel signed by {signing.peer_id_of(envelope.k)}, not the lead {mission.lead_peer_id}")
    return _cancel_body(envelope, mission.mission_id)


def open_any_cancel(raw: Any, subkey: Any, max_bytes: int = MAX_CANCEL_RECORD_BYTES) -> CancelRecord:
    """A well-formed cancel stored under ``subkey`` (:func:`cancel_subkey`): a valid signature by the key
    the subkey names, for the mission it names. That is all the DHT can check without the mission; only
    :func:`open_cancel` says whether the key is the lead's. Naming the signer in the subkey keeps a
    stranger's cancel under a subkey of its own, so it can never displace the lead's."""
    mission_id, signer = parse_cancel_subkey(subkey)
    envelope = _open_envelope(raw, max_bytes, "cancel")
    if signing.peer_id_of(envelope.k) != signer:
        raise RecordError(f"cancel signed by {signing.peer_id_of(envelope.k)}, stored under {signer}'s subkey")
    return _cancel_body(envelope, mission_id)


def _cancel_body(envelope: SignedRecord, mission_id: str) -> CancelRecord:
    record = decode_record(CancelRecord, envelope.b, "cancel body")
    if record.mission_id != mission_id:
        raise RecordError(f"cancel names mission {record.mission_id}, not {mission_id}")
    return record


def cancel_subkey(mission_id: str, signer: str) -> str:
    """Where a cancel of a mission signed by ``signer`` (a peer id) lives under ``missions``, beside the
    mission's own entry; peers obey only the one under the lead's peer id."""
    return f"{CANCEL_PREFIX}{mission_id}:{signer}"


def parse_cancel_subkey(subkey: Any) -> tuple[str, str]:
    """(mission id, signer's peer id) of a :func:`cancel_subkey`; ``RecordError`` for anything else."""
    if not isinstance(subkey, str) or not subkey.startswith(CANCEL_PREFIX):
        raise RecordError(f"not a cancel subkey: {str(subkey)[:80]!r}")
    parts = subkey[len(CANCEL_PREFIX) :].split(":")
    if len(parts) != 2 or not re.fullmatch(_MISSION_ID_PATTERN, parts[0]) or not 0 < len(parts[1]) <= 128:
        raise RecordError(f"not a cancel subkey: {subkey[:80]!r}")
    return parts[0], parts[1]


# --- the index heads: what changed in the mission index, in a few hundred bytes per lead ------------------


class IndexHead(StrictRecord):
    """A lead's digest of its entries in the mission index (its missions and its cancels), stored under the
    ``mission_heads`` key with subkey = the lead's peer id and signed by it. A reader reads these small records
    every refresh and the whole index (every mission signed, ~1.5 KB each) only when a head changed: an idle
    swarm's mission reads cost a few KB, not the index's size. A head is a hint for when to read, never a
    source of missions: a lead that lies in its own head only makes readers read the index more often (once per
    refresh, no more than without heads), and a stranger cannot sign another lead's head."""

    v: int = Field(default=MISSION_VERSION, ge=1)
    lead: str = Field(min_length=1, max_length=128)
    missions: int = Field(ge=0, le=1_000_000)
    digest: str = Field(pattern=_SHA256_PATTERN)
    announced_at: float = Field(ge=0.0)


def index_digest(mission_ids: Sequence[str], cancelled_ids: Sequence[str]) -> str:
    """sha256 over a lead's mission ids and its cancelled ones, in sorted order (the same set, the same digest)."""
    lines = sorted(mission_ids) + [f"{CANCEL_PREFIX}{m}" for m in sorted(cancelled_ids)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def sign_index_head(
    private_key: rsa.RSAPrivateKey, mission_ids: Sequence[str], cancelled_ids: Sequence[str], now: float
) -> bytes:
    """The signed head of the lead whose key this is, for its ``mission_ids`` and ``cancelled_ids``."""
    head = IndexHead(lead=signing.peer_id_of(signing.public_key_der(private_key)), missions=len(mission_ids),
                     digest=index_digest(mission_ids, cancelled_ids), announced_at=float(now))  # fmt: skip
    return seal(canonical_msgpack(head.model_dump(mode="python")), private_key)


def open_index_head(raw: Any, subkey: Any, expiration_time: float, now: float) -> IndexHead:
    """A head stored under ``subkey``: signed by the peer the subkey names, naming it, fresh; else ``RecordError``."""
    if not isinstance(subkey, str):
        raise RecordError(f"head subkey is {type(subkey).__name__}, not a peer id string")
    envelope = _open_envelope(raw, MAX_INDEX_HEAD_BYTES, "index head")
    signer = signing.peer_id_of(envelope.k)
    if signer != subkey:
        raise RecordError(f"index head signed by {signer}, stored under {subkey[:128]}")
    head = decode_record(IndexHead, envelope.b, "index head body")
    if head.lead != signer:
        raise RecordError(f"index head names lead {head.lead[:128]}, signed by {signer}")
    check_fresh(head.announced_at, expiration_time, now)
    return head


__all__ = [
    "BuiltinPrompts",
    "CANCEL_PREFIX",
    "CancelRecord",
    "IndexHead",
    "MAX_MISSION_RECORD_BYTES",
    "MissionBody",
    "MissionDraft",
    "MissionSpec",
    "MissionSpecError",
    "SignedMission",
    "count_shards",
    "describe_spec_error",
    "index_digest",
    "load_mission_toml",
    "pack_prompts",
    "unpack_prompts",
    "cancel_subkey",
    "open_any_cancel",
    "parse_cancel_subkey",
    "open_cancel",
    "open_index_head",
    "prompt_seed",
    "prompts_sha256",
    "shard_prompts",
    "sign_cancel",
    "sign_index_head",
    "sign_mission",
    "verify_prompts",
]
