"""The swarm's models: each mission's trained student, published by its lead as ``mission:<mission id>``.

* **publish** (the lead's daemon): once the lead vouched for the checkpoint of the mission's last epoch (or the
  lead promotes a vouched epoch, ``garden mission promote``), it pulls those files, reads what a user picks a
  model by (architecture, parameters, layers, tokenizer) and signs a :class:`StudentRecord` under
  ``<swarm>/students`` with its evaluation (the vouch's figures). The record is kept in the data dir
  (``<data dir>/students/<id>.record``) and renewed every :data:`RENEW_S`, so a lead that restarts keeps
  publishing what it published. Each publisher has a subkey of its own (``<mission id>:<peer id>``), so a
  stranger's record cannot take the lead's place in the DHT.
* **list** (every peer): the records under ``<swarm>/students`` that are sealed by the lead of a mission this
  peer knows (the mission book holds the signed missions), for a checkpoint no later than its ``max_epochs``.
  A stranger's record for another lead's mission, or for a mission nobody here knows, is dropped and counted.
* **resolve** (every peer, on first use): ``mission:<id>``, ``mission:<unique prefix>`` or ``mission:<name>``
  becomes ``mission:<full id>``, and the checkpoint the record names is pulled from its holders, each file
  against its sha256 (the lead's signed record names the manifest, as a vouch does), into the data dir, where
  ``garden.models`` loads it (``--max-disk`` counts it; a newer publication replaces it). A student bigger
  than the room ``--max-disk`` and the free disk leave is refused before a byte is fetched, as a hub model is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemind.utils.timed_storage import get_dht_time

from garden.errors import GardenError, NotAllowed, NotFound, Unavailable
from garden.host.disk import DiskKeeper
from garden.lifecycle import Service
from garden.mission.book import Mission, MissionBook
from garden.mission.checkpoints import CheckpointSharing
from garden.models.cache import note_student_dir, student_dir, student_note
from garden.models.loading import MISSION_SCHEME, ModelRefError, is_mission_id, parameter_count, parse_model_ref
from garden.models.student import section_reference
from garden.net.swarm import Swarm
from garden.protocol.checkpoints import STUDENT_TTL, StudentRecord
from garden.protocol.keys import DHTKeys
from garden.protocol.records import RecordError

logger = logging.getLogger(__name__)

RENEW_S = 3600.0
"""Seconds between renewals of a published student in the DHT (its records live :data:`STUDENT_TTL`)."""
EVAL_KEYS = ("kl", "nll", "top1", "pref_acc", "base_kl", "rows", "heldout_rows")
LISTING_TTL = 3.0
"""Seconds a read of ``<swarm>/students`` is reused."""
MAX_WARNED = 10_000
"""Invalid student records logged by subkey (each once); past that they are only counted."""
"""The vouch's figures a published student carries."""


@dataclass(frozen=True)
class Student:
    """A published student as this peer sees it: the lead's record, the mission, and whether it is here."""

    record: StudentRecord
    mission: Mission
    trusted: bool
    local: Path | None

    @property
    def model(self) -> str:
        return self.record.model


class SwarmStudents(Service):
    """:param root: ``<data dir>/students`` (the records this peer published, to renew after a restart)
    :param disk: the data dir's keeper: a pull must fit the room it leaves (None: no check)"""

    name = "students"

    def __init__(
        self, book: MissionBook, sharing: CheckpointSharing, swarm: Swarm, keys: DHTKeys, private_key: Any,
        root: Path, period: float = 30.0, disk: DiskKeeper | None = None,
    ) -> None:  # fmt: skip
        self.book, self.sharing, self.swarm, self.keys, self.private_key = book, sharing, swarm, keys, private_key
        self.root, self.period, self.disk = root, period, disk
        self.invalid_records = 0
        self._renewed: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._warned: set[str] = set()
        self._listed: tuple[float, list[Any]] | None = None  # (when, the DHT's entries)

    # --- the lead: publishing ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for mission in list(self.book.missions.values()):
                if stop.is_set():
                    break
                if self.book.leads_here(mission) and not mission.cancelled:
                    try:
                        await self.tend(mission)
                    except (GardenError, OSError, RecordError, ValueError, KeyError) as e:  # tried again next period
                        logger.warning("publishing the student of mission %s: %s", mission.id[:12], e)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.period)
            except TimeoutError:
                pass

    async def tend(self, mission: Mission) -> None:
        """Publish the student once its last epoch is vouched for here; renew what was published."""
        saved = self.published(mission.id)
        if saved is not None:
            if time.monotonic() - self._renewed.get(mission.id, -RENEW_S) >= RENEW_S:
                await self._store(saved)
            return
        last = mission.signed.spec.train.max_epochs
        catalog = await self.sharing.catalog(mission.id)
        if any(v.epoch == last and v.peer_id == self.sharing.peer_id for v in catalog.vouches):
            record = await self.publish(mission, last)
            logger.info("published the student of mission %s (epoch %d) as %s", mission.id[:12], last, record.model)

    async def publish(self, mission: Mission, epoch: int | None = None) -> StudentRecord:
        """Publish (or promote) the checkpoint of ``epoch`` (None: the newest this lead vouched for) as the
        mission's model. Raises NotAllowed when this peer is not the lead, NotFound when it vouched for no such
        checkpoint."""
        if not self.book.leads_here(mission):
            raise NotAllowed(f"only the lead of mission {mission.id[:12]} publishes its student")
        catalog = await self.sharing.catalog(mission.id)
        # of two versions of one epoch this lead vouched for (two trainers wrote one), the one it measured closer
        # to the teacher
        own = [v for v in catalog.vouches if v.peer_id == self.sharing.peer_id]
        mine = {v.epoch: v for v in sorted(own, key=lambda v: (v.epoch, -v.metrics.get("kl", 0.0)))}
        if epoch is None:
            if not mine:
                raise NotFound(f"this lead vouched for no checkpoint of mission {mission.id[:12]} yet")
            epoch = max(mine)
        vouch = mine.get(epoch)
        record = next((r for r in catalog.records if vouch is not None and vouch.vouches_for(r)), None)
        if vouch is None or record is None:
            raise NotFound(
                f"this lead vouched for no announced checkpoint of epoch {epoch} of mission {mission.id[:12]} "
                f"(vouched: {sorted(mine) or 'none'})"
            )
        path, _ = await self.sharing.pull(
            mission.id, epoch, trusted={self.sharing.peer_id}, manifest=vouch.manifest_sha256,
            max_epoch=mission.signed.spec.train.max_epochs,
        )  # fmt: skip
        facts = await asyncio.to_thread(_model_facts, path / "model" if (path / "model").is_dir() else path)
        student = mission.signed.spec.student
        base = section_reference(student)
        published = StudentRecord(
            mission_id=mission.id, peer_id=self.sharing.peer_id, name=mission.name, epoch=epoch,
            manifest_sha256=vouch.manifest_sha256, size=record.size, base=base[:256],
            metrics={k: float(v) for k, v in vouch.metrics.items() if k in EVAL_KEYS}, published=get_dht_time(),
            **facts,
        )  # fmt: skip
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{mission.id}.record.partial"
        staging.write_bytes(published.to_wire(self.private_key))
        staging.replace(self.root / f"{mission.id}.record")
        await self._store(published)
        await asyncio.to_thread(note_student_dir, mission.id, path, epoch, vouch.manifest_sha256)
        return published

    def published(self, mission_id: str) -> StudentRecord | None:
        """What this peer published for ``mission_id`` (kept in its data dir), or None."""
        try:
            raw = (self.root / f"{mission_id}.record").read_bytes()
            return StudentRecord.from_wire(raw, f"{mission_id}:{self.sharing.peer_id}")
        except (OSError, RecordError):
            return None

    async def _store(self, record: StudentRecord) -> None:
        stored = await self.swarm.store(
            self.keys.students, record.to_wire(self.private_key), get_dht_time() + STUDENT_TTL, subkey=record.subkey
        )
        if stored:
            self._renewed[record.mission_id] = time.monotonic()
        else:
            logger.warning("no DHT peer stored the student of mission %s; trying again", record.mission_id[:12])

    # --- every peer: the list, and a model on first use --------------------------------------------------
    async def listing(self) -> list[Student]:
        """The swarm's published students this peer can check, newest publication first (the DHT is read at most
        once per :data:`LISTING_TTL`: the dashboard and ``/v1`` ask often)."""
        now = time.monotonic()
        if self._listed is None or now - self._listed[0] > LISTING_TTL:
            found = await self.swarm.get(self.keys.students, latest=True)
            items = list(found.value.items()) if found is not None and hasattr(found.value, "items") else []
            self._listed = (now, items)
        records: dict[str, StudentRecord] = {}
        for subkey, item in self._listed[1]:
            try:
                record = StudentRecord.from_wire(getattr(item, "value", None), subkey)
                self._check(record)
            except RecordError as e:
                self.invalid_records += 1
                if str(subkey)[:200] not in self._warned and len(self._warned) < MAX_WARNED:  # said once
                    self._warned.add(str(subkey)[:200])
                    logger.warning("ignored a student record under %r: %s", str(subkey)[:80], e)
                continue
            records[record.mission_id] = record
        for mission in self.book.missions.values():  # what this lead published, even while the DHT is away
            own = self.published(mission.id) if self.book.leads_here(mission) else None
            if own is not None and own.published >= getattr(records.get(mission.id), "published", 0.0):
                records[mission.id] = own
        students = [
            Student(r, self.book.missions[r.mission_id], self.book.trusted(self.book.missions[r.mission_id]),
                    self._here(r))
            for r in records.values()
        ]  # fmt: skip
        return sorted(students, key=lambda s: s.record.published, reverse=True)

    def _check(self, record: StudentRecord) -> None:
        mission = self.book.missions.get(record.mission_id)
        if mission is None:
            raise RecordError(f"names mission {record.mission_id[:12]}, which this peer does not know")
        if record.peer_id != mission.signed.lead_peer_id:
            raise RecordError(f"published by {record.peer_id}, not by the mission's lead")
        last = mission.signed.spec.train.max_epochs
        if record.epoch > last:
            raise RecordError(f"epoch {record.epoch} is past the mission's last ({last})")

    def _here(self, record: StudentRecord) -> Path | None:
        """Where this peer has exactly the checkpoint ``record`` names, or None."""
        note = student_note(record.mission_id) or {}
        same = (note.get("epoch"), note.get("manifest_sha256")) == (record.epoch, record.manifest_sha256)
        return student_dir(record.mission_id) if same else None

    async def find(self, text: str) -> Student:
        """The published student ``text`` names (``mission:<id>``, a unique id prefix, or a mission's name).
        Raises ModelRefError when none or several match."""
        ref = parse_model_ref(text)
        if ref.kind != "mission":
            raise ModelRefError(f"{text!r} is not a mission:ID reference")
        students = await self.listing()
        wanted = ref.value
        # a name anyone can take: only students of leads this peer works for answer to it (a stranger's mission
        # named like yours cannot stand in for it); an id or its prefix names one mission whoever leads it
        matches = [s for s in students if s.record.mission_id == wanted] if is_mission_id(wanted) else (
            [s for s in students if s.record.mission_id.startswith(wanted.lower())]
            or [s for s in students if s.record.name == wanted and s.trusted]
        )  # fmt: skip
        if len(matches) != 1:
            known = ", ".join(f"{s.record.name} ({s.record.mission_id[:12]})" for s in students) or "none yet"
            what = "no published student" if not matches else "more than one published student"
            raise ModelRefError(f"{what} matches {text!r}; the swarm's students: {known} (garden models)")
        return matches[0]

    async def resolve(self, text: str) -> str:
        """``text`` as every peer names it: ``mission:<full id>`` for a published student, pulled here and
        checked first; any other reference unchanged. Raises ModelRefError (unknown) or PeerFailed (the pull)."""
        if not text.strip().startswith(f"{MISSION_SCHEME}:"):
            return text
        student = await self.find(text)
        await self.ensure(student)
        return student.model

    async def ensure(self, student: Student) -> Path:
        """The student's files on this machine: pulled from their holders on first use, each against its
        sha256, the exact checkpoint the lead's record names. Raises Unavailable when its files do not fit the
        room ``--max-disk`` and the free disk leave (nothing is fetched then)."""
        record = student.record
        lock = self._locks.setdefault(record.mission_id, asyncio.Lock())
        async with lock:
            here = self._here(record)
            if here is not None:
                return here
            short = self.disk.shortfall(record.size) if self.disk is not None else None  # before any DHT read
            if short is not None:
                raise Unavailable(f"mission:{record.mission_id[:12]} ({record.name}) is not pulled: {short}")
            path, _ = await self.sharing.pull(
                record.mission_id, record.epoch, unverified=True, manifest=record.manifest_sha256,
                max_epoch=student.mission.signed.spec.train.max_epochs,
                room=self.disk.shortfall if self.disk is not None else None,  # the files' own sizes, as pulled
            )  # fmt: skip
            await asyncio.to_thread(note_student_dir, record.mission_id, path, record.epoch, record.manifest_sha256)
            logger.info("pulled %s (%s, epoch %d) for first use; every file's sha256 checked", record.model,
                        record.name, record.epoch)  # fmt: skip
            return path


def _model_facts(path: Path) -> dict[str, Any]:
    """What a published student says of itself, read from its files (config, safetensors headers, tokenizer)."""
    from transformers import AutoTokenizer

    from garden.models.loading import tokenizer_fingerprint

    config = json.loads((path / "config.json").read_text())
    parameters = parameter_count(path)
    if parameters is None:
        raise NotFound(f"{path} holds no safetensors weights")
    architecture = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    return {
        "architecture": str(architecture)[:64],
        "parameters": parameters,
        "layers": int(config["num_hidden_layers"]),
        "tokenizer": tokenizer_fingerprint(AutoTokenizer.from_pretrained(path)),
    }
