"""The daemon's work on missions: shake leased shards (peers with the ``shaker`` role), settle row sets
(every peer), and describe each mission's progress for the HTTP port.

Scheduling:

* at most one shard at a time per mission, and one shard at a time on the whole peer: shaking is
  CPU-bound and ``--max-threads`` caps torch's threads, so two shards at once would only slow each other
  (and hold two leases) while the claim for the second waits;
* the teacher is loaded once and kept while there is work; after ``teacher_idle_s`` without a shard it
  is unloaded from the sampling process, so an idle volunteer's RAM is given back;
* before claiming, the peer checks that the first teacher fits in memory (available RAM, capped by
  ``--max-memory``) and its download on disk (``--max-disk``); if not, it takes no shards and says why
  (:attr:`MissionWork.blocked`, in ``/status``);
* the shard's lease is renewed in the background while the teacher samples; a lost lease (another
  attempt finished the shard) throws the work away rather than publishing a result that cannot win.

Teachers load and sample in the daemon's sampling process (:mod:`garden.mission.sampling_process`), never in
the event loop's process: their long calls hold the GIL. A thread of the daemon waits for each answer (not the
event loop's executor), so a daemon that is stopped mid-shard exits at once: the lease is released, the
unfinished shard is lost, and nothing half-done is stored.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar


from garden.errors import GardenError
from garden.models.loading import (
    ModelRefError,
    held_elsewhere,
    model_disk_bytes,
    model_memory_bytes,
    parse_model_ref,
)
from garden.host.contribution import Ledger
from garden.host.cpu_budget import lower_this_thread
from garden.host.disk import DiskKeeper
from garden.host.governor import Governor
from garden.host.memory import memory_shortfall
from garden.lifecycle import Service
from garden.net.directory import PeerDirectory
from garden.mission.book import Mission, MissionBook, wait_any
from garden.mission.replication import RowSetKeeper
from garden.mission.students import SwarmStudents
from garden.protocol.checkpoints import STUDENT_SCHEME
from garden.store import StoredRowSet, StoreError
from garden.protocol.row_sets import RowsAnnouncement
from garden.protocol.rows import DorpoRow
from garden.mission.leases import Lease, LeaseLostError, LeaseManager, ShardBoard, ShardDHTError, ShardSummary
from garden.distill.shaker import ShakeCancelled
from garden.distill.teachers import FallbackShakeResult, NoTeacherError
from garden.mission.verification import Verifier, VerificationSnapshot
from garden.mission.sampling_process import (
    HOLD, POLL, RUN, STOP, SamplerCrashed, SamplerSetup, SamplingProcess, ShardJob, VerifyJob,
)  # fmt: skip

logger = logging.getLogger(__name__)

T = TypeVar("T")
FINISH_ON_STOP = 3.0
"""Seconds a stopping peer waits for sampled shards to be replicated and published."""
CONFIRM_AFTER = 1.0
"""Seconds after a claim when the lease is checked (and renewed) the first time."""
PUBLISH_RETRY = (2.0, 10.0, 30.0)
"""Seconds before each new try to store and publish a finished shard (a full disk, a DHT that does not
answer); the lease is renewed meanwhile."""
SHAKE_THREAD = "garden-shake"
VERIFY_PER_ROUND = 4
"""Row sets a peer checks per mission per round of its loop, so that checking never starves sampling."""
VERIFY_RETRY = 300.0
"""Seconds a mission's checks wait after they could not run (its teacher does not load here, a dead child)."""


def sampling_in_progress() -> bool:
    """A thread of this process waits on a shard or a teacher (or, in a process without a sampling process,
    is inside torch): the runner then leaves without finalising the interpreter, which could abort there."""
    return any(t.name == SHAKE_THREAD and t.is_alive() for t in threading.enumerate())
"""Name of the threads that sample shards (the runner looks for them at exit)."""


@dataclass(frozen=True)
class WorkConfig:
    """:param shaker: this peer has the shaker role (else it only settles and serves row sets)
    :param period: seconds between looks at the missions when there is nothing to do
    :param teacher_idle_s: unload a teacher after this long without a shard
    :param batch_prompts: prompts per sampling batch (a shard may be several batches)
    :param max_memory: bytes the daemon may use for a teacher (None: the machine's available RAM)
    :param max_missions: missions this peer shakes at once (each loads its teacher); the others wait
    :param threads: torch threads of the sampling process (``--max-threads``; None: torch's default)
    :param trainer: this peer has the trainer role: it copies every winning row set of the missions it takes,
        not only those held by fewer than two peers (a trainer trains on the rows it holds; one that held none,
        its shards all copied twice elsewhere, would never start, and with ``min_trainers`` hold every other
        trainer back)
    """

    shaker: bool = True
    trainer: bool = False
    period: float = 5.0
    teacher_idle_s: float = 300.0
    batch_prompts: int = 16
    max_memory: int | None = None
    max_missions: int = 2
    threads: int | None = None


@dataclass
class MissionProgress:
    """What this peer has done for one mission (for ``GET /missions/{id}`` and ``/metrics``)."""

    state: str = "idle"  # what this peer is doing for it, in words
    shards_shaken: int = 0
    rows_shaken: int = 0
    shards_lost: int = 0  # attempts thrown away (lease lost, or another attempt won)
    replicated: int = 0  # copies of own row sets other peers took
    started: float | None = None
    seconds_shaking: float = 0.0
    publish_error: str | None = None  # the last failure to store or publish a finished shard (None once one works)


@dataclass
class MissionView:
    """One mission's progress as this peer sees it (board from the DHT, holders, local work)."""

    mission: Mission
    board: ShardBoard | None
    holders: dict[str, RowsAnnouncement]
    progress: MissionProgress
    teachers: dict[str, int] = field(default_factory=dict)
    trusted: bool = True  # its lead is one this peer works for (--trust-lead)
    refused: str | None = None  # why this peer does not work on it (an untrusted lead, a local path)
    verification: VerificationSnapshot | None = None  # other producers' row sets checked here

    @property
    def state(self) -> str:
        if self.mission.cancelled:
            return "cancelled"
        if self.refused is not None and (self.board is None or not self.board.all_done):
            return "not worked on here"
        if self.mission.prompts is None:
            return "fetching"
        if self.board is not None and self.board.all_done:
            return "done"
        return "shaking"

    @property
    def rows(self) -> int:
        if self.board is None:
            return 0
        return sum(done.rows for done in self.board.winners().values())


@dataclass(frozen=True)
class MissionWorkSnapshot:
    """One mission's shaking as ``/status`` and ``/metrics`` show it, without a DHT read.

    :param seen: the shaking loop has looked at the mission on this peer (``/status`` lists only those)
    :param state: what this peer is doing for it, in words
    :param shards: the shards by state on the last board seen, None before one was read
    :param rows_done: rows of the shards done (winning attempts) on that board
    :param row_sets_held: row sets of the mission stored here, own and copies
    :param publish_error: the last failure to store or publish a finished shard, None once one works
    """

    name: str
    seen: bool
    state: str
    shards: ShardSummary | None
    rows_done: int
    shards_shaken: int
    rows_shaken: int
    row_sets_held: int
    publish_error: str | None = None


@dataclass(frozen=True)
class ShakingSnapshot:
    """:param blocked: why this peer takes no shards (memory), or None
    :param row_sets_refused: row sets fetched intact (hash right) whose rows were invalid or did not fit
    :param missions: every mission of the book, by id
    :param done_records_voided: winning done records held void here (rows never served, or not the shard's)
    :param sampler_pid: the sampling process (None: not running), ``sampler_starts`` times started, and the
      models it holds"""

    blocked: str | None
    row_sets_refused: int
    missions: dict[str, MissionWorkSnapshot]
    sampler_pid: int | None = None
    sampler_starts: int = 0
    done_records_voided: int = 0
    teachers_loaded: frozenset[str] = frozenset()


class MissionWork(Service):
    """:param directory: the swarm's peers, among whom row sets are copied"""

    name = "shaking"

    def __init__(
        self,
        book: MissionBook,
        keeper: RowSetKeeper,
        leases: LeaseManager,
        directory: PeerDirectory,
        config: WorkConfig,
        governor: Governor | None = None,
        ledger: Ledger | None = None,
        disk: DiskKeeper | None = None,
        students: SwarmStudents | None = None,
    ):
        self.book, self.keeper, self.leases, self.config = book, keeper, leases, config
        self.governor, self.ledger, self.directory, self.disk = governor, ledger, directory, disk
        self.students = students  # a teacher named mission:<id> (distil the distilled) is pulled through it
        self.progress: dict[str, MissionProgress] = {}
        self.boards: dict[str, ShardBoard] = {}
        self.blocked: str | None = None  # why this peer takes no shards (memory, disk), or None
        self.errors: Counter[str] = Counter()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._compute = asyncio.Lock()  # one shard at a time on this peer
        self._leases: dict[str, Lease] = {}  # attempt -> a lease being sampled or finished
        self._finishing: set[asyncio.Task[None]] = set()
        self._teachers_used: dict[str, float] = {}  # teacher ref -> monotonic time of its last shard
        self._memory_need: dict[str, int | None] = {}
        self._stop = asyncio.Event()
        self.sampler = SamplingProcess(SamplerSetup(threads=config.threads))
        self.verifier = Verifier(keeper.store, leases, self._verify_job, book.peer_id)
        self._verify_failed: dict[str, float] = {}  # mission id -> when its checks last could not run

    # --- the loop -----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.governor is not None:  # a pause or resume: look again at once, from the loop's thread
            self.governor.on_change(functools.partial(asyncio.get_running_loop().call_soon_threadsafe, self.book.wake))

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        while not stop.is_set():
            for mission in list(self.book.missions.values()):
                try:
                    await self._tend(mission)
                except Exception:  # one mission's trouble must not stop the others
                    logger.exception("mission %s: settling failed", mission.id[:12])
            for gone in set(self.verifier.missions) - set(self.book.missions):  # dropped from the book
                self.verifier.missions.pop(gone, None)
                self.leases.forget(gone)
            await self._unload_idle_teachers()
            await self._pause(stop)
        await self.close()

    async def _pause(self, stop: asyncio.Event) -> None:
        """Wait a period, or less when the book has news (a new mission, its prompts, a cancel)."""
        await wait_any((stop, self.book.news), timeout=self.config.period)
        self.book.news.clear()

    async def _tend(self, mission: Mission) -> None:
        self.leases.know(mission.id, mission.signed.body.created)
        refused = self.book.refusal(mission)
        if refused is not None:  # listed, never worked on: no shard, no copies of its rows
            self.progress.setdefault(mission.id, MissionProgress()).state = f"not worked on: {refused}"
            return
        try:
            board = await self.leases.fetch(mission.id, mission.shard_count)
            trusted = {mission.signed.lead_peer_id, *self.book.policy.trusted_leads}
            if await self.verifier.consider(mission, board, trusted, can_check=self.config.shaker):
                board = await self.leases.fetch(mission.id, mission.shard_count)  # without what was refuted
        except ShardDHTError as e:
            logger.info("mission %s: shards unreadable now: %s", mission.id[:12], e)
            return
        self.boards[mission.id] = board
        progress = self.progress.setdefault(mission.id, MissionProgress())
        if board.winners():
            holders = await self.book.holders(mission.id)
            await self.keeper.settle(
                mission, board.winners(), board.losing_attempts(), holders, every_winner=self.config.trainer
            )
            await self._keep_results_alive(mission, board)
        else:  # every winner voided or refuted since: none of the held sets is trained on
            await asyncio.to_thread(self.keeper.store.mark_winners, mission.id, ())
        if self.config.shaker and not self._paused and not mission.cancelled:
            await self._verify_some(mission, board)
        if mission.cancelled:
            progress.state = "cancelled"
        elif board.all_done:
            progress.state = "done"
        elif mission.prompts is None:
            progress.state = "waiting for the prompts"
        elif not self.config.shaker:
            progress.state = "not shaking (no shaker role)"
        elif self._paused:
            progress.state = "paused"
        elif mission.id not in self._workers or self._workers[mission.id].done():
            busy = sum(1 for task in self._workers.values() if not task.done())
            if busy >= self.config.max_missions:
                progress.state = f"waiting: shaking {busy} other missions (max_missions {self.config.max_missions})"
                return
            self._workers[mission.id] = asyncio.create_task(
                self._shake_mission(mission), name=f"shake-{mission.id[:8]}"
            )

    @property
    def compute(self) -> asyncio.Lock:
        """The peer's one slot for heavy work: a shard, a verification, a checkpoint's evaluation."""
        return self._compute

    @property
    def _paused(self) -> bool:
        return self.governor is not None and self.governor.paused

    async def _keep_results_alive(self, mission: Mission, board: ShardBoard) -> None:
        """Re-store the winning done records of the row sets held here before they expire: a done record
        gone from the DHT would make its shard look open, and the swarm would sample it again."""
        held = {s.attempt for s in self.keeper.store.row_sets(mission.id)}
        for done in board.winners().values():
            if done.attempt in held:
                try:
                    await self.leases.keep_alive(board, done)
                except ShardDHTError as e:
                    logger.info("could not renew the result of shard %d: %s", done.shard, e)

    async def close(self) -> None:
        """Stop shaking: cancel workers and give their leases back so others need not wait for expiry."""
        for task in self._workers.values():
            task.cancel()
        for task in self._workers.values():
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._workers.clear()
        if self._finishing:  # shards already sampled: let them reach their done record if they can
            _, late = await asyncio.wait(set(self._finishing), timeout=FINISH_ON_STOP)
            for task in late:
                task.cancel()
        for lease in list(self._leases.values()):
            try:
                await asyncio.wait_for(self.leases.release(lease), timeout=self.leases.config.dht_timeout)
            except Exception as e:
                logger.info("could not release shard %d: %s", lease.shard, e)
        self._leases.clear()
        await asyncio.to_thread(self.sampler.close)  # a shard it still samples gets STOP first: its lease is gone
        held_elsewhere(frozenset())

    # --- shaking --------------------------------------------------------------------------------------
    async def _shake_mission(self, mission: Mission) -> None:
        """Claim and sample shards of ``mission`` one at a time until none is open or it is cancelled.

        Only the sampling holds the peer's compute lock: storing, replicating and publishing a finished
        shard (network round trips to other peers) run as a task of their own while the next shard is
        already being sampled, so the CPU does not wait on the network."""
        progress = self.progress.setdefault(mission.id, MissionProgress())
        while not self._stop.is_set() and not mission.cancelled:
            if self._paused:
                progress.state = "paused"
                return
            if self.governor is not None and self.governor.held_reason:
                progress.state = f"waiting: {self.governor.held_reason}"
                await self.governor.wait_until_free(self._stop)  # no lease is held while the owner works
                continue
            if not await self._has_models(mission, progress):
                return
            async with self._compute:
                if not await self._fits(mission):
                    progress.state = f"not shaking: {self.blocked}"
                    return
                await self._load_teacher(mission)  # before the claim: no lease is held while a teacher loads
                try:
                    lease = await self.leases.claim(mission.id, mission.shard_count, hint=self.boards.get(mission.id))
                except ShardDHTError as e:
                    progress.state = f"waiting: {e}"
                    return
                if lease is None:
                    progress.state = "waiting: every open shard is leased"
                    return
                self._leases[lease.attempt] = lease
                progress.state = f"shaking shard {lease.shard}"
                lost = asyncio.Event()
                renewer = asyncio.create_task(self._renew(lease, lost))
                failed = False
                try:
                    sampled = await self._sample(mission, lease, progress, lost)
                except Exception as e:  # a bug or a broken teacher: give the shard back, try again later
                    logger.exception("mission %s: shard %d failed", mission.id[:12], lease.shard)
                    self.errors[type(e).__name__] += 1
                    progress.state = f"shard {lease.shard} failed: {type(e).__name__}: {str(e)[:200]}"
                    sampled, failed = None, True
                if sampled is None:
                    renewer.cancel()
                    if not lost.is_set():
                        await self._release(lease)
                    self._leases.pop(lease.attempt, None)
                    if failed or self.blocked:
                        return
                    continue  # the lease was lost to another attempt: take another shard
            finishing = asyncio.create_task(self._finish(mission, lease, sampled, renewer, progress))
            self._finishing.add(finishing)
            finishing.add_done_callback(self._finishing.discard)

    async def _has_models(self, mission: Mission, progress: MissionProgress) -> bool:
        """Whether the mission's teachers that are swarm students (``mission:<id>``) are on this machine: pulled
        here on first use (every file checked); False with the reason in ``progress`` until they are."""
        for ref in mission.signed.spec.teachers:
            if self.students is None or not ref.startswith(STUDENT_SCHEME):
                continue
            try:
                await self.students.resolve(ref)
            except (ModelRefError, GardenError) as e:
                progress.state = f"waiting for the teacher {ref}: {e}"
                return False
        return True

    async def _load_teacher(self, mission: Mission) -> None:
        """Load the mission's first teacher (kept in the sampling process); a failure is left to the
        multi-teacher fallback, which tries the next teacher when the shard is sampled."""
        ref = mission.signed.spec.teachers[0]
        self._teachers_used[ref] = time.monotonic()
        if self._holds(ref):
            return
        held_elsewhere(self.sampler.loaded | {ref})  # its download's files must stay while it loads
        try:
            await _in_thread(self.sampler.load, ref)
        except (ValueError, OSError, SamplerCrashed) as e:
            logger.warning("teacher %s does not load here (%s); its fallbacks will be tried", ref, e)
        finally:
            held_elsewhere(self.sampler.loaded)

    def _holds(self, ref: str) -> bool:
        """The sampling process has ``ref`` loaded."""
        try:
            return str(parse_model_ref(ref)) in self.sampler.loaded
        except ValueError:
            return False

    async def _sample(
        self, mission: Mission, lease: Lease, progress: MissionProgress, lost: asyncio.Event
    ) -> FallbackShakeResult | None:
        """The shard's rows, or None when sampling stopped (lease lost, cancel, stop) or no teacher loads."""
        spec = mission.signed.spec
        prompts = mission.shard(lease.shard)
        stopping = self._stop

        def gone() -> bool:
            return lost.is_set() or stopping.is_set() or mission.cancelled

        def control() -> int:
            """Asked from the waiting thread (Event.is_set only reads a flag, safe across threads): the
            governor holds the work while the owner's programs need the machine or the CPU share is spent."""
            verdict = "stop" if gone() else self.governor.verdict(gone, POLL) if self.governor is not None else "run"
            return {"stop": STOP, "hold": HOLD}.get(verdict, RUN)

        job = ShardJob(
            spec=spec, prompts=list(prompts), mission_id=mission.id,
            batch_prompts=min(self.config.batch_prompts, len(prompts)), max_memory=self.config.max_memory,
        )  # fmt: skip
        grader = getattr(spec.judge, "model", None)
        started = time.monotonic()
        progress.started = progress.started or time.time()
        held_elsewhere(self.sampler.loaded | set(spec.teachers) | ({grader} if grader else set()))
        try:
            return await _in_thread(self.sampler.shake, job, control)
        except ShakeCancelled:
            if self._paused:
                logger.info("shard %d of mission %s: paused by the owner; the shard is given back", lease.shard,
                            mission.id[:12])  # fmt: skip
                return None
            progress.shards_lost += 1
            logger.info("shard %d of mission %s: stopped sampling (lease lost, mission cancelled or daemon stopping)",
                        lease.shard, mission.id[:12])  # fmt: skip
            return None
        except NoTeacherError as e:
            self.blocked = str(e)
            self.errors["no teacher"] += 1
            logger.warning("mission %s: %s", mission.id[:12], e)
            return None
        finally:
            held_elsewhere(self.sampler.loaded)
            progress.seconds_shaking += time.monotonic() - started
            for ref in [*spec.teachers, *([grader] if grader else [])]:  # unloaded alike once idle
                self._teachers_used[ref] = time.monotonic()

    async def _finish(
        self,
        mission: Mission,
        lease: Lease,
        result: FallbackShakeResult,
        renewer: asyncio.Task[None],
        progress: MissionProgress,
    ) -> None:
        """Store the shard's rows, publish the result, then have other peers copy the rows (they take only
        a row set a done record names); the lease is renewed until the result is out. A failure (a full disk,
        a DHT that does not answer) is retried after ``PUBLISH_RETRY`` seconds; the last one is kept in
        ``progress.publish_error`` (``/status``) and logged, and once every try failed the lease expires and
        the swarm samples the shard again."""
        try:
            rows = _in_prompt_order(result.rows, mission.shard(lease.shard))
            held: StoredRowSet | None = None
            for attempt, delay in enumerate((*PUBLISH_RETRY, None), start=1):
                try:
                    if held is None:
                        held = await self.keeper.keep_own(mission, lease.shard, lease.attempt, rows)
                    await self.leases.mark_done(
                        lease, rows=len(rows), row_set_sha256=held.sha256, teachers=result.rows_by_teacher()
                    )
                    break
                except LeaseLostError as e:  # another attempt counts for this shard: its rows never will
                    logger.info("shard %d of mission %s: not published: %s", lease.shard, mission.id[:12], e)
                    progress.publish_error = None
                    if held is not None:
                        await asyncio.to_thread(self.keeper.store.drop_row_set, mission.id, lease.attempt)
                    return
                except (StoreError, OSError, ShardDHTError) as e:
                    what = "store" if held is None else "publish"
                    progress.publish_error = f"shard {lease.shard}: could not {what} its rows: {e}"[:500]
                    if delay is None:
                        logger.error(
                            "shard %d of mission %s: gave up after %d tries (%s); the lease expires and the shard "
                            "is sampled again", lease.shard, mission.id[:12], attempt, e,
                        )  # fmt: skip
                        return
                    logger.warning("shard %d of mission %s: could not %s its rows (try %d, again in %.0f s): %s",
                                   lease.shard, mission.id[:12], what, attempt, delay, e)  # fmt: skip
                    await asyncio.sleep(delay)
            progress.publish_error = None
            renewer.cancel()  # done: the lease has nothing left to hold
            assert held is not None
            taken = await self.keeper.replicate(mission, held, self._replica_candidates(mission))
            progress.replicated += len(taken)
            if not taken:
                logger.warning(
                    "shard %d of mission %s: no other peer took a copy yet; peers copy it when they settle the "
                    "shard", lease.shard, mission.id[:12],
                )  # fmt: skip
            progress.shards_shaken += 1
            progress.rows_shaken += len(rows)
            if self.ledger is not None:
                self.ledger.add("rows_shaken", len(rows), mission.id)
                self.ledger.add("shards_shaken", 1, mission.id)
            self.book.wake()
        except Exception as e:  # a task nobody awaits: what goes wrong here must reach the log and /status
            logger.exception("shard %d of mission %s: finishing failed", lease.shard, mission.id[:12])
            progress.publish_error = f"shard {lease.shard}: {type(e).__name__}: {e}"[:500]
        finally:
            renewer.cancel()
            self._leases.pop(lease.attempt, None)

    async def _verify_some(self, mission: Mission, board: ShardBoard) -> None:
        """Check other producers' winning row sets held here (``garden.mission.verification``), a few per
        round, when the peer is not sampling and the mission's teacher fits here."""
        if mission.signed.spec.sampling.verify_fraction <= 0 or self._compute.locked():
            return
        if time.monotonic() - self._verify_failed.get(mission.id, -VERIFY_RETRY) < VERIFY_RETRY:
            return
        if self.governor is not None and self.governor.held_reason is not None:
            return
        pending = self.verifier.pending(mission, board)
        if not pending or not await self._fits(mission):
            return
        async with self._compute:
            for done in pending[:VERIFY_PER_ROUND]:
                try:
                    await self.verifier.check(mission, done)
                except (SamplerCrashed, ValueError, OSError) as e:  # a teacher that does not load, a dead child
                    logger.warning("mission %s: could not check shard %d (again in %.0f s): %s", mission.id[:12],
                                   done.shard, VERIFY_RETRY, e)  # fmt: skip
                    self.errors["verification"] += 1
                    self._verify_failed[mission.id] = time.monotonic()
                    break
            for ref in mission.signed.spec.teachers:
                self._teachers_used[ref] = time.monotonic()

    async def _verify_job(self, job: VerifyJob) -> list[Any]:
        return await _in_thread(self.sampler.verify, job)

    async def _renew(self, lease: Lease, lost: asyncio.Event) -> None:
        """Keep the lease while the shard is sampled. The first check comes soon after the claim: two
        claims crossing in flight can both read their own lease back, and the one the DHT did not keep
        should stop within a second rather than sample the whole shard for nothing."""
        current = lease
        first = True
        while True:
            await asyncio.sleep(CONFIRM_AFTER if first else self.leases.config.renew_period)
            first = False
            try:
                current = await self.leases.renew(current)
            except LeaseLostError as e:
                logger.info("stopped counting on shard %d: %s", lease.shard, e)
                lost.set()
                return
            except ShardDHTError as e:
                logger.info("could not renew shard %d (retrying): %s", lease.shard, e)

    async def _release(self, lease: Lease) -> None:
        try:
            await self.leases.release(lease)
        except Exception as e:
            logger.info("could not release shard %d: %s", lease.shard, e)

    def _replica_candidates(self, mission: Mission) -> list[str]:
        """Peers to offer a row set to: known peers, in an order that spreads copies (by id after ours)."""
        peers = sorted({entry.info.peer_id for entry in self.directory.known} - {self.book.peer_id})
        later = [p for p in peers if p > self.book.peer_id]
        return later + [p for p in peers if p not in later]

    async def _fits(self, mission: Mission) -> bool:
        """Whether the mission's first teacher, and its grading model if its judge names one, fit in memory
        here (both are loaded at once), and their downloads fit on disk (``--max-disk``); sets :attr:`blocked`
        when not. Checked before a shard is claimed; a hub model's sizes come from the hub's metadata."""
        spec = mission.signed.spec
        grader = getattr(spec.judge, "model", None)
        refs = [r for r in dict.fromkeys([spec.teachers[0], *([grader] if grader else [])]) if not self._holds(r)]
        named = [f"the {'grading model' if r == grader and r != spec.teachers[0] else 'teacher'} {r}" for r in refs]
        subject = "they need" if len(named) > 1 else "it needs"
        need = 0
        for ref in refs:
            if ref not in self._memory_need:
                self._memory_need[ref] = await _in_thread(model_memory_bytes, ref)
            need += self._memory_need[ref] or 0  # unknown (a hub id): try and see
        shortfall = memory_shortfall(need, self.config.max_memory) if need else None
        if shortfall is not None:
            self.blocked = f"cannot hold {' and '.join(named)}: {subject} {shortfall}"
            return False
        downloads = [await _in_thread(model_disk_bytes, ref) for ref in refs]  # 0 once downloaded
        short = self.disk.shortfall(sum(d or 0 for d in downloads)) if self.disk is not None else None
        if short is not None:
            self.blocked = f"cannot download {' and '.join(named)}: {subject} {short}"
            return False
        self.blocked = None
        return True

    async def _unload_idle_teachers(self) -> None:
        if self._compute.locked():
            return
        now = time.monotonic()
        for ref, used in list(self._teachers_used.items()):
            if now - used <= self.config.teacher_idle_s:
                continue
            try:
                unloaded = await _in_thread(self.sampler.unload, ref)
            except SamplerCrashed as e:
                logger.warning("could not unload the teacher %s: %s", ref, e)
                unloaded = False
            if unloaded:
                logger.info("unloaded the teacher %s after %.0f s without work", ref, now - used)
            del self._teachers_used[ref]  # held nowhere now (a crashed sampling process holds nothing)
            held_elsewhere(self.sampler.loaded)

    # --- views for the HTTP port ---------------------------------------------------------------------
    def snapshot(self) -> ShakingSnapshot:
        """Every mission's work as last seen (boards are not read afresh: ``/metrics`` is scraped often)."""
        missions = {}
        for mission in list(self.book.missions.values()):
            board, progress = self.boards.get(mission.id), self.progress.get(mission.id)
            missions[mission.id] = MissionWorkSnapshot(
                name=mission.name,
                seen=progress is not None,
                state=progress.state if progress else MissionProgress.state,
                shards=board.summary() if board else None,
                rows_done=sum(d.rows for d in board.winners().values()) if board else 0,
                shards_shaken=progress.shards_shaken if progress else 0,
                rows_shaken=progress.rows_shaken if progress else 0,
                row_sets_held=self.keeper.held(mission.id),
                publish_error=progress.publish_error if progress else None,
            )
        return ShakingSnapshot(
            blocked=self.blocked, row_sets_refused=self.keeper.refused, missions=missions,
            done_records_voided=self.keeper.voided,
            sampler_pid=self.sampler.pid, sampler_starts=self.sampler.starts, teachers_loaded=self.sampler.loaded,
        )  # fmt: skip

    async def view(self, mission: Mission, with_holders: bool = True) -> MissionView:
        """The mission's shards read fresh from the DHT (the last board seen if the DHT is silent), and
        who holds what when ``with_holders``."""
        board = self.boards.get(mission.id)
        try:
            board = await self.leases.fetch(mission.id, mission.shard_count)
            self.boards[mission.id] = board
        except ShardDHTError:
            pass
        holders = await self.book.holders(mission.id) if with_holders else {}
        teachers: Counter[str] = Counter()
        for done in (board.winners() if board else {}).values():
            teachers.update(done.teachers)
        progress = self.progress.get(mission.id, MissionProgress())
        return MissionView(
            mission, board, holders, progress, dict(teachers), self.book.trusted(mission), self.book.refusal(mission),
            self.verifier.snapshot(mission, board),
        )  # fmt: skip

    async def export(self, mission: Mission) -> tuple[list[DorpoRow], list[int]]:
        """Every winning row of the mission so far (copied here first when held elsewhere), in shard order;
        and the shards done elsewhere whose rows could not be reached."""
        view = await self.view(mission)
        winners = view.board.winners() if view.board else {}
        missing = await self.keeper.gather(mission, winners, view.holders)
        return await asyncio.to_thread(self.keeper.winner_rows, mission, winners), missing


def _in_prompt_order(rows: Sequence[DorpoRow], prompts: Sequence[Any]) -> list[DorpoRow]:
    """Rows sorted into the shard's prompt order (fallback teachers append rows out of order)."""
    order = {p.prompt: i for i, p in reversed(list(enumerate(prompts)))}
    return sorted(rows, key=lambda r: order.get(r.prompt, len(order)))


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a daemon thread: unlike the loop's executor, it does not hold up the process's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        lower_this_thread()  # sampling and loading yield the CPU to the loop and to the owner's programs
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args), None)
        except BaseException as e:
            outcome = (None, e)
        try:
            loop.call_soon_threadsafe(_settle, future, *outcome)
        except RuntimeError:  # the loop closed meanwhile (the daemon stopped): nobody waits for this any more
            pass

    threading.Thread(target=target, name=SHAKE_THREAD, daemon=True).start()
    return await future


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
