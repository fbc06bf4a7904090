"""Checkpoint manifests under ``<swarm>/m/<mission id>/ckpt`` (docs/architecture.md, "DHT keys").

When a trainer of a mission writes a checkpoint of the swarm's student, its daemon publishes a
:class:`CheckpointRecord`: the epoch, every file a user needs to load the model (path, size, sha256), the
metrics at that epoch, and which peer serves the files. The subkey is ``<epoch>:<peer id>``, so several
holders of one epoch do not overwrite each other, and the record is sealed with the holder's key, so no
peer can publish a checkpoint in another's name. A peer that pulls a checkpoint checks every file it
downloads against the sha256 listed here, and refuses a mismatch.

What it does not prove: that the weights are honest training output. Any key can publish a record for any
mission; the hashes only guarantee that what you pull is what that peer published. So a checkpoint counts as
*verified* only with a :class:`CheckpointVouch` under ``vouch:<epoch>:<voucher>`` by someone the puller
trusts (the mission's lead, a ``--trust-lead``): the voucher pulled that epoch's files, checked their hashes,
evaluated the model on rows it holds, and signs the manifest (its :func:`manifest_sha256`) with the figures.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, ClassVar, Self

import msgpack
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import Field, StringConstraints, field_validator

from garden.protocol.mission import MissionId
from garden.protocol.records import RecordError, StrictRecord, decode_record, open_sealed, seal
from garden.protocol.shards import PeerId, Sha256Hex

CHECKPOINT_RECORD_VERSION = 1
MAX_CHECKPOINT_RECORD_BYTES = 16 * 1024
MAX_CHECKPOINT_FILES = 64
MAX_CHECKPOINT_FILE_BYTES = 16 * 1024**3
MAX_EPOCH = 10_000_000
CHECKPOINT_TTL = 7 * 24 * 3600.0
"""Seconds a manifest lives in the DHT unless its holder re-publishes it (holders do, every period)."""
_PATH = re.compile(r"^(model|adapter)/[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SUBKEY = re.compile(r"^(0|[1-9][0-9]{0,7}):([1-9A-HJ-NP-Za-km-z]{1,128})$")
VOUCH_PREFIX = "vouch:"
_STUDENT_SUBKEY = re.compile(r"^[0-9a-f]{64}:[1-9A-HJ-NP-Za-km-z]{1,128}$")
MAX_STUDENT_PARAMETERS = 10**12
MAX_STUDENT_LAYERS = 1024
STUDENT_TTL = 7 * 24 * 3600.0
"""Seconds a published student stays in the DHT unless its lead renews it (a lead's daemon does, every period)."""
_VOUCH_SUBKEY = re.compile(r"^vouch:(0|[1-9][0-9]{0,7}):([1-9A-HJ-NP-Za-km-z]{1,128})$")

CheckpointPath = Annotated[str, StringConstraints(max_length=136)]
"""``model/<file>`` or ``adapter/<file>``: one level, plain names, so a pull can never write outside its
target directory."""


class CheckpointFile(StrictRecord):
    path: CheckpointPath
    size: int = Field(ge=0, le=MAX_CHECKPOINT_FILE_BYTES)
    sha256: Sha256Hex

    @field_validator("path")
    @classmethod
    def _safe(cls, path: str) -> str:
        if not _PATH.match(path) or ".." in path:
            raise ValueError(f"{path[:80]!r} is not model/<name> or adapter/<name>")
        return path


class _SealedEntry(StrictRecord):
    """What both entries under a mission's ckpt key share: sealed by their ``peer_id``, and stored under the
    subkey their content names (checked on decode, so an entry cannot be replayed under another)."""

    SUBKEY: ClassVar[re.Pattern[str]]
    SUBKEY_FORM: ClassVar[str]

    @property
    def subkey(self) -> str:
        raise NotImplementedError

    def to_wire(self, private_key: rsa.RSAPrivateKey) -> bytes:
        return seal(msgpack.packb(self.model_dump(mode="python"), use_bin_type=True), private_key)

    @classmethod
    def from_wire(cls, raw: Any, subkey: Any) -> Self:
        """Decode and verify a value read under a mission's ckpt key; ``RecordError`` with the reason."""
        if not isinstance(subkey, str) or not cls.SUBKEY.match(subkey):
            raise RecordError(f"subkey {str(subkey)[:80]!r} is not {cls.SUBKEY_FORM}")
        body, signer = open_sealed(raw, max_bytes=MAX_CHECKPOINT_RECORD_BYTES)
        entry = decode_record(cls, body, cls.__name__)
        if signer != getattr(entry, "peer_id", None):
            raise RecordError(f"signed by {signer}, names peer {getattr(entry, 'peer_id', None)}")
        if subkey != entry.subkey:
            raise RecordError(f"stored under {subkey[:80]!r}, belongs under {entry.subkey!r}")
        return entry


class CheckpointRecord(_SealedEntry):
    """One holder's checkpoint of one epoch of a mission's student."""

    SUBKEY = _SUBKEY
    SUBKEY_FORM = "<epoch>:<peer id>"

    v: int = Field(default=CHECKPOINT_RECORD_VERSION, ge=1)
    mission_id: MissionId
    epoch: int = Field(ge=0, le=MAX_EPOCH)
    peer_id: PeerId = Field(description="the holder: the daemon that serves the files")
    files: list[CheckpointFile] = Field(min_length=1, max_length=MAX_CHECKPOINT_FILES)
    metrics: dict[Annotated[str, StringConstraints(max_length=32)], float] = Field(default_factory=dict, max_length=16)
    created: float = Field(ge=0.0)

    @field_validator("files")
    @classmethod
    def _distinct(cls, files: list[CheckpointFile]) -> list[CheckpointFile]:
        paths = [f.path for f in files]
        if len(paths) != len(set(paths)):
            raise ValueError("a file is listed twice")
        if not any(p.startswith("model/") for p in paths):
            raise ValueError("no model/ file: nothing to load")
        return files

    @property
    def subkey(self) -> str:
        return checkpoint_subkey(self.epoch, self.peer_id)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> CheckpointFile | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def manifest_sha256(self) -> str:
        return manifest_sha256(self.files)



def checkpoint_subkey(epoch: int, peer_id: str) -> str:
    return f"{epoch}:{peer_id}"


def manifest_sha256(files: list[CheckpointFile]) -> str:
    """What a vouch signs: the checkpoint's files (path, size, sha256), in path order, hashed. Two holders
    that serve identical files have the same manifest, so one vouch covers every copy."""
    canonical = msgpack.packb(sorted((f.path, f.size, f.sha256) for f in files), use_bin_type=True)
    return hashlib.sha256(canonical).hexdigest()


class CheckpointVouch(_SealedEntry):
    """A voucher's countersignature of one epoch's checkpoint: it pulled the files named by ``manifest_sha256``,
    checked every hash, evaluated the model (``metrics``, e.g. ``kl``: KL(teacher || student) on rows it
    holds) and found it not worse than the last checkpoint it vouched for."""

    SUBKEY = _VOUCH_SUBKEY
    SUBKEY_FORM = "vouch:<epoch>:<peer id>"

    v: int = Field(default=CHECKPOINT_RECORD_VERSION, ge=1)
    mission_id: MissionId
    epoch: int = Field(ge=0, le=MAX_EPOCH)
    peer_id: PeerId = Field(description="the voucher, who signs")
    manifest_sha256: Sha256Hex
    metrics: dict[Annotated[str, StringConstraints(max_length=32)], float] = Field(default_factory=dict, max_length=16)
    created: float = Field(ge=0.0)

    @property
    def subkey(self) -> str:
        return f"{VOUCH_PREFIX}{self.epoch}:{self.peer_id}"

    def vouches_for(self, record: CheckpointRecord) -> bool:
        return (record.mission_id, record.epoch, record.manifest_sha256) == (
            self.mission_id, self.epoch, self.manifest_sha256,
        )  # fmt: skip



def is_vouch_subkey(subkey: object) -> bool:
    return isinstance(subkey, str) and subkey.startswith(VOUCH_PREFIX)


class StudentRecord(_SealedEntry):
    """A mission's student published as a model of the swarm (``mission:<mission id>``), under
    ``<swarm>/students`` with the subkey ``<mission id>:<publisher>``, sealed by the publisher, which counts only
    when it is the mission's lead. One slot per publisher: a stranger's record sits beside the lead's and cannot
    displace it.

    It names one vouched checkpoint (``epoch`` and ``manifest_sha256``: a peer that uses the model pulls exactly
    those files from their holders and checks every hash) and what a user picks a model by: its base, size,
    layers, tokenizer and evaluation. The seal proves only who published it; a reader takes it only when the
    signer is the lead of the signed mission it names (the mission book knows), so nobody can publish a model in
    another lead's mission."""

    SUBKEY = _STUDENT_SUBKEY
    SUBKEY_FORM = "<mission id>:<peer id>"

    v: int = Field(default=CHECKPOINT_RECORD_VERSION, ge=1)
    mission_id: MissionId
    peer_id: PeerId = Field(description="the mission's lead, who publishes")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    epoch: int = Field(ge=0, le=MAX_EPOCH)
    manifest_sha256: Sha256Hex
    size: int = Field(ge=0, le=MAX_CHECKPOINT_FILES * MAX_CHECKPOINT_FILE_BYTES, description="bytes of its files")
    base: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(
        description="the model the student started from (the mission's student base)"
    )
    architecture: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    parameters: int = Field(ge=1, le=MAX_STUDENT_PARAMETERS)
    layers: int = Field(ge=1, le=MAX_STUDENT_LAYERS)
    tokenizer: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        description="the tokenizer's fingerprint (the teacher's, for a distilled student)"
    )
    metrics: dict[Annotated[str, StringConstraints(max_length=32)], float] = Field(default_factory=dict, max_length=16)
    published: float = Field(ge=0.0)

    @property
    def subkey(self) -> str:
        return f"{self.mission_id}:{self.peer_id}"

    @property
    def model(self) -> str:
        """The model reference every peer names it by."""
        return f"{STUDENT_SCHEME}{self.mission_id}"

    def names(self, record: CheckpointRecord) -> bool:
        """Whether ``record`` holds exactly the files this student is."""
        return (record.mission_id, record.epoch, record.manifest_sha256) == (
            self.mission_id, self.epoch, self.manifest_sha256,
        )  # fmt: skip


STUDENT_SCHEME = "mission:"
"""The model reference scheme of a published student: ``mission:<mission id>``."""
