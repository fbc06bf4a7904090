"""Row sets on this peer: keep the ones it samples, copy them to other peers, take copies from others,
and drop the ones that lost their shard.

Replication is pull-based: a producer *offers* a row set to a peer (``ContentTransfer.offer``), and the
peer takes it only when a signed done record on the shard's board names it (its attempt, producer and
hash: a stranger's invented row set is refused before a byte moves), fetches it back from the offerer,
checks its hash and that its rows answer the shard's prompts, then stores it. So nobody can push unchecked
data onto a peer, and the same fetch serves late copies (``top_up``: a winning row set held by fewer than
``copies`` peers) and exports (``gather``).

Which attempt won a shard is decided by the shard records (``garden.protocol.shards.pick_winner``); this
module gets the winners and losers from its caller (``garden.mission.shaking``), which reads them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from garden.mission.book import Mission, MissionBook, parse_row_set_item, row_set_item
from hivemind.utils.timed_storage import get_dht_time

from garden.mission.leases import LeaseManager, ShardDHTError
from garden.host.disk import DiskKeeper
from garden.net.transfer import ContentTransfer, TransferError
from garden.protocol.content import ContentRef
from garden.protocol.records import RecordError
from garden.protocol.row_sets import RowsAnnouncement, pack_row_set, row_set_sha256, unpack_row_set
from garden.protocol.rows import DorpoRow
from garden.protocol.shards import DoneRecord
from garden.store import Store, StoredRowSet

logger = logging.getLogger(__name__)

DEFAULT_COPIES = 2
"""Peers that should hold each winning row set: its producer and at least one more."""


@dataclass(frozen=True)
class SettleReport:
    dropped: int = 0  # losing row sets dropped here
    fetched: int = 0  # winning row sets copied here


class RowSetKeeper:
    """:param disk: the data dir's keeper: told when a copy arrives, and asked which copies it pruned (those
        are not copied back)
    :param leases: where offered row sets are looked up: an offer is taken only when a done record names it,
        and where a winning done record is held void when its row set is never served here
    :param void_after: seconds after a winning done record was finished past which, if no peer served its row
        set here yet, the record is void (``--void-after``); one whose served rows do not fit the shard is void
        at once"""

    def __init__(
        self,
        store: Store,
        book: MissionBook,
        transfer: ContentTransfer,
        disk: DiskKeeper,
        leases: LeaseManager,
        copies: int = DEFAULT_COPIES,
        void_after: float = 600.0,
    ):
        self.store, self.book, self.transfer, self.disk, self.copies = store, book, transfer, disk, copies
        self.leases, self.void_after = leases, void_after
        self.voided = 0  # winning done records held void here (their rows never served, or not the shard's)
        self.peer_id = book.peer_id
        self.refused = 0  # offers or fetches refused for bad content
        transfer.accept_offers("rows", self.on_offer)

    def held(self, mission_id: str) -> int:
        """Row sets of the mission held here (own and copies)."""
        return self.store.count_row_sets(mission_id)

    # --- this peer's own work -------------------------------------------------------------------------
    async def keep_own(self, mission: Mission, shard: int, attempt: str, rows: Sequence[DorpoRow]) -> StoredRowSet:
        """Store the rows this peer sampled for ``shard`` (in the shard's prompt order) as one row set. Encoding,
        hashing and the write (tens of MiB for a big shard) run off the event loop."""

        def write() -> StoredRowSet:
            held = StoredRowSet(
                mission_id=mission.id, attempt=attempt, shard=shard, producer=self.peer_id,
                sha256=row_set_sha256(pack_row_set(rows)), rows=len(rows), received_from=None, added_at=time.time(),
            )  # fmt: skip
            self.store.add_row_set(held, [(row.row_id, row.to_msgpack(), row.prompt) for row in rows])
            return held

        held = await asyncio.to_thread(write)
        self.book.wake()
        return held

    async def replicate(self, mission: Mission, held: StoredRowSet, candidates: Sequence[str]) -> list[str]:
        """Offer ``held`` to ``candidates`` in order until ``copies - 1`` peers took it; returns those peers."""
        ref = self._ref(mission.id, held.shard, held.attempt, held.producer, held.sha256)
        taken: list[str] = []
        for peer in candidates:
            if len(taken) >= self.copies - 1:
                break
            if peer == self.peer_id:
                continue
            try:
                ok, reason = await self.transfer.offer(peer, ref)
            except TransferError as e:
                logger.info("could not offer shard %d to %s: %s", held.shard, peer, e)
                continue
            if ok:
                taken.append(peer)
            else:
                logger.info("%s declined shard %d of mission %s: %s", peer, held.shard, mission.id[:12], reason)
        return taken

    # --- other peers' row sets ------------------------------------------------------------------------
    async def on_offer(self, sender: str, ref: ContentRef) -> tuple[bool, str]:
        """Another peer offers a row set: fetch it from that peer, check it, keep it."""
        if ref.kind != "rows":
            return False, f"only row sets are taken, not {ref.kind}"
        try:
            shard, attempt, producer = parse_row_set_item(ref.item)
        except ValueError as e:
            return False, str(e)
        mission = self.book.missions.get(ref.mission_id)
        if mission is None:
            await self.book.refresh()
            mission = self.book.missions.get(ref.mission_id)
        if mission is None:
            return False, f"unknown mission {ref.mission_id[:12]}"
        if mission.prompts is None and not await self.book.fetch_prompts(mission):
            return False, "the mission's prompts are not here yet"
        if not 0 <= shard < mission.shard_count:
            return False, f"shard {shard} is out of range"
        try:
            board = await self.leases.fetch(mission.id, mission.shard_count)
        except ShardDHTError as e:
            return False, f"cannot read the shard's done records now: {e}"
        named = any(
            (r.attempt, r.peer_id, r.row_set_sha256) == (attempt, producer, ref.sha256)
            for r in board.state(shard).results
        )
        if not named:
            self.refused += 1
            logger.info("refused an offered row set of shard %d from %s: no done record names it", shard, sender)
            return False, "no done record names this row set"
        try:
            await self.fetch(mission, shard, attempt, producer, ref.sha256, [sender])
        except TransferError as e:  # the short reason first: the reply is capped at 200 characters
            return False, f"{e.reason}: {e.detail}" if e.detail else e.reason
        except RecordError as e:
            return False, str(e)
        self.disk.poke()
        return True, "stored"

    async def fetch(
        self, mission: Mission, shard: int, attempt: str, producer: str, sha256: str, peers: Sequence[str]
    ) -> bool:
        """Copy a row set here from the first of ``peers`` that serves it intact; False if already held.
        Raises ``TransferError`` (no peer served it) or ``RecordError`` (its rows do not fit the shard)."""
        if any(s.attempt == attempt for s in self.store.row_sets(mission.id)):
            return False
        if not 0 <= shard < mission.shard_count:
            raise RecordError(f"shard {shard} is out of range for mission {mission.id[:12]}")
        raw, source = await self.transfer.fetch_any(peers, self._ref(mission.id, shard, attempt, producer, sha256))
        try:  # up to 64 MiB to decode, check and encode for the store: never on the event loop
            rows, encoded = await asyncio.to_thread(_decode_fitting, raw, mission.shard(shard))
        except RecordError as e:
            self.refused += 1
            logger.warning("refused the row set of shard %d from %s: %s", shard, source, e)
            raise
        held = StoredRowSet(
            mission_id=mission.id, attempt=attempt, shard=shard, producer=producer, sha256=sha256,
            rows=len(rows), received_from=source, added_at=time.time(),
        )  # fmt: skip
        await asyncio.to_thread(self.store.add_row_set, held, encoded)
        logger.info("copied shard %d of mission %s (%d rows) from %s", shard, mission.id[:12], len(rows), source)
        self.book.wake()
        return True

    # --- settling: drop losers, top up winners ------------------------------------------------------
    async def settle(
        self,
        mission: Mission,
        winners: Mapping[int, DoneRecord],
        losers: Sequence[DoneRecord],
        holders: Mapping[str, RowsAnnouncement],
        every_winner: bool = False,
    ) -> SettleReport:
        """Make this peer's row sets agree with the shard records: copy winning sets held by fewer than
        ``copies`` peers (every winning set with ``every_winner``: a trainer's), then drop those that lost their
        shard (``droppable``); then mark which held sets won (what the trainer reads, and what pruning keeps
        longest). A winner is void here when its rows are never served only where it lacks copies: one a
        trainer merely wants, held by enough others, is tried again at the next settling.

        A held set that no done record names (an orphan) loses too, ``void_after`` seconds after it arrived,
        once another attempt won its shard: its record was lost (stored on DHT nodes that left or do not
        answer, or never stored: a publish that gave up), so no peer counts it, and nothing else would ever
        drop it. The wait, as long as a winner's rows are waited for, lets a record one read missed show up."""
        held_by = _held_by(holders)
        held_sets = self.store.row_sets(mission.id)
        mine = {s.attempt for s in held_sets}
        fetched = 0
        for done, scarce in to_copy(winners, mine, self.disk.pruned_rows, held_by, self.copies, every_winner):
            shard, sources = done.shard, _sources(done, held_by)
            try:
                if await self.fetch(mission, shard, done.attempt, done.peer_id, done.row_set_sha256, sources):
                    fetched += 1
            except TransferError as e:
                late = get_dht_time() - done.finished
                if late <= self.void_after or not scarce:
                    logger.info("could not copy shard %d of mission %s yet: %s", shard, mission.id[:12], e)
                    continue
                self._void(done, f"no peer served its row set in {late:.0f} s ({e})")
            except RecordError as e:
                self._void(done, f"its row set does not answer the shard ({e})")
        if fetched:
            held_sets = self.store.row_sets(mission.id)
        dropped = 0
        for held, why in droppable(held_sets, winners, losers, held_by, time.time(), self.void_after, self.copies):
            if await asyncio.to_thread(self.store.drop_row_set, mission.id, held.attempt):
                dropped += 1
                logger.info("dropped attempt %s at shard %d of mission %s: %s", held.attempt, held.shard,
                            mission.id[:12], why)  # fmt: skip
        await asyncio.to_thread(self.store.mark_winners, mission.id, [d.attempt for d in winners.values()])
        if fetched or dropped:
            self.book.wake()
        return SettleReport(dropped=dropped, fetched=fetched)

    def _void(self, done: DoneRecord, why: str) -> None:
        """A done record that names rows nobody can have: the shard opens again here, and is sampled anew."""
        self.leases.void(done)
        self.voided += 1
        logger.warning("shard %d of mission %s: the done record of %s (attempt %s) is void here: %s; the shard "
                       "is open again", done.shard, done.mission_id[:12], done.peer_id, done.attempt, why)  # fmt: skip

    async def gather(
        self, mission: Mission, winners: Mapping[int, DoneRecord], holders: Mapping[str, RowsAnnouncement]
    ) -> list[int]:
        """Copy here every winning row set not held yet (for an export); returns the shards still missing."""
        held_by = _held_by(holders)
        mine = {s.attempt for s in self.store.row_sets(mission.id)}
        missing = []
        for done, _ in to_copy(winners, mine, (), held_by, self.copies, every_winner=True):
            try:
                await self.fetch(
                    mission, done.shard, done.attempt, done.peer_id, done.row_set_sha256, _sources(done, held_by)
                )
            except (TransferError, RecordError) as e:
                logger.warning("shard %d of mission %s is not reachable now: %s", done.shard, mission.id[:12], e)
                missing.append(done.shard)
        return missing

    def winner_rows(self, mission: Mission, winners: Mapping[int, DoneRecord]) -> list[DorpoRow]:
        """The rows of the winning row sets held here, in shard order (the mission's rows)."""
        rows: list[DorpoRow] = []
        for _, done in sorted(winners.items()):
            bodies = self.store.row_set_bodies(mission.id, done.attempt)
            for body in bodies or []:
                rows.append(DorpoRow.from_msgpack(body, max_bytes=len(body)))
        return rows

    @staticmethod
    def _ref(mission_id: str, shard: int, attempt: str, producer: str, sha256: str) -> ContentRef:
        return ContentRef(
            kind="rows", mission_id=mission_id, item=row_set_item(shard, attempt, producer), sha256=sha256
        )


def to_copy(
    winners: Mapping[int, DoneRecord],
    mine: Collection[str],
    pruned: Collection[str],
    held_by: Mapping[str, set[str]],
    copies: int,
    every_winner: bool,
) -> list[tuple[DoneRecord, bool]]:
    """The winning row sets to copy here, by shard, each with whether it is scarce (held by fewer than ``copies``
    peers, its producer counted): those, or all with ``every_winner``; never one held here (``mine``) or that
    this peer pruned for disk space (``pruned``)."""
    wanted = []
    for _, done in sorted(winners.items()):
        scarce = len(held_by.get(done.attempt, set()) | {done.peer_id}) < copies
        if done.attempt not in mine and done.attempt not in pruned and (scarce or every_winner):
            wanted.append((done, scarce))
    return wanted


def droppable(
    held: Sequence[StoredRowSet],
    winners: Mapping[int, DoneRecord],
    losers: Sequence[DoneRecord],
    held_by: Mapping[str, set[str]],
    now: float,
    orphan_after: float,
    copies: int = DEFAULT_COPIES,
) -> list[tuple[StoredRowSet, str]]:
    """The ``held`` row sets that lost their shard and may go now, each with why: a losing attempt, or an
    orphan (no done record names it) held for ``orphan_after`` seconds, of a shard whose winner is held here or
    by ``copies`` peers (``held_by``: attempt -> peers announcing it), so that a winner that turns out
    unreachable does not leave its shard with no rows anywhere."""
    mine = {s.attempt for s in held}
    losing = {d.attempt for d in losers}
    named = losing | {d.attempt for d in winners.values()}
    gone: list[tuple[StoredRowSet, str]] = []
    for s in held:
        winner = winners.get(s.shard)
        if winner is None or s.attempt == winner.attempt:
            continue
        if winner.attempt not in mine and len(held_by.get(winner.attempt, set())) < copies:
            continue  # the winner is not safely held yet
        if s.attempt in losing:
            gone.append((s, "it lost the shard"))
        elif s.attempt not in named and now - s.added_at >= orphan_after:
            gone.append((s, f"no done record names it, and {winner.peer_id}'s attempt {winner.attempt} won the shard"))
    return gone


def _held_by(holders: Mapping[str, RowsAnnouncement]) -> dict[str, set[str]]:
    """attempt -> peers announcing its row set."""
    result: dict[str, set[str]] = {}
    for peer, announcement in holders.items():
        for held in announcement.row_sets:
            result.setdefault(held.attempt, set()).add(peer)
    return result


def _sources(done: DoneRecord, held_by: Mapping[str, set[str]]) -> list[str]:
    """Whom to ask for a winning row set: the peers announcing it, then its producer if it does not (a producer
    that announces nothing may still serve it, or may have gone)."""
    peers = held_by.get(done.attempt, set())
    return sorted(peers) + ([done.peer_id] if done.peer_id not in peers else [])


def _decode_fitting(raw: bytes, prompts: Sequence[object]) -> tuple[list[DorpoRow], list[tuple[str, bytes, str]]]:
    """A fetched row set's rows, checked against its shard's prompts, and encoded as the store keeps them."""
    rows = unpack_row_set(raw)
    _check_rows_fit(rows, prompts)
    return rows, [(row.row_id, row.to_msgpack(), row.prompt) for row in rows]


def _check_rows_fit(rows: Sequence[DorpoRow], prompts: Sequence[object]) -> None:
    """A row set must answer its shard's prompts, in order, each at most once (a judge may drop some)."""
    texts = [getattr(p, "prompt", None) for p in prompts]
    position = 0
    for i, row in enumerate(rows):
        while position < len(texts) and texts[position] != row.prompt:
            position += 1
        if position == len(texts):
            raise RecordError(f"row {i} answers {row.prompt[:60]!r}, which is not a prompt of this shard (in order)")
        position += 1
