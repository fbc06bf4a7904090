"""The Gardener: one peer of the swarm, the composition root where every service is built and wired.

It knows nothing of HTTP or signals (``garden.daemon.runner`` runs the process; ``garden.api`` serves the
port, reading the services' snapshots), so tests can drive a Gardener directly. :meth:`Gardener.open` is
synchronous and runs before the event loop exists, because the hivemind DHT forks a child process; the
services take what needs the loop (the P2P handle, threads) in their ``start``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass

from hivemind.utils.timed_storage import get_dht_time

from garden import __version__
from garden.config import GardenSettings
from garden.daemon.datadir import DataDir
from garden.daemon.supervisor import Supervisor
from garden.inference.blocks import LayerSpan
from garden.inference.client import ChainConfig
from garden.inference.server import ServeConfig
from garden.inference.service import InferenceService
from garden.host.contribution import Ledger
from garden.host.loop_lag import LoopLag
from garden.host.disk import DiskKeeper
from garden.host.governor import Governor
from garden.host.idle import IdleConfig
from garden.host.capabilities import MachineInfo, choose_roles, machine_load, probe_machine
from garden.net.directory import PeerDirectory
from garden.net.nudge import Nudges
from garden.net.identity import Identity, load_or_create_identity
from garden.net.reach import Reach, ReachResponder, RelayLimits, assess, loopback_only, plan
from garden.net.swarm import Swarm, SwarmConfig
from garden.protocol.invite import PEER_MADDR
from garden.protocol.keys import DHTKeys
from garden.protocol.records import PeerInfo, PeerState, Role
from garden.protocol.serve_spec import parse_serve_spec
from garden.mission.book import NUDGE_TOPIC, MissionBook, MissionPolicy
from garden.mission.replication import RowSetKeeper
from garden.net.transfer import ContentTransfer, TransferLimits
from garden.protocol.validators import MissionRecordValidator, PeerRecordValidator, ShardRecordValidator
from garden.lifecycle import Service
from garden.models.cache import use_data_dir
from garden.models.loading import stop_conversions
from garden.store import Store
from garden.mission.leases import LeaseConfig, LeaseManager
from garden.mission.shaking import MissionWork, WorkConfig
from garden.mission.checkpoints import CheckpointSharing
from garden.mission.feedback import Feedback
from garden.mission.students import SwarmStudents
from garden.mission.vouching import CheckpointVoucher
from garden.mission.training import TrainingConfig, TrainingWork

logger = logging.getLogger(__name__)

LEDGER_PERIOD = 5.0
"""Seconds between writes of the contribution counters to the store (a crash loses at most these)."""


@dataclass(frozen=True)
class Host:
    """What :meth:`Gardener.open` set up before any service exists: the machine's side of the peer, and the
    running DHT. Each part can fail for a reason the user can fix, so they are made (and undone) first."""

    settings: GardenSettings
    data_dir: DataDir
    identity: Identity
    store: Store
    machine: MachineInfo
    roles: list[Role]
    skipped_roles: dict[str, str]
    governor: Governor
    ledger: Ledger
    validators: Validators
    swarm: Swarm
    addresses: list[str]
    reach: Reach


@dataclass(frozen=True)
class PeerCounters:
    """The peer-wide counters of ``/metrics`` that belong to no one service.

    :param dht_requests: DHT requests made by this daemon, by (operation, outcome)
    :param invalid_peer_records: peer records refused by the DHT node plus those dropped when reading
    :param invalid_mission_records: mission-related records refused or ignored, by kind
    :param missions_ignored: valid missions of other leads not kept now, by reason (over the lead's cap, too old)
    :param mission_index_reads: reads of the mission index, by kind: ``heads`` (every refresh, small) and ``full``
        (when a lead's head changed, or a minute passed)
    :param nudges: nudges (``garden.net.nudge``) by outcome: ``sent`` (peers that answered this lead's), ``acted``
        (another peer's that made this one look), ``ignored`` (within a second of an acted one), ``refused``
    """

    dht_requests: dict[tuple[str, str], int]
    invalid_peer_records: int
    invalid_mission_records: dict[str, int]
    missions_ignored: dict[str, int]
    mission_index_reads: dict[str, int]
    nudges: dict[str, int]


@dataclass(frozen=True)
class Validators:
    """The DHT node's record validators (they count what they refuse, for ``/metrics``)."""

    peers: PeerRecordValidator
    shards: ShardRecordValidator
    missions: MissionRecordValidator


class LedgerKeeper(Service):
    """Counts tokens served by this peer's block servers and time online, and writes the contribution
    counters every ``LEDGER_PERIOD`` (a crash loses at most that), and once more at the end."""

    name = "contribution"

    def __init__(self, ledger: Ledger, inference: InferenceService):
        self.ledger, self.inference = ledger, inference
        self._served: dict[int, int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while True:
            await self.flush()
            if stop.is_set():
                return
            try:
                await asyncio.wait_for(stop.wait(), timeout=LEDGER_PERIOD)
            except TimeoutError:
                pass

    async def flush(self) -> None:
        for server in self.inference.servers:
            total = server.stats.tokens_served
            self.ledger.add("tokens_served", total - self._served.get(id(server), 0))
            self._served[id(server)] = total
        try:
            await asyncio.to_thread(self.ledger.flush)
        except Exception as e:
            logger.warning("could not write the contribution counters: %s", e)


class Gardener:
    """The composition root: every service of one peer is built here, fully, in :meth:`__init__`; nothing is
    wired later. :meth:`open` prepares the machine and the DHT (synchronously: the DHT forks), :meth:`start`
    starts the services in order on the event loop, :meth:`stop` stops them in the reverse order, and
    :meth:`close` stops the DHT and closes the store.

    Who uses whom (each arrow a constructor argument)::

        transfer -> swarm                      directory -> swarm
        reach_checks -> swarm, reach           (answers other peers' "can you dial me back?")
        missions -> store, swarm, transfer     (registers prompts and rows with the transfer)
        checkpoints -> swarm, transfer         (registers ckpt)
        disk -> store, missions, checkpoints   keeper -> store, missions, transfer, disk (takes row-set offers)
        vouching -> missions, checkpoints, store, shaking's compute slot, governor (the lead's countersignature)
        students -> missions, checkpoints, swarm, disk   (publishes the lead's students; pulls mission:<id> in the room)
        shaking -> missions, keeper, leases, directory, governor, ledger, students (a mission:<id> teacher)
        training -> missions, store, checkpoints, governor, ledger, students (a mission:<id> student)
        inference -> swarm, governor, students (its model names)
        contribution -> ledger, inference
    """

    def __init__(self, host: Host):
        self.host = host
        settings, identity, swarm, keys = host.settings, host.identity, host.swarm, DHTKeys(host.settings.swarm)
        self.settings, self.keys, self.data_dir, self.swarm = settings, keys, host.data_dir, swarm
        self.store, self.governor, self.ledger = host.store, host.governor, host.ledger
        self.machine, self.roles, self.skipped_roles, self.addresses, self.reach = (
            host.machine, host.roles, host.skipped_roles, host.addresses, host.reach
        )  # fmt: skip
        self.client_mode = settings.client_mode or host.reach.mode == "client"
        period = min(settings.announce_period, 5.0)
        limits = TransferLimits(
            upload_rate=settings.max_upload_rate, download_rate=settings.max_download_rate,
            serve_memory=settings.max_serving_memory,
        )  # fmt: skip
        self.transfer = ContentTransfer(swarm, limits=limits, namespace=keys.swarm)
        self.reach_checks = ReachResponder(swarm, host.reach, namespace=keys.swarm)
        self.directory = PeerDirectory(
            swarm, keys, identity.private_key, self._make_record, settings.announce_period,
            remember=lambda peers: self.store.set_meta(BOOTSTRAP_META, json.dumps(peers)),
        )  # fmt: skip
        policy = MissionPolicy(
            trusted_leads=frozenset(settings.trust_lead),
            max_open_per_lead=settings.max_missions_per_lead,
            max_age=settings.mission_max_age,
            local_models_from_trusted=settings.allow_local_models,
        )
        self.missions = MissionBook(
            self.store, swarm, keys, identity.private_key, identity.peer_id, settings.announce_period, self.transfer,
            policy,
        )  # fmt: skip
        self.nudges = Nudges(swarm, namespace=keys.swarm)
        self.nudges.on(NUDGE_TOPIC, self.missions.look)
        self.missions.on_change = self._nudge_about_missions
        self.checkpoints = CheckpointSharing(
            swarm, keys, identity.private_key, identity.peer_id, self.transfer,
            train_root=self.data_dir.train, pulled_root=self.data_dir.pulled_checkpoints,
        )  # fmt: skip
        self.disk = DiskKeeper(self.data_dir.root, settings.max_disk, self.store, self.missions, self.checkpoints)
        self.feedback = Feedback(self.store)  # the owner's ratings of the answers they got (never leave here)
        self.students = SwarmStudents(
            self.missions, self.checkpoints, swarm, keys, identity.private_key, self.data_dir.root / "students",
            period=period, disk=self.disk,
        )  # fmt: skip
        leases = LeaseManager(
            swarm.dht, keys, identity.private_key,
            LeaseConfig(lease_duration=settings.lease_seconds, dht_timeout=settings.dht_timeout),
            gone=self.directory.gone,
        )  # fmt: skip
        self.keeper = RowSetKeeper(
            self.store, self.missions, self.transfer, self.disk, leases, void_after=settings.void_after
        )
        self.work = MissionWork(
            self.missions, self.keeper, leases, self.directory,
            WorkConfig(
                shaker="shaker" in self.roles, period=period, max_memory=settings.max_memory,
                max_missions=settings.max_missions, threads=self.max_threads, trainer="trainer" in self.roles,
            ),  # fmt: skip
            governor=self.governor, ledger=self.ledger, disk=self.disk, students=self.students,
        )  # fmt: skip
        self.vouching = CheckpointVoucher(
            self.missions, self.checkpoints, self.data_dir.store, self.data_dir.root / "vouching", period=period,
            compute=self.work.compute, governor=self.governor, quiet_s=settings.vouch_quiet_s,
        )  # fmt: skip
        idle = self._idle_config()
        self.training = TrainingWork(
            self.missions,
            self.store,
            TrainingConfig(
                trainer="trainer" in self.roles,
                root=self.data_dir.train,
                store_path=self.data_dir.store,
                initial_peers=list(dict.fromkeys([*(self.addresses or []), *settings.join])),
                host_maddrs=settings.host_maddr,
                client_mode=self.client_mode,
                relays=self.reach.relays if self.reach.mode == "relayed" else [],
                batch_size=settings.train_batch_size,
                max_threads=self.max_threads,
                log_level=settings.log_level,
                period=period,
                limits={
                    "max_cpu": self.max_cpu_fraction,
                    "idle_threshold": idle.threshold if idle else None,
                    "idle_quiet_s": idle.quiet_s if idle else 60.0,
                },
                max_memory=settings.max_memory,
                max_trainers=min(settings.max_trainers, settings.max_missions),
            ),
            sharing=self.checkpoints,
            governor=self.governor,
            ledger=self.ledger,
            disk=self.disk,
            students=self.students,
        )
        self.inference = InferenceService(
            swarm, keys, identity.private_key, identity.peer_id,
            ChainConfig(call_timeout=settings.inference_timeout, spot_check=settings.spot_check,
                        push=settings.server_push),  # fmt: skip
            serving=self._serve_configs(), governor=self.governor, names=self.students,
        )  # fmt: skip
        self.contribution = LedgerKeeper(self.ledger, self.inference)
        self.loop_lag = LoopLag()
        self.supervisor = Supervisor(
            [self.loop_lag, self.transfer, self.reach_checks, self.nudges, self.directory, self.missions, self.work,
             self.training, self.inference, self.disk, self.contribution, self.vouching, self.students]
        )  # fmt: skip
        self.started_at = time.time()

    async def _nudge_about_missions(self) -> None:
        """A mission or cancel of this lead is in the DHT: the peers this one knows look now, not at their period."""
        told = await self.nudges.send(NUDGE_TOPIC, [entry.info.peer_id for entry in self.directory.known])
        logger.debug("nudged %d peer(s) about this peer's missions", told)

    # --- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: GardenSettings) -> Gardener:
        """Open the store, load the identity, probe the machine, start the DHT, and build every service.
        Raises on failure (``SwarmError``, ``IdentityError``, ``StoreError``) after undoing what it did."""
        data_dir = DataDir(settings.data_dir)
        data_dir.ensure()
        use_data_dir(data_dir.models)  # before anything loads a model, here or in a worker process
        store: Store | None = None
        governor: Governor | None = None
        swarm: Swarm | None = None
        try:
            identity = load_or_create_identity(data_dir.identity)
            store = Store(data_dir.store)
            store.set_meta("peer_id", identity.peer_id)
            machine = probe_machine()
            roles, skipped_roles = choose_roles(settings.roles, machine)
            governor = Governor(store, _max_cpu_fraction(settings), _idle_config(settings), root_pid=os.getpid())
            _cap_threads(_max_threads(settings, machine))
            validators = Validators(
                PeerRecordValidator(DHTKeys(settings.swarm)),
                ShardRecordValidator(DHTKeys(settings.swarm)),
                MissionRecordValidator(DHTKeys(settings.swarm)),
            )
            join = _with_remembered(settings.join, store, identity.peer_id)
            reach = asyncio.run(
                assess(join, settings.host_maddr, settings.swarm, settings.reachability, settings.relay,
                       settings.client_mode)  # fmt: skip
            )  # before the DHT forks: no event loop may run then
            limits = RelayLimits(
                max_circuits=settings.relay_max_circuits, max_reservations=settings.relay_max_reservations,
                data_limit=int(settings.relay_data_limit), time_limit=settings.relay_time_limit,
            )  # fmt: skip
            p2p = plan(reach, limits)
            swarm = Swarm(
                SwarmConfig(
                    initial_peers=join,
                    host_maddrs=settings.host_maddr,
                    announce_maddrs=settings.announce_maddr,
                    client_mode=settings.client_mode,
                    identity_path=str(identity.path),
                    dht_timeout=settings.dht_timeout,
                    record_validators=[validators.peers, validators.shards, validators.missions],
                    p2p=p2p,
                    # nobody on a loopback swarm needs a relay: its peers skip the probe's second or two
                    check_relay=p2p.check_relay and not loopback_only(settings.host_maddr),
                )
            )
            swarm.start()
            reach.probed(swarm.relay_probe, swarm.starts)
            addresses = [] if settings.client_mode or p2p.client_mode else swarm.visible_maddrs()
            host = Host(
                settings, data_dir, identity, store, machine, roles, skipped_roles, governor, Ledger(store),
                validators, swarm, addresses, reach,
            )  # fmt: skip
            return cls(host)
        except BaseException:
            if swarm is not None:
                swarm.shutdown()
            if store is not None:
                store.close()
            raise

    async def start(self) -> None:
        """Start the governor's sampling and every service in order (the P2P handlers, then the periodic work);
        returns once all run in the background."""
        self.governor.start()
        machine_load()  # prime psutil's CPU counter so the first announce reports a real value
        await self.supervisor.start()

    async def stop(self) -> None:
        """Leave the swarm politely: stop the services in the reverse order (the last one announces
        ``offline``), then close this process's P2P handle. A GGUF conversion still running ends first: it
        could take minutes, and a thread waiting on it would hold up the exit."""
        stopped = stop_conversions()
        if stopped:
            logger.info("stopped %d model conversion(s) in progress; the next start converts again", stopped)
        await self.supervisor.stop()
        await self.swarm.close_p2p()

    def close(self) -> None:
        """Stop the DHT node (and its p2pd) and close the store. Idempotent."""
        self.governor.stop()
        try:
            self.ledger.flush()
        except Exception as e:
            logger.warning("could not write the contribution counters: %s", e)
        self.swarm.shutdown()
        self.store.close()

    @property
    def max_cpu_fraction(self) -> float | None:
        return _max_cpu_fraction(self.settings)

    @property
    def max_threads(self) -> int | None:
        return _max_threads(self.settings, self.machine)

    def _idle_config(self) -> IdleConfig | None:
        return _idle_config(self.settings)

    def _serve_configs(self) -> list[ServeConfig]:
        settings = self.settings
        if settings.serve and "server" not in self.roles:
            logger.warning("--serve given, but this peer does not take the server role: serving nothing")
            return []
        configs = []
        for spec in map(parse_serve_spec, settings.serve):
            configs.append(
                ServeConfig(
                    model=spec.model,
                    span=LayerSpan(spec.start, spec.end) if spec.start is not None and spec.end is not None else None,
                    blocks=settings.serve_blocks,
                    max_sessions=settings.max_sessions,
                    max_session_tokens=settings.max_session_tokens,
                    idle_timeout=settings.session_idle_timeout,
                    announce_period=settings.announce_period,
                    namespace=self.keys.swarm,
                    max_memory=settings.max_memory,
                )
            )
        return configs

    # --- state -------------------------------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return self.host.identity.peer_id

    @property
    def uptime_s(self) -> float:
        return time.time() - self.started_at

    def counters(self) -> PeerCounters:
        validators = self.host.validators
        missions = {"shard (DHT)": validators.shards.rejected, "mission (DHT)": validators.missions.rejected}
        return PeerCounters(
            dht_requests=dict(self.swarm.stats.requests),
            invalid_peer_records=validators.peers.rejected + self.directory.invalid_records,
            invalid_mission_records={
                **missions, **dict(sorted(self.missions.invalid_records.items())),
                "student": self.students.invalid_records,
            },  # fmt: skip
            missions_ignored=dict(sorted(Counter(self.missions.ignored.values()).items())),
            mission_index_reads=dict(sorted(self.missions.index_reads.items())),
            nudges={"acted": self.nudges.acted, "ignored": self.nudges.ignored, "refused": self.nudges.refused,
                    "sent": self.nudges.sent},  # fmt: skip
        )

    def child_pids(self) -> list[int]:
        return self.swarm.child_pids() + self.training.child_pids()

    def _make_record(self, state: PeerState) -> PeerInfo:
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
            client_mode=self.client_mode,
            reachability=self.reach.reachability,
            announced_at=get_dht_time(),
            paused=self.governor.paused,
            working=self.governor.working_state()[:200],
            contribution=self.ledger.totals(),
        )


BOOTSTRAP_META = "bootstrap_peers"
"""The store's meta key of the bootstrap addresses remembered from the swarm (``PeerDirectory``'s ``remember``)."""


def _with_remembered(join: list[str], store: Store, peer_id: str) -> list[str]:
    """``--join`` and the peers remembered from the last run (a restart rejoins even when the peer it first joined
    through is gone). A peer started without ``--join`` founds a swarm as asked: nothing is added."""
    if not join:
        return []
    try:
        remembered = json.loads(store.get_meta(BOOTSTRAP_META) or "[]")
    except ValueError:
        remembered = []
    extra = [
        p for p in remembered
        if isinstance(p, str) and re.fullmatch(PEER_MADDR, p) and p not in join and not p.endswith(f"/p2p/{peer_id}")
    ]  # fmt: skip
    return [*join, *extra]


def _max_cpu_fraction(settings: GardenSettings) -> float | None:
    return settings.max_cpu / 100.0 if settings.max_cpu else None


def _max_threads(settings: GardenSettings, machine: MachineInfo) -> int | None:
    """``--max-threads``, else as many threads as ``--max-cpu`` leaves whole cores (at least one)."""
    if settings.max_threads:
        return settings.max_threads
    fraction = _max_cpu_fraction(settings)
    return max(1, int(fraction * machine.cores)) if fraction else None


def _idle_config(settings: GardenSettings) -> IdleConfig | None:
    if settings.when != "idle":
        return None
    return IdleConfig(threshold=settings.idle_threshold / 100.0, quiet_s=settings.idle_quiet_s)


def _cap_threads(threads: int | None) -> None:
    """Cap torch's threads in this process. Torch is not imported for it (an idle daemon holds none): the
    environment says it to the torch this process imports later, and to the processes it starts."""
    if not threads:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)  # what torch's thread pool starts with
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
