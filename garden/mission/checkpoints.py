"""Sharing a mission's checkpoints between peers: the daemon publishes the checkpoints its trainer wrote,
serves their files, and pulls other peers' checkpoints on a user's request (``garden mission pull``).

* **publish**: every period, each checkpoint in the mission's run directory
  (``<data dir>/train/<mission>/out``) is announced as a sealed :class:`CheckpointRecord` under
  ``m/<id>/ckpt`` (re-published, so it stays while this peer holds it);
* **serve**: a ``ckpt`` content ref names ``<epoch>/<path>`` and the file's sha256; a file is served only
  when this peer holds a checkpoint of that epoch whose manifest lists that exact hash;
* **pull**: the files of one epoch are fetched from the peers that announce it (each file hash-checked
  on arrival by the transfer layer, then once more on disk) into ``<data dir>/checkpoints/<mission>/
  epoch-<E>/``: a plain transformers directory, plus ``adapter/`` for LoRA students and
  ``garden-checkpoint.json`` (the record). A file already there with the right hash is not fetched again.
  Only *verified* checkpoints are pulled unless the caller asks for unverified ones: an epoch whose manifest
  a trusted voucher signed (:class:`~garden.protocol.checkpoints.CheckpointVouch`, see
  ``garden.mission.vouching``), and only the holders that serve exactly that manifest. An epoch past the
  mission's ``max_epochs`` is never taken: no honest run reaches it.

Checkpoint files stream from disk to disk a chunk at a time (the transfer's file kinds): a peer serving eight
pulls of a 2 GiB file holds a few MiB for them, within ``--max-serving-memory``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemind.utils.timed_storage import get_dht_time

from garden.durable import swap_dir
from garden.models.loading import file_sha256
from garden.net.swarm import Swarm
from garden.errors import NotFound, PeerFailed, Unavailable
from garden.net.transfer import ContentTransfer, TransferError
from garden.protocol.content import ContentRef
from garden.protocol.checkpoints import (
    CHECKPOINT_TTL,
    CheckpointFile,
    CheckpointRecord,
    CheckpointVouch,
    is_vouch_subkey,
)
from garden.protocol.keys import DHTKeys
from garden.protocol.records import RecordError
from garden.distill.checkpoints import CheckpointError, RunDir

logger = logging.getLogger(__name__)

PULLED_MANIFEST = "garden-checkpoint.json"
SHARED_DIRS = ("model", "adapter")
"""What a checkpoint shares: the loadable model (LoRA merged in) and the adapter; not the optimizer state."""


class PullError(PeerFailed):
    """A checkpoint that could not be pulled from the peers that announce it; the message says which and why."""


@dataclass(frozen=True)
class Catalog:
    """A mission's checkpoint records and vouches as the DHT holds them, each checked (newest epoch last)."""

    records: list[CheckpointRecord] = field(default_factory=list)
    vouches: list[CheckpointVouch] = field(default_factory=list)

    def vouched(self, trusted: Collection[str]) -> dict[int, CheckpointVouch]:
        """Epoch -> the vouch of a trusted voucher for a manifest some holder announces (the newest vouch when
        several trusted vouchers signed the epoch)."""
        found: dict[int, CheckpointVouch] = {}
        for vouch in sorted(self.vouches, key=lambda v: v.created):
            if vouch.peer_id in trusted and any(vouch.vouches_for(r) for r in self.records):
                found[vouch.epoch] = vouch
        return found


@dataclass(frozen=True)
class LocalCheckpoint:
    epoch: int
    path: Path  # the checkpoint directory (holds model/, adapter/)
    files: dict[str, str]  # relative path -> sha256, shared files only


class CheckpointSharing:
    """:param train_root: ``<data dir>/train`` (each mission's worker writes its run directory there)
    :param pulled_root: ``<data dir>/checkpoints`` (where pulls land)"""

    def __init__(
        self,
        swarm: Swarm,
        keys: DHTKeys,
        private_key: Any,
        peer_id: str,
        transfer: ContentTransfer,
        train_root: Path,
        pulled_root: Path,
    ):
        self.swarm, self.keys, self.private_key, self.peer_id = swarm, keys, private_key, peer_id
        self.transfer, self.train_root, self.pulled_root = transfer, train_root, pulled_root
        transfer.register_files("ckpt", self.content)
        self.invalid_records: Counter[str] = Counter()
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}

    # --- what this peer holds ----------------------------------------------------------------------
    def local(self, mission_id: str, versions: bool = False) -> list[LocalCheckpoint]:
        """Checkpoints of ``mission_id`` this peer holds, one per epoch: its trainer's, else the one it pulled.
        ``versions``: both, where it holds its own and pulled another version of an epoch (the lead's vouched
        files, when its own last round did not gather every trainer), by epoch."""
        found: dict[int, LocalCheckpoint] = {}
        pulled: list[LocalCheckpoint] = []
        run = RunDir(self.train_root / mission_id / "out")
        if run.exists():
            for path in sorted((run.path / "checkpoints").glob("step-*")):
                if path.name.endswith(".partial"):
                    continue
                try:
                    checkpoint = run.checkpoint(path.name)
                except (CheckpointError, KeyError, ValueError):
                    continue
                listed = checkpoint.manifest.get("files", {})
                files = {k: v for k, v in listed.items() if k.split("/")[0] in SHARED_DIRS}
                found[checkpoint.step] = LocalCheckpoint(checkpoint.step, checkpoint.path, files)
        for path in sorted((self.pulled_root / mission_id).glob("epoch-*")):
            try:
                record = json.loads((path / PULLED_MANIFEST).read_text())
                copy = LocalCheckpoint(int(record["epoch"]), path, {f["path"]: f["sha256"] for f in record["files"]})
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if copy.epoch not in found:
                found[copy.epoch] = copy
            elif versions and found[copy.epoch].files != copy.files:
                pulled.append(copy)
        return sorted([*found.values(), *pulled], key=lambda c: c.epoch)

    def _intact(self, local: LocalCheckpoint) -> bool:
        return all(file_sha256(self.file_path(local, rel)) == sha for rel, sha in local.files.items())

    def file_path(self, local: LocalCheckpoint, rel: str) -> Path:
        """Where a shared file lives: under the run's checkpoint as written, flat in a pulled copy."""
        nested = local.path / rel
        if nested.is_file():
            return nested
        subdir, name = rel.split("/", 1)
        return local.path / name if subdir == "model" else local.path / rel

    async def publish(self, mission_id: str) -> int:
        """Announce every checkpoint held here; returns how many were stored."""
        stored = 0
        for local in self.local(mission_id):
            try:
                files = [
                    CheckpointFile(path=rel, size=self.file_path(local, rel).stat().st_size, sha256=digest)
                    for rel, digest in sorted(local.files.items())
                ]
            except FileNotFoundError:  # the trainer pruned it (it keeps the last few) while we listed it
                logger.debug("checkpoint of epoch %d of mission %s is gone; not announced", local.epoch,
                             mission_id[:12])  # fmt: skip
                continue
            metrics = _metrics_of(local.path)
            record = CheckpointRecord(
                mission_id=mission_id, epoch=local.epoch, peer_id=self.peer_id, files=files,
                metrics=metrics, created=get_dht_time(),
            )  # fmt: skip
            expiration = get_dht_time() + CHECKPOINT_TTL
            if await self.swarm.store(
                self.keys.mission_checkpoints(mission_id), record.to_wire(self.private_key), expiration,
                subkey=record.subkey,
            ):  # fmt: skip
                stored += 1
        return stored

    async def content(self, ref: ContentRef) -> Path | None:
        """The transfer's source for ``ckpt`` refs: the file, when a checkpoint held here lists that hash."""
        epoch_text, _, rel = ref.item.partition("/")
        if not epoch_text.isdigit():
            return None
        for local in self.local(ref.mission_id, versions=True):
            if local.epoch == int(epoch_text) and local.files.get(rel) == ref.sha256:
                return self.file_path(local, rel)
        return None

    async def vouch(self, record: CheckpointRecord, metrics: dict[str, float]) -> CheckpointVouch:
        """Countersign ``record``'s manifest (this peer checked and evaluated it); raises PeerFailed when no DHT
        peer stored the vouch."""
        vouch = CheckpointVouch(
            mission_id=record.mission_id, epoch=record.epoch, peer_id=self.peer_id,
            manifest_sha256=record.manifest_sha256, metrics=metrics, created=get_dht_time(),
        )  # fmt: skip
        key = self.keys.mission_checkpoints(record.mission_id)
        if not await self.swarm.store(key, vouch.to_wire(self.private_key), get_dht_time() + CHECKPOINT_TTL,
                                      subkey=vouch.subkey):  # fmt: skip
            raise PeerFailed(f"no DHT peer stored the vouch for epoch {record.epoch}")
        return vouch

    # --- what the swarm holds ----------------------------------------------------------------------
    async def records(self, mission_id: str) -> list[CheckpointRecord]:
        """Checked checkpoint records of a mission, by epoch (newest last); invalid ones are counted."""
        return (await self.catalog(mission_id)).records

    async def catalog(self, mission_id: str) -> Catalog:
        """Checked checkpoint records and vouches of a mission; invalid ones are counted and logged."""
        found = await self.swarm.get(self.keys.mission_checkpoints(mission_id), latest=True)
        records, vouches = [], []
        for subkey, item in (found.value.items() if found is not None and hasattr(found.value, "items") else []):
            try:
                raw = getattr(item, "value", None)
                decoded = CheckpointVouch.from_wire(raw, subkey) if is_vouch_subkey(subkey) else (
                    CheckpointRecord.from_wire(raw, subkey)
                )
                if decoded.mission_id != mission_id:
                    raise RecordError(f"names mission {decoded.mission_id[:12]}")
            except RecordError as e:
                self.invalid_records["ckpt"] += 1
                logger.warning("ignored an invalid checkpoint record under %r: %s", str(subkey)[:80], e)
                continue
            (vouches if isinstance(decoded, CheckpointVouch) else records).append(decoded)
        return Catalog(sorted(records, key=lambda r: (r.epoch, r.peer_id)), sorted(vouches, key=lambda v: v.epoch))

    # --- pulling -----------------------------------------------------------------------------------
    async def pull(
        self,
        mission_id: str,
        epoch: int | None = None,
        trusted: Collection[str] = (),
        unverified: bool = False,
        max_epoch: int | None = None,
        manifest: str | None = None,
        into: Path | None = None,
        room: Callable[[int], str | None] | None = None,
    ) -> tuple[Path, CheckpointRecord]:
        """Fetch a checkpoint (the newest when ``epoch`` is None) into the pulled root; returns its directory
        and record. Only an epoch that a peer in ``trusted`` vouched for, from holders of exactly the vouched
        files, unless ``unverified``; never an epoch past ``max_epoch`` (the mission's ``max_epochs``). Raises
        :class:`garden.errors.NotFound` when no peer announces it (or it is not verified), :class:`PullError`
        when it could not be fetched. ``manifest``: only holders of exactly these files (a voucher judging
        one of several versions of an epoch); ``into``: another directory than the pulled root, which this peer
        neither lists nor announces (what a voucher judges is not held until it is vouched for); ``room``: says
        why a pull of that many bytes does not fit (``DiskKeeper.shortfall``), or None: the files' sizes are the
        holders' manifest's, which its sha256 binds, so nobody's word decides them. Raises Unavailable then."""
        catalog = await self.catalog(mission_id)
        records = [r for r in catalog.records if max_epoch is None or r.epoch <= max_epoch]
        if len(records) < len(catalog.records):
            logger.info("ignored checkpoint records of mission %s past its last epoch (%s)", mission_id[:12],
                        max_epoch)  # fmt: skip
        if not unverified:
            vouched = catalog.vouched(trusted)
            records = [r for r in records if r.epoch in vouched and vouched[r.epoch].vouches_for(r)]
        what = "checkpoint" if unverified else "verified checkpoint (vouched for by the mission's lead)"
        if epoch is None:
            if not records:
                raise NotFound(f"no peer announces a {what} of mission {mission_id[:12]} yet")
            epoch = records[-1].epoch
        offers = [r for r in records if r.epoch == epoch and manifest in (None, r.manifest_sha256)]
        if not offers:
            known = sorted({r.epoch for r in records})
            hint = "" if unverified else "; --unverified takes one nobody vouched for"
            raise NotFound(
                f"no peer announces a {what} of epoch {epoch} of mission {mission_id[:12]} "
                f"(announced: {known or 'none'}){hint}"
            )
        # this peer's own checkpoint of that epoch first: two trainers may both write one when the last round
        # did not gather them, with different weights, and the files this peer serves (``local``) are its own
        offers.sort(key=lambda r: r.peer_id != self.peer_id)
        if offers[0].peer_id == self.peer_id and into is None:
            own = next((c for c in self.local(mission_id) if c.epoch == epoch), None)
            if own is not None and own.files == {f.path: f.sha256 for f in offers[0].files}:
                if await asyncio.to_thread(self._intact, own):
                    return own.path, offers[0]
                raise PullError(f"this peer's own checkpoint of epoch {epoch} no longer matches its sha256s (damaged?)")
        lock = self._locks.setdefault((mission_id, epoch), asyncio.Lock())
        async with lock:
            return await self._pull(mission_id, epoch, offers, into, room), offers[0]

    async def _fetch(self, holders: list[str], ref: ContentRef, dest: Path) -> str:
        for attempt in range(1, FETCH_TRIES + 1):
            try:
                return await self.transfer.fetch_any_file(holders, ref, dest)
            except TransferError as e:
                if attempt == FETCH_TRIES or "hash mismatch" in str(e):
                    raise PullError(f"could not fetch {ref.item} of mission {ref.mission_id[:12]}: {e}") from None
                logger.info("fetch of %s failed (%s); trying again", ref.item, e)
                await asyncio.sleep(2.0 * attempt)
        raise AssertionError("unreachable")

    async def _pull(
        self, mission_id: str, epoch: int, offers: list[CheckpointRecord], into: Path | None,
        room: Callable[[int], str | None] | None = None,
    ) -> Path:  # fmt: skip
        target = into or self.pulled_root / mission_id / f"epoch-{epoch}"
        files = offers[0].files
        if target.is_dir() and await asyncio.to_thread(_all_match, target, files):
            return target  # pulled before, and intact
        short = room(offers[0].size) if room is not None else None
        if short is not None:
            raise Unavailable(f"the checkpoint of epoch {epoch} of mission {mission_id[:12]} is not pulled: {short}")
        own = next((c for c in self.local(mission_id) if c.epoch == epoch and c.path != target), None)
        staging = target.with_name(target.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        for item in files:
            dest = staging / _flat(item.path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_file() and await asyncio.to_thread(file_sha256, dest) == item.sha256:
                continue
            if own is not None and own.files.get(item.path) == item.sha256:
                await asyncio.to_thread(shutil.copyfile, self.file_path(own, item.path), dest)
            else:
                holders = [r.peer_id for r in offers if getattr(r.file(item.path), "sha256", None) == item.sha256]
                ref = ContentRef(kind="ckpt", mission_id=mission_id, item=f"{epoch}/{item.path}", sha256=item.sha256)
                source = await self._fetch(holders, ref, dest)
                logger.info("pulled %s of mission %s epoch %d from %s", item.path, mission_id[:12], epoch, source)
            if await asyncio.to_thread(file_sha256, dest) != item.sha256:  # a disk that lies, a race
                dest.unlink(missing_ok=True)
                raise PullError(f"{item.path} of epoch {epoch} does not match its sha256 after writing")
        (staging / PULLED_MANIFEST).write_text(json.dumps(offers[0].model_dump(mode="json"), indent=2))
        await asyncio.to_thread(swap_dir, staging, target)  # flushed, then swapped: never half, never neither
        return target


FETCH_TRIES = 3
"""Tries of each file (a few seconds apart): a holder's stream can break off once, e.g. while it is busy."""


def _all_match(directory: Path, files: list[CheckpointFile]) -> bool:
    return all((directory / _flat(f.path)).is_file() and file_sha256(directory / _flat(f.path)) == f.sha256
               for f in files)  # fmt: skip


def _flat(path: str) -> str:
    """Where a shared file goes in a pulled checkpoint: model files at the top (a transformers directory),
    adapter files under ``adapter/``."""
    subdir, name = path.split("/", 1)
    return name if subdir == "model" else path


def _metrics_of(path: Path) -> dict[str, float]:
    try:
        metrics = json.loads((path / "manifest.json").read_text()).get("metrics", {})
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
