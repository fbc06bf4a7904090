"""The trainer worker: one process per mission a peer trains, run as
``python -m garden.collab.worker CONFIG.json``.

Why a process of its own: ``hivemind.Optimizer`` wants the main thread of its process (its averagers are
forked children and it blocks in rounds), while the daemon's main thread runs the event loop that serves
HTTP and RPCs. The worker has its own ``hivemind.DHT``, bootstrapped from the daemon's addresses (client
mode when the daemon is not reachable from outside), and reads rows from the daemon's store read-only as
they arrive, so rows the daemon copies from other peers count too.

It reports through one JSON file (``status_path``: a :class:`WorkerStatus`, rewritten atomically every
second) that the daemon reads; its configuration is one JSON file too (a :class:`WorkerConfig`), each
written and read by its own class. It installs garden's patches of hivemind
(:mod:`garden.collab.hivemind_patches`) before anything forks. It stops on SIGTERM or SIGINT (finishing the
current step), when ``max_epochs`` is reached (after serving its state to peers that are catching up: while some
trainer is behind, and ``linger_s`` seconds more, :func:`linger`), and when the daemon that started it dies (a
watch thread, as for the daemon's own DHT process): never an orphan.
"""

from __future__ import annotations

import os

# as in the daemon: torch's file_system sharing (hivemind's default) starts a torch_shm_manager process
# that would outlive a killed worker
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from garden.lifecycle import watch_parent
from garden.protocol.mission_spec import StudentSection
from garden.collab.settings import CollabConfig, TrainStatus
from garden.distill.checkpoints import RunDir, write_json_atomic

if TYPE_CHECKING:
    from garden.models.student import StudentSpec

logger = logging.getLogger("garden.collab.worker")

STATUS_PERIOD = 1.0
"""Seconds between rewrites of the status file."""
LINGER_MAX_S = 60.0
"""Seconds a trainer that is done serves its state at most while other trainers are behind (:func:`linger`)."""
LINGER_POLL_S = 1.0
"""Seconds between reads of the progress record while lingering."""


class WorkerConfig(BaseModel):
    """What the daemon (or a test) tells a worker, written as one JSON file.

    :param mission_id: the mission (hivemind's run id; the rows read from the store)
    :param initial_peers: multiaddrs to bootstrap the worker's DHT from: the daemon's own
    :param host_maddrs: where the worker's DHT listens (its averagers talk over it)
    :param client_mode: the worker's DHT accepts no incoming connections (a peer behind NAT)
    :param store_path: the daemon's SQLite store, read-only here
    :param status_path: the JSON status file the worker rewrites
    :param out_dir: a training run directory: the checkpoints this peer writes for the swarm
    :param checkpoint_every: epochs between checkpoints (the last epoch is always saved)
    :param relays: relays the worker reserves a slot on and announces addresses behind (the daemon is private)
    :param hold_out: never train on the rows of the mission's held-out prompts (False: the mission is too small
        to hold any out, :func:`garden.protocol.rows.holds_out`)
    :param parent_pid: exit when this process (the daemon) is gone; None: no watch
    :param linger_s: seconds to keep serving state to peers after the last epoch, counted from the last moment a
        trainer was behind (:func:`linger`)
    :param row_poll_s: seconds between reads of new rows from the store
    :param max_cpu: share of the machine (0..1] the daemon's whole tree may use (``--max-cpu``); the worker
        waits between steps while the tree is over it
    :param idle_threshold: with ``--when idle``: the share of the machine the owner's programs may use
        while this worker steps (None: not idle-only)
    :param idle_quiet_s: seconds of quiet before stepping again after the owner's work
    """

    model_config = ConfigDict(extra="forbid")
    mission_id: str = Field(min_length=1, max_length=128)
    student: StudentSection  # as in the mission spec
    collab: CollabConfig  # validated by its own __post_init__ checks
    initial_peers: list[str] = Field(default_factory=list)
    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    client_mode: bool = False
    store_path: Path
    status_path: Path
    out_dir: Path
    max_threads: int | None = None
    checkpoint_every: int = Field(default=1, ge=1)
    hold_out: bool = True  # leave the mission's held-out prompts' rows to the lead's evaluation (protocol.rows)
    relays: list[str] = Field(default_factory=list, max_length=16)  # a private daemon's: the worker's averager
    # is reached through them too (garden.net.reach), so home trainers average as full peers

    parent_pid: int | None = None
    linger_s: float = 5.0
    row_poll_s: float = 5.0
    max_cpu: float | None = Field(default=None, gt=0, le=1)
    idle_threshold: float | None = Field(default=None, gt=0, le=1)
    idle_quiet_s: float = Field(default=60.0, ge=0)

    def write(self, path: Path) -> None:
        """Write this configuration to ``path`` (atomically)."""
        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: Path) -> WorkerConfig:
        """The configuration in ``path``, validated; raises ``OSError`` or ``ValueError`` (naming the key)."""
        return cls.model_validate_json(path.read_bytes())


class WorkerStatus(TrainStatus):
    """The worker's status file (``status_path``): its trainer's :class:`~garden.collab.trainer.TrainStatus`
    and its process id. The worker writes it (:meth:`write`, atomically, every ``STATUS_PERIOD``); the
    daemon reads it (:meth:`read`) for ``GET /missions/{id}`` and ``/metrics``. The file outlives the worker:
    ``state: done`` tells a restarted daemon that the mission is trained."""

    pid: int | None = None  # the worker (its last one, once it exited)

    @classmethod
    def of(cls, status: TrainStatus, pid: int) -> WorkerStatus:
        return cls(pid=pid, **status.model_dump())

    def write(self, path: Path) -> None:
        """Write this status to ``path`` (atomically: a reader never sees half a file)."""
        write_json_atomic(path, self.model_dump())  # python mode: a NaN probe stays NaN, as json writes it

    @classmethod
    def read(cls, path: Path) -> WorkerStatus | None:
        """The status in ``path``, validated; None when there is none or it is not a valid status (keys this
        version does not know are ignored: a file from another version still shows what both know)."""
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError):  # ValueError: not JSON, or not a valid status (pydantic's error)
            return None


class _Stop:
    """Set by SIGTERM/SIGINT; the loop checks it between steps."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, frame: Any) -> None:
        logger.info("signal %d: stopping after this step", signum)
        self.event.set()


def student_spec(section: StudentSection, seed: int) -> StudentSpec:
    """The ``garden.models.student.StudentSpec`` of a mission's ``[student]``: its base pruned as it says (a count
    of layers and their spacing, or the layers listed), with a LoRA adapter whose initial weights come from
    ``seed`` (the same on every peer)."""
    from garden.models.student import LoraSpec, parse_student_ref, section_reference

    lora = None
    if section.lora is not None:
        options = section.lora.model_dump()
        lora = LoraSpec(**{**options, "target_modules": tuple(options["target_modules"])}, seed=seed)
    return parse_student_ref(section_reference(section), lora)


def _peer_seed(peer_id: str) -> int:
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "big")


class SwarmCheckpoints:
    """Every ``checkpoint_every`` epochs (and at the last), each trainer of the swarm that can serve files writes
    a checkpoint (a client-mode trainer only when no other trainer is in hivemind's progress record). Peers in
    sync write identical files, announced as identical manifests. A single writer (the lowest peer id in the
    record, as before) saved disk but was a stranger's for the taking: peer ids cost nothing to grind, and a
    hostile trainer with the lowest id in the record writes nothing, so no checkpoint existed
    (tests/mission/test_hostile_swarm.py).

    The checkpoint is a garden training run (``out_dir`` holds ``garden-run.json``; each epoch is a
    ``step-N`` checkpoint with sha256 of every file), so ``garden generate --model out_dir`` loads it."""

    def __init__(self, run: RunDir, dht: Any, config: WorkerConfig, student: Any):
        self.run, self.dht, self.config, self.student = run, dht, config, student
        self.every = config.checkpoint_every

    def writer(self, peer_id: str) -> bool:
        if not self.config.client_mode:
            return True
        found = self.dht.get(f"{self.config.mission_id}_progress", latest=True)
        entries = found.value.values() if found is not None and isinstance(found.value, dict) else []
        servers = [
            item for item in entries
            if isinstance(getattr(item, "value", None), dict) and not item.value.get("client_mode")
            and isinstance(item.value.get("peer_id"), bytes)
        ]  # fmt: skip
        return not servers

    def maybe_save(self, epoch: int, trainer: Any, peer_id: str) -> dict[str, Any] | None:
        collab = self.config.collab
        if epoch % self.every != 0 and epoch < collab.max_epochs:
            return None
        if not self.writer(peer_id):
            return None
        if not self.run.exists():
            self.run.create(
                {
                    "kind": "swarm",
                    "mission_id": self.config.mission_id,
                    "student": self.config.student.model_dump(mode="json"),
                    "settings": collab.model_dump(mode="json"),
                }
            )
        status = trainer.status
        metrics = {k: v for k, v in (("loss", status.loss), ("kl", status.kl), ("pref_acc", status.pref_acc))
                   if v is not None}  # fmt: skip
        state = {"epoch": epoch, "optimizer": trainer.optimizer.state_dict()}
        checkpoint = self.run.save(epoch, self.student.model, self.student.tokenizer, state, metrics)
        logger.info("mission %s: checkpoint of epoch %d written to %s", self.config.mission_id[:12], epoch,
                    checkpoint.path)  # fmt: skip
        return {"epoch": epoch, "path": str(checkpoint.path), "metrics": metrics, "files": checkpoint.manifest["files"]}


def run(config: WorkerConfig, stop: threading.Event) -> int:
    import torch

    from garden.host.governor import Governor
    from garden.host.idle import IdleConfig
    from garden.net.reach import P2PPlan, Reach, RelayLimits, plan
    from garden.net.dht_process import GardenDHT
    from garden.store import RowFeed
    from garden.collab import hivemind_patches, robust
    from garden.collab.trainer import CollabTrainer, make_optimizer
    from garden.models.student import build_student

    if config.max_threads:
        torch.set_num_threads(config.max_threads)
    collab = config.collab
    status_path = config.status_path
    status_path.parent.mkdir(parents=True, exist_ok=True)
    status = TrainStatus(max_epochs=collab.max_epochs)

    def write_status(current: TrainStatus) -> None:
        current.updated_at = time.time()
        current.bytes_sent = hivemind_patches.bytes_sent()
        WorkerStatus.of(current, os.getpid()).write(status_path)

    try:
        # before the optimizer forks its averagers; no honest peer accumulates several epochs' samples in a round
        hivemind_patches.install(max_weight=robust.PLAUSIBLE_EPOCHS * collab.target_batch_size)
    except RuntimeError as e:  # another hivemind release: its checks would not run
        logger.error("%s", e)
        status.state, status.error = "failed", str(e)
        write_status(status)
        return 1
    write_status(status)
    idle = IdleConfig(config.idle_threshold, config.idle_quiet_s) if config.idle_threshold is not None else None
    # the same budget over the same tree (the daemon's) as the daemon's own work: they hold back together
    governor = Governor(None, config.max_cpu, idle, root_pid=config.parent_pid).start()
    # behind relays: the p2p daemon as the daemon's own (garden.net.reach.plan of a private peer), else as hivemind's
    relayed = plan(Reach(reachability="private", relays=config.relays), RelayLimits()) if config.relays else P2PPlan()
    dht = GardenDHT(
        initial_peers=config.initial_peers or None,
        host_maddrs=config.host_maddrs,
        announce_maddrs=relayed.announce or None,
        client_mode=config.client_mode,
        p2pd_flags=relayed.flags,
        **relayed.options,
        start=True,
    )  # fmt: skip
    feed: RowFeed | None = None
    trainer: CollabTrainer | None = None
    try:
        student = build_student(student_spec(config.student, collab.seed))
        feed = RowFeed(config.store_path, config.mission_id, split="train" if config.hold_out else "all")
        peer_id = dht.peer_id.to_base58()
        trainer = CollabTrainer(
            student, collab, lambda params: make_optimizer(dht, config.mission_id, params, collab), _peer_seed(peer_id)
        )
        status = trainer.status
        logger.info("training mission %s as %s", config.mission_id[:12], peer_id)
        checkpoints = SwarmCheckpoints(RunDir(config.out_dir), dht, config, student)
        last_poll = last_write = -float("inf")
        synced = False
        mark = trainer.state_mark()

        def note_state() -> None:
            """After a step or a load: a new epoch's parameters (or a loaded state) get a probe, maybe a
            checkpoint."""
            nonlocal mark
            if trainer.state_mark() == mark:
                return
            new_epoch = trainer.params_epoch != mark[0]
            mark = trainer.state_mark()
            trainer.record_probe()
            saved = checkpoints.maybe_save(mark[0], trainer, peer_id) if new_epoch else None
            if saved is not None:
                status.last_checkpoint = saved

        while not stop.is_set() and not trainer.done:
            now = time.monotonic()
            if now - last_poll >= config.row_poll_s or not trainer.encoded:
                trainer.add_rows(feed.new_rows())
                status.rows_skipped = feed.skipped + trainer.encode_report.too_long
                status.rows_held_out = feed.held_back
                last_poll = now
            if trainer.encoded and not synced:
                trainer.sync_with_peers(stop.is_set)  # and notes the probe of the parameters it starts from
                synced = True
                mark = trainer.state_mark()
            if governor.hold(stop.is_set):
                break
            if trainer.step() is None:  # no rows yet, or waiting for min_trainers
                stop.wait(min(1.0, config.row_poll_s))
            note_state()
            if time.monotonic() - last_write >= STATUS_PERIOD:
                write_status(status)
                last_write = time.monotonic()
        if trainer.done:
            trainer.catch_up(stop.is_set)  # hivemind may have moved it to the last epoch without its parameters
            note_state()
            # the epoch too: a late peer that loaded the last epoch's state took no step, which would have set it
            status.state, status.epoch = "done", trainer.epoch
            write_status(status)
            logger.info("mission %s: reached epoch %d", config.mission_id[:12], trainer.epoch)
            linger(trainer, config.linger_s, stop)  # peers catching up may still load the state from this one
        else:
            status.state = "stopped"
        write_status(status)
        return 0
    except Exception as e:
        logger.exception("training failed")
        status.state, status.error = "failed", f"{type(e).__name__}: {e}"[:2000]
        write_status(status)
        return 1
    finally:
        governor.stop()
        if trainer is not None:
            trainer.shutdown()
        if feed is not None:
            feed.close()
        dht.shutdown()


def linger(trainer: Any, linger_s: float, stop: threading.Event) -> None:
    """Keep serving this trainer's state after its last epoch: until no trainer of the progress record has been behind
    its epoch for ``linger_s`` seconds, :data:`LINGER_MAX_S` at most (at least ``linger_s``), or until ``stop``.

    Why wait for the ones behind: a trainer that missed the last rounds reaches the last epoch without its parameters
    and loads them from a peer that holds them (``CollabTrainer.catch_up``); once every such peer has left, it keeps
    the epoch before (CI saw a busy lead 20 s behind the two others, which had left after 5 s)."""
    started = quiet_since = time.monotonic()
    while not stop.wait(LINGER_POLL_S):
        now = time.monotonic()
        try:
            if trainer.trainers_behind():
                quiet_since = now
        except Exception as e:  # noqa: BLE001 - a DHT that does not answer: linger the minimum
            logger.info("could not read the progress record while lingering: %s", e)
        if now - quiet_since >= linger_s or now - started >= max(LINGER_MAX_S, linger_s):
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m garden.collab.worker", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the worker's JSON configuration")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    from garden.host.logs import setup_logging

    setup_logging(args.log_level)
    # the outcome of each averaging round (peers met, failed, local gradients used): a line or two per epoch,
    # what a gardener asks when peers drift apart
    for name in ("hivemind.optim.optimizer", "hivemind.optim.state_averager"):
        logging.getLogger(name).setLevel(args.log_level.upper())
    try:
        config = WorkerConfig.read(args.config)
    except (OSError, ValueError) as e:
        print(f"garden: error: {args.config}: {e}", file=sys.stderr)
        return 2
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if config.parent_pid is not None:
        watch_parent(config.parent_pid)
    return run(config, stop.event)


if __name__ == "__main__":
    sys.exit(main())
