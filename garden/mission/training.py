"""Training missions in the daemon: one trainer worker process per mission this peer trains, supervised.

A peer with the ``trainer`` role trains every mission it knows (prompts in hand, not cancelled, not
finished) as soon as it holds rows of it: shaking and training overlap, and the worker picks up rows as
the daemon stores them. The daemon

* starts the worker (``python -m garden.collab.worker``) with a configuration written from the
  mission's spec, bootstrapped from the daemon's own addresses (the join addresses in client mode);
* restarts it when it exits with an error or is killed, after a back-off that grows (5 s, 15 s, 1 min,
  5 min): a broken student reference must not become a fork loop;
* stops it when the mission is cancelled and when the daemon stops (SIGTERM, then SIGKILL after
  ``STOP_GRACE``; the worker's own children follow it either way; a worker killed in its step cannot say it
  stopped, so the daemon writes ``state: stopped`` into its status file);
* reads its status file (a :class:`~garden.collab.worker.WorkerStatus`) for ``GET /missions/{id}`` and
  ``/metrics``.

A worker that reached the mission's ``max_epochs`` leaves ``state: done`` in its status file, which
lives in the data dir: a restarted daemon does not train that mission again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from garden.collab.settings import CollabConfig
from garden.collab.worker import WorkerConfig, WorkerStatus
from garden.host.contribution import Ledger
from garden.host.disk import DiskKeeper
from garden.host.governor import Governor
from garden.host.memory import memory_shortfall
from garden.errors import GardenError
from garden.lifecycle import Service
from garden.mission.students import SwarmStudents
from garden.models.loading import ModelRefError
from garden.protocol.checkpoints import STUDENT_SCHEME
from garden.protocol.rows import holds_out
from garden.mission.book import Mission, MissionBook
from garden.store import Store
from garden.mission.checkpoints import CheckpointSharing

logger = logging.getLogger(__name__)

BACKOFF = (5.0, 15.0, 60.0, 300.0)
"""Seconds before the n-th restart of a failed worker (the last one repeats)."""
STOP_GRACE = 5.0
"""Seconds a stopping worker may take to finish its step before it is killed."""
PAUSE_GRACE = 1.5
"""The same when its owner paused the peer: the pause promises quiet within 2 s. A step cut short costs only
that step's gradients; the swarm holds the state, and the next worker loads it."""
STATUS_FILE = "status.json"
HISTORY_POINTS = 500
"""Points of loss, KL and preference accuracy kept per mission for the dashboard's charts."""
REPUBLISH_PERIOD = 600.0
"""Seconds between re-publications of the checkpoints this peer holds (sooner when a new one appears)."""


@dataclass(frozen=True)
class TrainingConfig:
    """:param trainer: this peer has the ``trainer`` role
    :param root: where each mission's worker keeps its configuration, log, status and output
    :param store_path: the daemon's store (the worker reads rows from it)
    :param initial_peers: the addresses a worker's DHT bootstraps from (the daemon's own, or its join addresses)
    :param relays: a private daemon's relays: its workers are reached through them too
    :param host_maddrs: the daemon's listen addresses; the worker listens on the same hosts, any port
    """

    trainer: bool
    root: Path
    store_path: Path
    initial_peers: Sequence[str]
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",)
    client_mode: bool = False
    relays: Sequence[str] = ()
    batch_size: int = 4
    max_threads: int | None = None
    log_level: str = "info"
    period: float = 5.0
    limits: dict[str, Any] = field(default_factory=dict)  # the worker's max_cpu / idle settings (WorkerConfig)
    max_memory: int | None = None  # bytes a student's training may take (--max-memory)
    max_trainers: int = 1  # trainer processes at once (--max-trainers); the other missions wait their turn


@dataclass
class _Worker:
    mission_id: str
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    failures: int = 0
    next_start: float = 0.0
    last_exit: int | None = None
    samples_seen: tuple[int, int] = (0, 0)  # (pid, samples) last counted into the ledger
    stopping_since: float | None = None  # monotonic time the daemon asked it to stop (pause, cancel)


@dataclass
class TrainingView:
    """What ``GET /missions/{id}`` shows of this peer's training of one mission.

    :param worker: the worker's last status file (None: none yet)
    :param history: loss/KL/accuracy points over time (``t``, ``epoch``, ``loss``, ``kl``, ``pref_acc``,
        ``samples``), oldest first, at most ``HISTORY_POINTS``"""

    state: str
    worker: WorkerStatus | None = None
    restarts: int = 0
    last_exit: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class TrainingSnapshot:
    """What ``/status`` and ``/metrics`` show of training on this peer.

    :param blocked: missions this peer does not train, with the reason (memory)
    :param workers: each mission's last worker status file, for the missions that have one
    """

    blocked: dict[str, str]
    workers: dict[str, WorkerStatus]


def worker_host_maddrs(host_maddrs: Sequence[str]) -> list[str]:
    """The daemon's listen addresses with any fixed port replaced by 0: the worker must not take the
    daemon's port, and its averagers only need to be reachable where the daemon is."""
    return [re.sub(r"/(tcp|udp)/\d+", r"/\1/0", maddr) for maddr in host_maddrs]


class TrainingWork(Service):
    name = "training"

    def __init__(
        self,
        book: MissionBook,
        store: Store,
        config: TrainingConfig,
        sharing: CheckpointSharing | None = None,
        governor: Governor | None = None,
        ledger: Ledger | None = None,
        disk: DiskKeeper | None = None,
        students: SwarmStudents | None = None,
    ):
        self.book, self.store, self.config, self.sharing = book, store, config, sharing
        self.governor, self.ledger, self.disk = governor, ledger, disk
        self.students = students  # a student named mission:<id> (train the trained further) is pulled through it
        self._pulled: set[str] = set()  # missions whose mission:<id> student is on this machine
        self.history: dict[str, list[dict[str, Any]]] = {}  # mission -> loss/KL/accuracy points over time
        self.blocked: dict[str, str] = {}  # mission -> why this peer does not train it (memory, disk)
        self.waiting: dict[str, str] = {}  # mission -> why its trainer has not started yet (max_trainers)
        self._need: dict[str, int | None] = {}  # mission -> bytes its training needs (None: unknown), once measured
        self._download: dict[str, int] = {}  # mission -> bytes its student's first load downloads, until it starts
        self._measuring: set[str] = set()
        self._workers: dict[str, _Worker] = {}
        self._published: dict[str, tuple[tuple[int, ...], float]] = {}  # mission -> (epochs, when)

    # --- the loop ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.governor is not None:
            loop = asyncio.get_running_loop()
            self.governor.on_change(functools.partial(loop.call_soon_threadsafe, self._on_pause_changed))

    def _on_pause_changed(self) -> None:
        """On the event loop, at once: trainers are told to stop (or start again); a trainer still in its step
        after ``PAUSE_GRACE`` is killed then, not at the next supervision round."""
        self._tend_logged()
        if self.governor is not None and self.governor.paused:
            asyncio.get_running_loop().call_later(PAUSE_GRACE + 0.05, self._tend_logged)

    def _tend_logged(self) -> None:
        try:
            self.tend()
        except Exception:
            logger.exception("could not apply the pause to training")

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.pull_students()
                self.tend()
                await self.publish_checkpoints()
            except Exception:  # one bad round must not end supervision; the next one retries
                logger.exception("training supervision failed")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.config.period)
            except TimeoutError:
                pass
        self.begin_stop()  # the daemon waits for the workers in close()

    def tend(self) -> None:
        now = time.monotonic()
        paused = self.governor is not None and self.governor.paused
        for mission in list(self.book.missions.values()):
            worker = self._workers.get(mission.id)
            if worker is not None:
                self._count(mission.id, worker)
            if worker is not None and worker.proc is not None:
                if mission.cancelled or paused:
                    why = "was cancelled" if mission.cancelled else "paused by the owner"
                    if worker.stopping_since is None:
                        logger.info("mission %s %s: stopping its trainer after this step", mission.id[:12], why)
                        worker.stopping_since = now
                    self._signal(worker, signal.SIGTERM)
                self._reap(worker, now)
                grace = PAUSE_GRACE if paused and not mission.cancelled else STOP_GRACE
                if worker.proc is not None and worker.stopping_since and now - worker.stopping_since > grace:
                    logger.warning("trainer of mission %s did not stop in time: killed", mission.id[:12])
                    self._signal(worker, signal.SIGKILL)
                continue
            if paused or not self._wants(mission):
                continue
            running = sum(1 for w in self._workers.values() if w.proc is not None)
            if running >= self.config.max_trainers:
                cap = self.config.max_trainers
                self.waiting[mission.id] = f"waiting: {running} trainer(s) running (max_trainers {cap})"
                continue
            self.waiting.pop(mission.id, None)
            worker = self._workers.setdefault(mission.id, _Worker(mission.id, self.config.root / mission.id))
            if now >= worker.next_start:
                self._start(mission, worker)

    async def publish_checkpoints(self) -> None:
        """Announce the checkpoints held here when a new one appears, and every ``REPUBLISH_PERIOD``."""
        if self.sharing is None:
            return
        now = time.monotonic()
        for mission in list(self.book.missions.values()):
            epochs = tuple(c.epoch for c in self.sharing.local(mission.id))
            if not epochs:
                continue
            last = self._published.get(mission.id)
            if last is not None and last[0] == epochs and now - last[1] < REPUBLISH_PERIOD:
                continue
            stored = await self.sharing.publish(mission.id)
            if stored == len(epochs):
                self._published[mission.id] = (epochs, now)
                logger.info("mission %s: announced checkpoints of epochs %s", mission.id[:12], list(epochs))

    async def pull_students(self) -> None:
        """Pull the students named ``mission:<id>`` of the missions this peer would train, on first use."""
        for mission in list(self.book.missions.values()):
            base = mission.signed.spec.student.base
            if not base.startswith(STUDENT_SCHEME) or mission.id in self._pulled or self.students is None:
                continue
            if not self.config.trainer or mission.cancelled or self.book.refusal(mission) is not None:
                continue
            try:
                await self.students.resolve(base)
                self._pulled.add(mission.id)
                self.waiting.pop(mission.id, None)
            except (ModelRefError, GardenError) as e:
                self.waiting[mission.id] = f"waiting for its student {base}: {e}"

    def _wants(self, mission: Mission) -> bool:
        if not self.config.trainer or mission.cancelled or mission.prompts is None:
            return False
        if self.book.refusal(mission) is not None:
            return False
        if mission.signed.spec.student.base.startswith(STUDENT_SCHEME) and mission.id not in self._pulled:
            return False
        status = self.worker_status(mission.id)
        if status is not None and status.state == "done":
            return False
        # memory first: a peer that cannot train the student says so before any row arrives
        return self._fits(mission) and self.store.count_rows(mission.id) > 0

    def _fits(self, mission: Mission) -> bool:
        """Whether training the mission's student fits in memory, and its download on disk; the reason goes to
        :attr:`blocked` if not. Full fine-tuning holds weights, gradients and two AdamW moments (4x the
        weights); LoRA about 1.5x."""
        student = mission.signed.spec.student
        if mission.id not in self._need:
            # measured in a thread of its own (a .gguf student is converted first: seconds), never on the loop;
            # the mission waits for the answer at a later round
            if mission.id not in self._measuring:
                self._measuring.add(mission.id)
                threading.Thread(
                    target=self._measure, args=(mission.id, student.base, student.lora is None),
                    name="garden-measure-student", daemon=True,
                ).start()  # fmt: skip
            self.waiting[mission.id] = "measuring the student's memory"
            return False
        need = self._need[mission.id]
        shortfall = None if need is None else memory_shortfall(need, self.config.max_memory)
        download = self._download.get(mission.id, 0)
        if shortfall is None and download and self.disk is not None:
            short = self.disk.shortfall(download)
            shortfall = None if short is None else f"{short} for its base {student.base}"
        if shortfall is not None:
            reason = f"not training: the student needs {shortfall}"
            if self.blocked.get(mission.id) != reason:
                logger.warning("mission %s: %s", mission.id[:12], reason)
            self.blocked[mission.id] = reason
            return False
        self.blocked.pop(mission.id, None)
        return True

    def _measure(self, mission_id: str, base: str, full: bool) -> None:
        from garden.models.loading import model_disk_bytes, model_memory_bytes

        try:
            whole = model_memory_bytes(base)
            self._download[mission_id] = model_disk_bytes(base) or 0
        except Exception as e:  # noqa: BLE001 - a student that cannot be read: its worker will say why
            logger.warning("could not measure the student %s of mission %s: %s", base, mission_id[:12], e)
            whole = None
        self._need[mission_id] = None if whole is None else int(whole * (4.0 if full else 1.5))
        self._measuring.discard(mission_id)

    # --- one worker --------------------------------------------------------------------------------
    def _start(self, mission: Mission, worker: _Worker) -> None:
        self._download.pop(mission.id, None)  # the worker downloads its student now: its room is taken
        worker.dir.mkdir(parents=True, exist_ok=True)
        spec = mission.signed.spec
        config = WorkerConfig(
            mission_id=mission.id,
            student=spec.student,
            collab=CollabConfig.from_section(spec.train, batch_size=self.config.batch_size),
            initial_peers=list(self.config.initial_peers),
            host_maddrs=worker_host_maddrs(self.config.host_maddrs),
            client_mode=self.config.client_mode,
            relays=list(self.config.relays),
            store_path=self.config.store_path,
            status_path=worker.dir / STATUS_FILE,
            out_dir=worker.dir / "out",
            max_threads=self.config.max_threads,
            checkpoint_every=spec.train.checkpoint_every,
            hold_out=holds_out(mission.signed.body.prompts_count),
            parent_pid=os.getpid(),
            **self.config.limits,
        )
        path = worker.dir / "config.json"
        config.write(path)
        argv = [sys.executable, "-m", "garden.collab.worker", str(path), "--log-level", self.config.log_level]
        with open(worker.dir / "worker.log", "ab") as log:
            worker.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logger.info("training mission %s (%s): worker pid %d", mission.name, mission.id[:12], worker.proc.pid)

    def _reap(self, worker: _Worker, now: float) -> None:
        assert worker.proc is not None
        code = worker.proc.poll()
        if code is None:
            return
        asked = worker.stopping_since is not None
        worker.proc, worker.last_exit, worker.stopping_since = None, code, None
        self._count(worker.mission_id, worker)
        status = self.worker_status(worker.mission_id)
        state = status.state if status is not None else None
        if asked:
            self._note_stopped(worker.mission_id, status)
            logger.info("trainer of mission %s stopped (exit %s)", worker.mission_id[:12], code)
            return
        if code == 0 and state in ("done", "stopped"):
            logger.info("trainer of mission %s finished (%s)", worker.mission_id[:12], state)
            return
        delay = BACKOFF[min(worker.failures, len(BACKOFF) - 1)]
        worker.failures += 1
        worker.next_start = now + delay
        logger.warning(
            "trainer of mission %s exited with %s (restart %d in %.0f s); its log: %s",
            worker.mission_id[:12], code, worker.failures, delay, worker.dir / "worker.log",
        )  # fmt: skip

    def _signal(self, worker: _Worker, signum: int) -> None:
        if worker.proc is not None and worker.proc.poll() is None:
            try:
                worker.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def begin_stop(self) -> None:
        """SIGTERM every worker: each finishes its step and leaves the swarm while the daemon stops too."""
        for worker in self._workers.values():
            self._signal(worker, signal.SIGTERM)

    async def close(self) -> None:
        """Stop every worker: SIGTERM, then SIGKILL after ``STOP_GRACE``."""
        running = [w for w in self._workers.values() if w.proc is not None and w.proc.poll() is None]
        self.begin_stop()
        deadline = time.monotonic() + STOP_GRACE
        for worker in running:
            assert worker.proc is not None
            try:
                await asyncio.to_thread(worker.proc.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("trainer of mission %s did not stop in time: killed", worker.mission_id[:12])
                self._signal(worker, signal.SIGKILL)
                await asyncio.to_thread(worker.proc.wait)
            self._note_stopped(worker.mission_id, self.worker_status(worker.mission_id))

    def _note_stopped(self, mission_id: str, status: WorkerStatus | None) -> None:
        """A worker the daemon stopped and that was killed in its step (after the grace) could not say so: its
        file still says ``training``, which a user (and a restarted daemon's ``GET /missions/{id}``) would read
        as a worker at work. The daemon, which stopped it, says so in its place; a final state stays."""
        if status is None or status.state in ("done", "failed", "stopped"):
            return
        status.state = "stopped"
        try:
            status.write(self.config.root / mission_id / STATUS_FILE)
        except OSError as e:
            logger.warning("could not note the stop of mission %s's trainer: %s", mission_id[:12], e)

    def _count(self, mission_id: str, worker: _Worker) -> None:
        """Samples trained since the last look into the ledger, and a point of the loss/KL history."""
        status = self.worker_status(mission_id)
        if status is None or status.pid is None:
            return
        pid, samples = status.pid, status.samples
        seen_pid, seen = worker.samples_seen
        new = samples - seen if pid == seen_pid else samples  # a new worker counts from zero
        if new > 0 and self.ledger is not None:
            self.ledger.add("samples_trained", new, mission_id)
        worker.samples_seen = (pid, samples)
        history = self.history.setdefault(mission_id, [])
        point = {k: getattr(status, k) for k in ("epoch", "loss", "kl", "pref_acc", "samples")}
        if status.loss is not None and (not history or {k: history[-1][k] for k in point} != point):
            history.append({"t": round(status.updated_at or time.time(), 3), **point})
            del history[:-HISTORY_POINTS]

    # --- views -------------------------------------------------------------------------------------
    def worker_status(self, mission_id: str) -> WorkerStatus | None:
        """The worker's last status file (it outlives the worker), or None."""
        return WorkerStatus.read(self.config.root / mission_id / STATUS_FILE)

    def snapshot(self) -> TrainingSnapshot:
        workers = {}
        for mission_id in list(self.book.missions):
            status = self.worker_status(mission_id)
            if status is not None:
                workers[mission_id] = status
        return TrainingSnapshot(blocked=dict(self.blocked), workers=workers)

    def view(self, mission: Mission) -> TrainingView | None:
        worker = self._workers.get(mission.id)
        status = self.worker_status(mission.id)
        history = list(self.history.get(mission.id, []))
        if worker is None and status is None:
            refused = self.book.refusal(mission) if self.config.trainer else None
            if refused is not None:
                return TrainingView(state=f"not worked on: {refused}", history=history)
            if mission.id in self.blocked:
                return TrainingView(state=self.blocked[mission.id], history=history)
            if mission.id in self.waiting:
                return TrainingView(state=self.waiting[mission.id], history=history)
            return TrainingView(state="waiting for rows", history=history) if self.config.trainer else None
        running = worker is not None and worker.proc is not None
        if status is not None:
            state = status.state
        else:
            state = "starting" if running else "waiting for rows"
        if self.governor is not None and self.governor.paused and state not in ("done", "failed"):
            state = "paused"
        elif worker is not None and not running and worker.failures and state not in ("done", "stopped"):
            state = f"restarting in {max(0.0, worker.next_start - time.monotonic()):.0f} s (exit {worker.last_exit})"
        return TrainingView(
            state=state,
            worker=status,
            restarts=worker.failures if worker else 0,
            last_exit=worker.last_exit if worker else None,
            history=history,
        )

    def child_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers.values() if w.proc is not None and w.proc.poll() is None]
