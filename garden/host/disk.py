"""``--max-disk``: keep the data dir under the owner's size.

What may go, first to last: copies of row sets this peer took from others that did not win their shard
(a losing attempt, a winner voided or refuted since: nobody trains on them, so they never count as a last
copy), then copies of winning row sets (oldest first) that some other peer still announces holding, then
checkpoints older than each mission's newest, then hub models downloaded into the data dir that are not
loaded now (least recently used first: they can be downloaded again). What never goes: a winning row set no
other peer announces (it may be the last copy in the swarm), a row set this peer sampled, the newest
checkpoint of a mission, the identity and the store's own bookkeeping. When that is not enough the peer
says so in ``/status`` (``resources.disk_note``) rather than delete what cannot be found again.

:func:`plan_pruning` decides (pure, tested on its own); :class:`DiskKeeper` measures, asks the DHT who
holds what, and carries the plan out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from garden.lifecycle import Service
from garden.models.cache import cached_hub_models
from garden.models.loading import in_use
from garden.protocol.row_sets import RowsAnnouncement
from garden.store import Store

logger = logging.getLogger(__name__)

CHECK_PERIOD = 30.0
"""Seconds between measurements of the data dir."""
POKE_DELAY = 2.0
"""Seconds a check waits after new data arrived, and the shortest time between two checks then."""
FREE_MARGIN = 1024**3
"""Bytes of the disk a download may never take: the owner's machine needs room to run."""


class RowHolders(Protocol):
    """What the keeper needs to know of the missions this peer holds rows of (the mission book is one).
    A protocol, not the book itself: the volunteer's machine knows nothing of missions beyond this."""

    peer_id: str
    missions: Mapping[str, object]
    """The missions this peer knows, by id."""

    async def holders(self, mission_id: str) -> Mapping[str, RowsAnnouncement]:
        """Which peers announce which row sets of the mission, by peer id."""
        ...

    def wake(self) -> None:
        """Announce again soon (the row sets held here changed)."""
        ...


class HeldCheckpoint(Protocol):
    path: Path
    epoch: int


class CheckpointHolder(Protocol):
    """Where the keeper learns which checkpoints this peer holds (the mission's checkpoint sharing is one)."""

    def local(self, mission_id: str) -> Sequence[HeldCheckpoint]:
        """The checkpoints of the mission held here."""
        ...


@dataclass(frozen=True)
class Prunable:
    """Something the data dir holds that might go. ``holders_elsewhere``: other peers announcing the
    same row set (0 for a checkpoint, where ``newest`` protects the last one)."""

    kind: str  # "rows" | "checkpoint" | "model"
    mission_id: str  # "" for a model
    key: str  # the row set's attempt, the checkpoint's directory, or the model's cache directory
    size: int
    added_at: float
    replica: bool = False  # a row set copied from another peer (not sampled here)
    won: bool = True  # a row set its shard's records name the winner (those not are pruned first)
    holders_elsewhere: int = 0
    newest: bool = False  # a mission's newest checkpoint, or a model in use: kept


def plan_pruning(items: Sequence[Prunable], used: int, cap: int) -> list[Prunable]:
    """What to delete, in order, to bring ``used`` under ``cap``; never a winning row set without another
    holder, never a row set sampled here, never a mission's newest checkpoint."""
    if used <= cap:
        return []
    unvouched = sorted((i for i in items if i.kind == "rows" and i.replica and not i.won), key=lambda i: i.added_at)
    replicas = sorted(
        (i for i in items if i.kind == "rows" and i.replica and i.won and i.holders_elsewhere >= 1),
        key=lambda i: (-i.holders_elsewhere, i.added_at),
    )
    checkpoints = sorted((i for i in items if i.kind == "checkpoint" and not i.newest), key=lambda i: i.added_at)
    models = sorted((i for i in items if i.kind == "model" and not i.newest), key=lambda i: i.added_at)
    plan: list[Prunable] = []
    for item in [*unvouched, *replicas, *checkpoints, *models]:
        if used <= cap:
            break
        plan.append(item)
        used -= item.size
    return plan


def tree_size(root: Path) -> int:
    total = 0
    for base, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                continue
    return total


@dataclass(frozen=True)
class DiskSnapshot:
    """The data dir as ``/status`` shows it: its size (None before the first check), what was pruned, and why
    nothing more can go when it is still over the cap."""

    used: int | None
    pruned: int
    note: str | None


class DiskKeeper(Service):
    """:param checkpoints: which checkpoints of each mission are held here"""

    name = "disk"

    def __init__(
        self,
        root: Path,
        cap: int | None,
        store: Store,
        book: RowHolders,
        checkpoints: CheckpointHolder,
    ):
        self.root, self.cap, self.store, self.book, self.checkpoints = root, cap, store, book, checkpoints
        self.used: int | None = None
        self.pruned = 0
        self.pruned_rows: set[str] = set()
        """Attempts whose row-set copies were pruned here: replication must not copy them back."""
        self.note: str | None = None
        self._poked = asyncio.Event()

    def snapshot(self) -> DiskSnapshot:
        return DiskSnapshot(used=self.used, pruned=self.pruned, note=self.note)

    def room(self) -> int:
        """Bytes that may still be written: what ``--max-disk`` leaves (as last measured), and never the disk's
        last ``FREE_MARGIN``. A hub model bigger than this is not downloaded."""
        free = shutil.disk_usage(self.root).free - FREE_MARGIN
        if self.cap is None:
            return max(0, free)
        return max(0, min(free, self.cap - (self.used or 0)))

    def shortfall(self, need: int) -> str | None:
        """None when ``need`` bytes (a download) fit in :meth:`room`; else the end of a refusal, for the
        caller's subject: ``"about N MiB to download, M MiB of room (--max-disk C MiB)"``."""
        room = self.room()
        if need <= room:
            return None
        cap = f" (--max-disk {self.cap / 2**20:.0f} MiB)" if self.cap is not None else " (free disk)"
        return f"about {need / 2**20:.0f} MiB to download, {room / 2**20:.0f} MiB of room{cap}"

    def poke(self) -> None:
        """Something was just stored (a row set copied here): check soon rather than in 30 s (with a cap)."""
        if self.cap is not None:
            self._poked.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._poked.clear()
            try:
                await self.check()
            except Exception:
                logger.exception("checking the data dir's size failed")
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._poked.wait())]
            await asyncio.wait(waiters, timeout=CHECK_PERIOD, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if self._poked.is_set() and not stop.is_set():
                await asyncio.sleep(POKE_DELAY)  # several copies arrive together: one check for all

    async def check(self) -> list[Prunable]:
        self.used = await asyncio.to_thread(tree_size, self.root)
        if self.cap is None or self.used <= self.cap:
            self.note = None
            return []
        items = await self._items()
        plan = plan_pruning(items, self.used, self.cap)
        for item in plan:
            await asyncio.to_thread(self._delete, item)
            self.pruned += 1
        if plan:
            await asyncio.to_thread(self._vacuum)
            self.used = await asyncio.to_thread(tree_size, self.root)
            self.book.wake()  # the next rows announcement leaves the pruned row sets out
        if self.used > self.cap:
            self.note = (
                f"the data dir takes {self.used / 2**20:.0f} MiB, over --max-disk {self.cap / 2**20:.0f} MiB; what is "
                "left is the only copy of its rows, the newest checkpoint or a model in use, and is kept"
            )
            logger.warning(self.note)
        else:
            self.note = None
        return plan

    async def _items(self) -> list[Prunable]:
        items: list[Prunable] = []
        for mission_id in list(self.book.missions):
            held = self.store.row_sets(mission_id)
            if held:
                holders = await self.book.holders(mission_id)
                elsewhere = _holders_elsewhere(holders, self.book.peer_id)
                row_bytes = self._row_set_bytes(mission_id)
                for row_set in held:
                    items.append(
                        Prunable(
                            kind="rows", mission_id=mission_id, key=row_set.attempt,
                            size=row_bytes.get(row_set.attempt, 0), added_at=row_set.added_at,
                            replica=row_set.received_from is not None, won=row_set.won,
                            holders_elsewhere=len(elsewhere.get(row_set.attempt, set())),
                        )
                    )  # fmt: skip
            found = sorted(((c.path, c.epoch) for c in self.checkpoints.local(mission_id)), key=lambda c: c[1])
            for index, (path, _epoch) in enumerate(found):
                items.append(
                    Prunable(
                        kind="checkpoint", mission_id=mission_id, key=str(path), size=tree_size(path),
                        added_at=path.stat().st_mtime if path.exists() else 0.0, newest=index == len(found) - 1,
                    )
                )  # fmt: skip
        for model in await asyncio.to_thread(cached_hub_models):
            items.append(
                Prunable(
                    kind="model", mission_id="", key=str(model.path), size=model.size, added_at=model.last_used,
                    newest=in_use(model.ref),
                )
            )  # fmt: skip
        return items

    def _row_set_bytes(self, mission_id: str) -> dict[str, int]:
        rows = self.store.query(
            "SELECT m.attempt AS attempt, SUM(LENGTH(r.body)) AS size FROM row_set_rows m"
            " JOIN rows r ON r.row_id = m.row_id WHERE m.mission_id = ? GROUP BY m.attempt",
            (mission_id,),
        )
        return {r["attempt"]: int(r["size"] or 0) for r in rows}

    def _delete(self, item: Prunable) -> None:
        if item.kind == "rows":
            if self.store.drop_row_set(item.mission_id, item.key):
                logger.info("pruned a copy of row set %s of mission %s (%d other holder(s)) for --max-disk",
                            item.key, item.mission_id[:12], item.holders_elsewhere)  # fmt: skip
                self.pruned_rows.add(item.key)
        elif item.kind == "model":
            shutil.rmtree(item.key, ignore_errors=True)
            logger.info("pruned the unused hub model %s for --max-disk (downloaded again when needed)", item.key)
        else:
            shutil.rmtree(item.key, ignore_errors=True)
            logger.info("pruned the old checkpoint %s for --max-disk", item.key)

    def _vacuum(self) -> None:
        """SQLite keeps freed pages in the file; give them back to the disk."""
        self.store.vacuum()


def _holders_elsewhere(holders: Mapping[str, RowsAnnouncement], me: str) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for peer, announcement in holders.items():
        if peer == me:
            continue
        for held in announcement.row_sets:
            result.setdefault(held.attempt, set()).add(peer)
    return result
