"""Checking the winning row sets of other producers, on a peer that can load the mission's teacher.

Shaking is checkable (``garden.distill.verify``): a teacher-forced pass recomputes a row's top-k at a
fraction of sampling's cost. For each winning row set held here that another peer produced, this peer checks
``verify_fraction`` of its rows (one at least), chosen by a seed nobody controls alone: the row set's own hash,
which the producer fixed before anyone chose anything. A row that fails *refutes* the row set, here:

* its done record is held void, so its shard opens again and is sampled anew, and its rows leave the store
  (the trainer never reads them);
* the producer's other winning row sets in the mission are checked again, every row;
* the producer's later done records for the mission are ignored;
* a signed :class:`~garden.protocol.shards.RefutationRecord` naming the failing row goes on the shard's board.

Another peer's refutation is a claim, weighed by :meth:`Verifier.consider`: from someone this peer trusts (the
mission's lead, a ``--trust-lead``) it is obeyed as if found here; from anyone else it only makes this peer,
when it holds the teacher, check the named row itself when it next checks that row set. So a stranger can
make verifiers recompute one row each per refutation, but cannot take an honest row set out of training.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

from hivemind.utils.timed_storage import get_dht_time

from garden.mission.book import Mission
from garden.mission.leases import LeaseManager, ShardBoard, ShardDHTError
from garden.mission.sampling_process import VerifyJob
from garden.protocol.rows import DorpoRow
from garden.protocol.shards import DoneRecord, RefutationRecord
from garden.store import Store

logger = logging.getLogger(__name__)

PROBATION_ROWS = 32
"""Rows of a producer's row sets in a mission that a peer checks before it drops to ``verify_fraction``: a
producer new to the mission is checked harder (all rows of its first sets, until this many), so one that fakes
a fifth of its rows escapes with a chance of 0.8^32, under 0.1 %, however small its shards. An honest producer
costs this many checks once per mission and verifier."""

Verify = Callable[[VerifyJob], Awaitable[list]]
"""Runs a job in the sampling process (off the event loop) and returns a ``RowCheck`` per row."""


@dataclass
class VerificationState:
    """One mission's checks on this peer (in memory: a restarted peer checks again, which is cheap)."""

    verified: dict[str, str] = field(default_factory=dict)  # attempt whose rows held -> its producer
    refuted: dict[str, str] = field(default_factory=dict)  # attempt -> why
    producers_refuted: set[str] = field(default_factory=set)
    rows_checked: int = 0
    producer_rows: dict[str, int] = field(default_factory=dict)  # producer -> its rows checked here
    checked: dict[str, set[int]] = field(default_factory=dict)  # attempt -> its rows checked here
    claims: dict[str, dict[str, RefutationRecord]] = field(default_factory=dict)  # attempt -> refuter -> claim
    published: int = 0  # refutations this peer signed and stored


@dataclass(frozen=True)
class VerificationSnapshot:
    verified: int
    refuted: int
    pending: int
    rows_checked: int
    producers_refuted: tuple[str, ...]
    unconfirmed: int = 0  # others' refutations not obeyed here: from peers not trusted, their row held or unchecked


def sample_rows(
    done: DoneRecord, rows: int, fraction: float, everything: bool = False, at_least: int = 0
) -> list[int]:
    """Which rows of a row set to check: ``fraction`` of them (one at least, and ``at_least``: the producer's
    probation; none when ``fraction`` is 0), drawn with the row set's hash as the seed, so that its producer
    cannot know beforehand which rows escape."""
    if rows == 0 or (fraction <= 0 and not everything):
        return []
    count = rows if everything else min(rows, max(1, math.ceil(fraction * rows), at_least))
    return sorted(random.Random(int(done.row_set_sha256[:16], 16)).sample(range(rows), count))


class Verifier:
    """:param verify: runs a :class:`VerifyJob` where the teacher is (the sampling process)
    :param peer_id: this peer: its own row sets are not checked"""

    def __init__(self, store: Store, leases: LeaseManager, verify: Verify, peer_id: str) -> None:
        self.store, self.leases, self._verify, self.peer_id = store, leases, verify, peer_id
        self.missions: dict[str, VerificationState] = {}

    async def consider(
        self, mission: Mission, board: ShardBoard, trusted: Collection[str], can_check: bool
    ) -> bool:
        """Weigh the refutations on ``board`` signed by others; True when one was obeyed (a row set voided:
        read the board again). ``trusted``: whose refutations are obeyed unchecked; ``can_check``: whether
        this peer checks rows itself (it shakes: the teacher can load here)."""
        state = self.missions.setdefault(mission.id, VerificationState())
        obeyed = False
        for claim in board.refutations:
            if claim.peer_id == self.peer_id or claim.attempt in state.refuted:
                continue
            done = next((d for d in board.state(claim.shard).results if claim.names(d)), None)
            if done is None:  # no such result (expired, void here already, or never was)
                continue
            if claim.peer_id in trusted:
                why = f"refuted by {claim.peer_id}, whom this peer trusts: row {claim.row}: {claim.reason}"
                await self._refute(mission, state, done, why, claim.row, publish=False)
                obeyed = True
                continue
            claims = state.claims.setdefault(claim.attempt, {})
            if done.peer_id == self.peer_id or claim.peer_id in claims:
                continue  # this peer's own rows: it sampled them with the teacher, a stranger's word does not undo that
            claims[claim.peer_id] = claim
            logger.info("shard %d of mission %s: %s says the row set of %s (attempt %s) fails at row %d: %s",
                        claim.shard, mission.id[:12], claim.peer_id, done.peer_id, done.attempt, claim.row,
                        claim.reason[:120])  # fmt: skip
            if can_check and claim.row not in state.checked.get(claim.attempt, set()):
                state.verified.pop(claim.attempt, None)  # pending again: the named row is checked next
        return obeyed

    def pending(self, mission: Mission, board: ShardBoard) -> list[DoneRecord]:
        """Winning row sets held here, produced elsewhere, not checked yet (shard order)."""
        state = self.missions.setdefault(mission.id, VerificationState())
        held = {s.attempt for s in self.store.row_sets(mission.id)}
        return [
            done for _, done in sorted(board.winners().items())
            if done.peer_id != self.peer_id and done.attempt in held
            and done.attempt not in state.verified and done.attempt not in state.refuted
        ]  # fmt: skip

    def snapshot(self, mission: Mission, board: ShardBoard | None) -> VerificationSnapshot:
        state = self.missions.get(mission.id, VerificationState())
        pending = len(self.pending(mission, board)) if board is not None else 0
        return VerificationSnapshot(
            verified=len(state.verified), refuted=len(state.refuted), pending=pending,
            rows_checked=state.rows_checked, producers_refuted=tuple(sorted(state.producers_refuted)),
            unconfirmed=sum(len(c) for a, c in state.claims.items() if a not in state.refuted),
        )  # fmt: skip

    async def check(self, mission: Mission, done: DoneRecord) -> bool:
        """Check one row set; True if it held (or had nothing to check). A refutation acts at once."""
        state = self.missions.setdefault(mission.id, VerificationState())
        spec = mission.signed.spec
        bodies = await asyncio.to_thread(self.store.row_set_bodies, mission.id, done.attempt)
        if bodies is None:  # dropped meanwhile (a loser, pruned)
            return True
        rows = await asyncio.to_thread(lambda: [DorpoRow.from_msgpack(b, max_bytes=len(b)) for b in bodies])
        probation = max(0, PROBATION_ROWS - state.producer_rows.get(done.peer_id, 0))
        sampled = sample_rows(
            done, len(rows), spec.sampling.verify_fraction, done.peer_id in state.producers_refuted, probation
        )
        claims = state.claims.get(done.attempt, {})
        chosen = sorted({*sampled, *(c.row for c in claims.values() if c.row < len(rows))})
        state.checked.setdefault(done.attempt, set()).update(chosen)
        prompts = {p.prompt: p for p in mission.shard(done.shard)}
        failed: tuple[int, str] | None = None
        by_teacher: dict[str, list[int]] = {}
        for index in chosen:
            if rows[index].teacher not in spec.teachers:
                failed = index, f"it names the teacher {rows[index].teacher}, which the mission does not"
                break
            by_teacher.setdefault(rows[index].teacher, []).append(index)
        for teacher, indices in by_teacher.items():
            if failed is not None:
                break
            job = VerifyJob(spec, teacher, [rows[i] for i in indices], [prompts[rows[i].prompt] for i in indices])
            checks = await self._verify(job)
            state.rows_checked += len(indices)
            state.producer_rows[done.peer_id] = state.producer_rows.get(done.peer_id, 0) + len(indices)
            failed = next(((i, c.reason) for i, c in zip(indices, checks, strict=True) if c.reason is not None), None)
        if failed is None:
            state.verified[done.attempt] = done.peer_id
            logger.info("shard %d of mission %s: %d of %d rows of %s's row set checked, all hold", done.shard,
                        mission.id[:12], len(chosen), len(rows), done.peer_id)  # fmt: skip
            for refuter, claim in claims.items():
                logger.warning("shard %d of mission %s: %s's refutation of %s's row set is not confirmed here: row "
                               "%d holds", done.shard, mission.id[:12], refuter, done.peer_id, claim.row)  # fmt: skip
            return True
        await self._refute(mission, state, done, f"row {failed[0]}: {failed[1]}", failed[0], publish=True)
        return False

    async def _refute(
        self, mission: Mission, state: VerificationState, done: DoneRecord, reason: str, row: int, publish: bool
    ) -> None:
        """Act on a refutation (found here, or by a peer this one trusts); ``publish``: sign and store it."""
        state.refuted[done.attempt] = reason
        logger.warning("shard %d of mission %s: the row set of %s (attempt %s) is refuted: %s; the shard is open "
                       "again here, and the producer's other row sets are checked in full", done.shard,
                       mission.id[:12], done.peer_id, done.attempt, reason)  # fmt: skip
        self.leases.void(done)
        self.leases.distrust(done.mission_id, done.peer_id, since=get_dht_time())
        await asyncio.to_thread(self.store.drop_row_set, mission.id, done.attempt)
        if done.peer_id not in state.producers_refuted:
            state.producers_refuted.add(done.peer_id)
            for attempt, producer in list(state.verified.items()):  # checked with a sample: again, every row
                if producer == done.peer_id:
                    del state.verified[attempt]
        if publish:
            try:
                await self.leases.refute(done, row, reason)
                state.published += 1
            except ShardDHTError as e:  # the finding still holds here; others may find it themselves
                logger.warning("could not publish the refutation of shard %d: %s", done.shard, e)
