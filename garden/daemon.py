"""The Gardener: one peer of the swarm with its identity, store, membership and roles.

It knows nothing of HTTP or signals (``garden.runner`` runs the process; ``garden.api`` serves the
port), so tests and later roles can drive a Gardener directly. Start-up is synchronous and happens
before the event loop exists, because the hivemind DHT forks a child process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from hivemind.utils.timed_storage import get_dht_time

from garden import __version__
from garden.config import GardenSettings
from garden.datadir import DataDir
from garden.inference.blocks import LayerSpan
from garden.inference.client import ChainConfig
from garden.inference.server import ServeConfig
from garden.inference.service import InferenceService
from garden.peer.contribution import Ledger
from garden.peer.disk import DiskKeeper
from garden.peer.governor import Governor
from garden.peer.idle import IdleConfig
from garden.peer.capabilities import MachineInfo, choose_roles, machine_load, probe_machine
from garden.peer.directory import PeerDirectory
from garden.peer.identity import Identity, load_or_create_identity
from garden.peer.swarm import Swarm, SwarmConfig
from garden.protocol.keys import DHTKeys
from garden.protocol.records import PeerInfo, PeerState, Role
from garden.protocol.serve_spec import parse_serve_spec
from garden.peer.missions import MissionBook
from garden.peer.replication import RowSetKeeper
from garden.peer.transfer import ContentRef, ContentTransfer, TransferLimits
from garden.protocol.validators import MissionRecordValidator, PeerRecordValidator
from garden.store import Store
from garden.trainer.leases import LeaseConfig, LeaseManager, ShardRecordValidator
from garden.trainer.mission_work import MissionWork, WorkConfig
from garden.trainer.checkpoint_sharing import CheckpointSharing
from garden.trainer.training_work import PAUSE_GRACE, TrainingConfig, TrainingWork

logger = logging.getLogger(__name__)

GOODBYE_TIMEOUT = 3.0
"""Seconds a clean stop waits for the ``offline`` record to be stored; the record expires anyway."""
LEDGER_PERIOD = 5.0
"""Seconds between writes of the contribution counters to the store (a crash loses at most these)."""


class Gardener:
    def __init__(self, settings: GardenSettings):
        self.settings = settings
        self.data_dir = DataDir(settings.data_dir)
        self.keys = DHTKeys(settings.swarm)
        self.identity: Identity | None = None
        self.store: Store | None = None
        self.swarm: Swarm | None = None
        self.directory: PeerDirectory | None = None
        self.machine: MachineInfo | None = None
        self.roles: list[Role] = []
        self.skipped_roles: dict[str, str] = {}
        self.addresses: list[str] = []
        self.peer_validator: PeerRecordValidator | None = None
        self.shard_validator: ShardRecordValidator | None = None
        self.mission_validator: MissionRecordValidator | None = None
        self.missions: MissionBook | None = None
        self.transfer: ContentTransfer | None = None
        self.work: MissionWork | None = None
        self.keeper: RowSetKeeper | None = None
        self.training: TrainingWork | None = None
        self.checkpoints: CheckpointSharing | None = None
        self.inference: InferenceService | None = None
        self.governor: Governor | None = None
        self.ledger: Ledger | None = None
        self.disk: DiskKeeper | None = None
        self._p2p: Any = None
        self.started_at: float | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the store, load the identity, probe the machine, start the DHT. Raises on failure
        (``SwarmError``, ``IdentityError``, ``StoreError``) after undoing what it did."""
        self.data_dir.ensure()
        try:
            self.identity = load_or_create_identity(self.data_dir.identity)
            self.store = Store(self.data_dir.store)
            self.store.set_meta("peer_id", self.identity.peer_id)
            self.machine = probe_machine()
            self.roles, self.skipped_roles = choose_roles(self.settings.roles, self.machine)
            self.governor = Governor(self.store, self.max_cpu_fraction, self._idle_config(), root_pid=os.getpid())
            self.ledger = Ledger(self.store)
            self._cap_threads()
            self.peer_validator = PeerRecordValidator(self.keys)
            self.shard_validator = ShardRecordValidator(self.keys)
            self.mission_validator = MissionRecordValidator(self.keys)
            self.swarm = Swarm(
                SwarmConfig(
                    initial_peers=self.settings.join,
                    host_maddrs=self.settings.host_maddr,
                    announce_maddrs=self.settings.announce_maddr,
                    client_mode=self.settings.client_mode,
                    identity_path=str(self.identity.path),
                    dht_timeout=self.settings.dht_timeout,
                    record_validators=[self.peer_validator, self.shard_validator, self.mission_validator],
                )
            )
            self.swarm.start()
            self.addresses = [] if self.settings.client_mode else self.swarm.visible_maddrs()
            self.directory = PeerDirectory(
                self.swarm, self.keys, self.identity.private_key, self._make_record, self.settings.announce_period
            )
            self.missions = MissionBook(
                self.store,
                self.swarm,
                self.keys,
                self.identity.private_key,
                self.identity.peer_id,
                self.settings.announce_period,
            )
        except BaseException:
            self.close()
            raise
        self.started_at = time.time()

    @property
    def max_cpu_fraction(self) -> float | None:
        return self.settings.max_cpu / 100.0 if self.settings.max_cpu else None

    @property
    def max_threads(self) -> int | None:
        """``--max-threads``, else as many threads as ``--max-cpu`` leaves whole cores (at least one)."""
        if self.settings.max_threads:
            return self.settings.max_threads
        if self.max_cpu_fraction and self.machine is not None:
            return max(1, int(self.max_cpu_fraction * self.machine.cores))
        return None

    def _idle_config(self) -> IdleConfig | None:
        if self.settings.when != "idle":
            return None
        return IdleConfig(threshold=self.settings.idle_threshold / 100.0, quiet_s=self.settings.idle_quiet_s)

    def _cap_threads(self) -> None:
        if self.max_threads:
            import torch  # already imported by hivemind; local import keeps the dependency visible

            torch.set_num_threads(self.max_threads)

    async def run_background(self) -> None:
        """Start the periodic work (announcing, missions, shaking) and the P2P handlers; returns at once."""
        assert self.directory is not None and self.missions is not None and self.swarm is not None, "start() first"
        assert self.identity is not None and self.store is not None and self.swarm.dht is not None
        assert self.governor is not None and self.ledger is not None
        self.governor.start()
        loop = asyncio.get_running_loop()
        self.governor.on_change(lambda: loop.call_soon_threadsafe(self._on_pause_changed))
        machine_load()  # prime psutil's CPU counter so the first announce reports a real value
        self._tasks.append(asyncio.create_task(self.directory.run(self._stop), name="garden-announce"))
        self._p2p = p2p = await self.swarm.dht.replicate_p2p()
        keeper: RowSetKeeper | None = None

        async def on_offer(sender: str, ref: ContentRef) -> tuple[bool, str]:
            if keeper is None:
                return False, "starting"
            taken = await keeper.on_offer(sender, ref)
            if taken[0] and self.disk is not None and self.settings.max_disk is not None:
                self.disk.poke()
            return taken

        async def content(ref: ContentRef) -> bytes | None:
            if ref.kind == "ckpt":
                return await self.checkpoints.content(ref) if self.checkpoints is not None else None
            return await self.missions.content(ref) if self.missions is not None else None

        rates = TransferLimits(upload_rate=self.settings.max_upload_rate, download_rate=self.settings.max_download_rate)
        self.transfer = ContentTransfer(p2p, content, limits=rates, on_offer=on_offer)
        await self.transfer.start()
        self.missions.transfer = self.transfer
        self.keeper = keeper = RowSetKeeper(self.store, self.missions, self.transfer)
        leases = LeaseManager(
            self.swarm.dht,
            self.keys,
            self.identity.private_key,
            LeaseConfig(lease_duration=self.settings.lease_seconds, dht_timeout=self.settings.dht_timeout),
        )
        self.work = MissionWork(
            self.missions,
            keeper,
            leases,
            candidates=lambda: [entry.info.peer_id for entry in self.directory.known] if self.directory else [],
            config=WorkConfig(
                shaker="shaker" in self.roles,
                period=min(self.settings.announce_period, 5.0),
                max_memory=self.settings.max_memory,
            ),
            governor=self.governor,
            ledger=self.ledger,
        )
        self.checkpoints = CheckpointSharing(
            self.swarm,
            self.keys,
            self.identity.private_key,
            self.identity.peer_id,
            self.transfer,
            train_root=self.data_dir.train,
            pulled_root=self.data_dir.pulled_checkpoints,
        )
        self.training = TrainingWork(
            self.missions,
            self.store,
            TrainingConfig(
                trainer="trainer" in self.roles,
                root=self.data_dir.train,
                store_path=self.data_dir.store,
                initial_peers=lambda: self.addresses or self.settings.join,
                host_maddrs=self.settings.host_maddr,
                client_mode=self.settings.client_mode,
                batch_size=self.settings.train_batch_size,
                max_threads=self.max_threads,
                log_level=self.settings.log_level,
                period=min(self.settings.announce_period, 5.0),
                limits=self._worker_limits(),
                max_memory=self.settings.max_memory,
            ),
            sharing=self.checkpoints,
            governor=self.governor,
            ledger=self.ledger,
        )
        self.inference = InferenceService(
            p2p, self.swarm, self.keys, self.identity.private_key, self.identity.peer_id,
            ChainConfig(call_timeout=self.settings.inference_timeout),
        )  # fmt: skip
        governor = self.governor
        self.inference.refuse = lambda: "paused by its owner" if governor.serving_paused else None
        if self.settings.serve and "server" not in self.roles:
            logger.warning("--serve given, but this peer does not take the server role: serving nothing")
        for spec in map(parse_serve_spec, self.settings.serve if "server" in self.roles else []):
            serve = ServeConfig(
                model=spec.model,
                span=LayerSpan(spec.start, spec.end) if spec.start is not None and spec.end is not None else None,
                blocks=self.settings.serve_blocks,
                max_sessions=self.settings.max_sessions,
                max_session_tokens=self.settings.max_session_tokens,
                idle_timeout=self.settings.session_idle_timeout,
                announce_period=self.settings.announce_period,
                namespace=self.keys.swarm,
                max_memory=self.settings.max_memory,
            )
            task = asyncio.create_task(self.inference.serve(serve, self._stop), name=f"garden-serve-{spec}")
            self._tasks.append(task)
        self._tasks.append(asyncio.create_task(self.missions.run(self._stop), name="garden-missions"))
        self._tasks.append(asyncio.create_task(self.work.run(self._stop), name="garden-mission-work"))
        self._tasks.append(asyncio.create_task(self.training.run(self._stop), name="garden-training"))
        self._tasks.append(asyncio.create_task(self._keep_ledger(), name="garden-contribution"))
        checkpoints = self.checkpoints
        self.disk = DiskKeeper(
            self.data_dir.root,
            self.settings.max_disk,
            self.store,
            self.missions,
            lambda mission_id: [(c.path, c.epoch) for c in checkpoints.local(mission_id)],
            on_pruned_rows=lambda _mission, attempt: keeper.pruned.add(attempt),
        )
        self._tasks.append(asyncio.create_task(self.disk.run(self._stop), name="garden-disk"))

    def _worker_limits(self) -> dict[str, Any]:
        idle = self._idle_config()
        return {
            "max_cpu": self.max_cpu_fraction,
            "idle_threshold": idle.threshold if idle else None,
            "idle_quiet_s": idle.quiet_s if idle else 60.0,
        }

    def _on_pause_changed(self) -> None:
        """On the event loop, at once: trainers are told to stop (or start again), shaking looks again; a
        trainer still in its step after ``PAUSE_GRACE`` is killed then, not at the next supervision round."""
        self._tend_training()
        if self.governor is not None and self.governor.paused:
            asyncio.get_running_loop().call_later(PAUSE_GRACE + 0.05, self._tend_training)
        if self.missions is not None:
            self.missions.wake()

    def _tend_training(self) -> None:
        if self.training is not None:
            try:
                self.training.tend()
            except Exception:
                logger.exception("could not apply the pause to training")

    async def _keep_ledger(self) -> None:
        """Count tokens served and time online, and write the counters every ``LEDGER_PERIOD``."""
        assert self.ledger is not None
        served: dict[int, int] = {}
        while True:
            for server in self.inference.servers if self.inference else []:
                total = server.stats.tokens_served
                self.ledger.add("tokens_served", total - served.get(id(server), 0))
                served[id(server)] = total
            try:
                await asyncio.to_thread(self.ledger.flush)
            except Exception as e:
                logger.warning("could not write the contribution counters: %s", e)
            if self._stop.is_set():
                return
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=LEDGER_PERIOD)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        """Leave the swarm politely: stop periodic work, announce ``offline``."""
        self._stop.set()
        if self.training is not None:
            self.training.begin_stop()  # workers wind down while the rest stops
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, timeout=GOODBYE_TIMEOUT)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
        self._tasks.clear()
        if self.work is not None:
            await self.work.close()
        if self.training is not None:
            await self.training.close()
        if self.inference is not None:
            await self.inference.stop()
        if self.transfer is not None:
            await self.transfer.stop()
        if self._p2p is not None:
            await self._p2p.shutdown()  # a replica: closes this process's client, not the DHT's p2pd
            self._p2p = None
        if self.directory is not None and self.directory.joined and self.swarm and self.swarm.failure() is None:
            try:
                await asyncio.wait_for(self.directory.say_goodbye(), timeout=GOODBYE_TIMEOUT)
            except TimeoutError:
                logger.info("goodbye record not stored in time; it will expire on its own")

    def close(self) -> None:
        """Stop the DHT process (and its p2pd) and close the store. Idempotent."""
        if self.governor is not None:
            self.governor.stop()
        if self.ledger is not None and self.store is not None:
            try:
                self.ledger.flush()
            except Exception as e:
                logger.warning("could not write the contribution counters: %s", e)
        if self.swarm is not None:
            self.swarm.shutdown()
        if self.store is not None:
            self.store.close()
            self.store = None

    # --- state -------------------------------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        assert self.identity is not None, "start() first"
        return self.identity.peer_id

    @property
    def uptime_s(self) -> float:
        return 0.0 if self.started_at is None else time.time() - self.started_at

    @property
    def invalid_peer_records(self) -> int:
        """Peer records refused by the DHT node plus those dropped when reading."""
        refused = self.peer_validator.rejected if self.peer_validator else 0
        return refused + (self.directory.invalid_records if self.directory else 0)

    def child_pids(self) -> list[int]:
        workers = self.training.child_pids() if self.training is not None else []
        return (self.swarm.child_pids() if self.swarm is not None else []) + workers

    def _make_record(self, state: PeerState) -> PeerInfo:
        assert self.machine is not None
        return PeerInfo(
            peer_id=self.peer_id,
            version=__version__,
            state=state,
            roles=list(self.roles),
            cores=self.machine.cores,
            ram_bytes=self.machine.ram_bytes,
            gpu=self.machine.gpu,
            load=machine_load(),
            addresses=self.addresses[:32],
            client_mode=self.settings.client_mode,
            announced_at=get_dht_time(),
            paused=self.governor.paused if self.governor else False,
            working=self.governor.working_state()[:200] if self.governor else "",
            contribution=self.ledger.totals() if self.ledger else None,
        )
