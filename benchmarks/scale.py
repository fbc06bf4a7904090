"""Fifty peers, simulated: garden's DHT records, its shard protocol and an averaging round at swarm size, on one
machine.

Prints ONE JSON object to stdout; progress lines go to stderr (none with ``--json-only``).

What is measured, and how:

- **the DHT** (``dht``): ``--peers`` hivemind DHT nodes (``DHTNode``, each with its own ``p2pd``, as every garden
  peer has; garden's three record validators on each), hosted ``--peers-per-process`` to a process. Each node does
  what an idle garden peer does in the DHT: it stores its signed peer record and reads everyone's every
  ``--period`` seconds (``garden.net.directory``), and reads the leads' index heads every 5 s and the mission
  index whole every 60 s or when a head changed (``garden.mission.book``); ``--leads`` of them lead ``--missions``
  open missions (signed records of ``examples/capitals.toml``), each re-stored every 5 minutes (at a random phase),
  their heads every period. After a warm-up of two periods, ``--window`` seconds of this are measured: every read's
  latency, and the bytes the DHT moves: the loopback traffic of a network namespace made for the run (all the
  nodes' TCP, nothing else; without the right to make one, no byte figure), per peer per minute. Then a burst of
  lookups (``--lookups`` reads of each key per node, at random moments over 10 s) adds to the latency sample.
  Targets: p99 <= 1 s for every lookup. The window (``steady``) and the burst (``burst``) are also reported apart,
  each with where its reads' time went: the ``rpc_find``s sent (a read sends one to each node it visits, and waits
  for the last; one unanswered waited hivemind's ``wait_timeout``, 3 s), why those that failed did, and how late
  the host processes' event loops ran. Reads and stores search ``--beam`` nodes, by default what garden's daemon
  searches (``garden.net.dht_thread.SEARCH_BEAM``); ``--beam 20`` is hivemind's default.
- **the shards** (``shards``): the same nodes are shakers of one mission of ``--shards`` shards. Each runs garden's
  ``LeaseManager`` through its node (claim with read-back, renewals, done records, all checked by the validators),
  "samples" a shard for ``--sample-s`` seconds (a sleep instead of the teacher), its lease confirmed a second in
  beside the sampling, and claims the next while the done record is published, as a shaker does
  (``garden.mission.shaking``), until none is open, in a swarm that does nothing else (the DHT part's
  announcing stopped: on one machine its CPU would be the shakers'). Then the board is read: a shard done by more
  than one attempt is a duplicate, one that no done record covers is lost; the time to finish is compared with the
  ideal (``shards * sample_s / peers``, no protocol), and the CPU and bytes of the whole swarm are divided by the
  shards. Targets: 0 duplicates, 0 lost, time / ideal <= 1.2.
- **an averaging round** (``round``): one all-reduce round of hivemind's ``AllReduceRunner`` (what a group runs
  once formed, garden's patches installed) of a ``--round-params`` float32 model, between ``--round-large``
  peers and between ``--round-small`` peers, every peer's p2pd on this machine. Target: large / small <= 2.
  Each peer sends and receives about its model's size whatever the group (the butterfly all-reduce), so on a
  machine per peer the round's time hardly grows; here all peers share the machine's cores, and the ratio
  ``cpu_bound_ratio`` (large / small peers: the work the cores do) is what one machine can show at best.

With ``SCALE_PROFILE=<path>`` in the environment each host process writes its ``cProfile`` to ``<path>.<pid>``
(how the missions' re-checks and then hivemind's own costs were found).

``--parts`` picks some of ``dht,shards,round``. Runtime with the defaults: about 15 minutes on 2 cores (the
shards part stops after ``--shards-timeout``; ``--peers 10 --shards 100`` takes 3). The figures and what they
imply for 1,000 peers: ``docs/architecture.md``, "At swarm size".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's garden and harness

ROOT = Path(__file__).resolve().parents[1]
SWARM = "scale"
MISSION_REFRESH_S = 5.0  # garden.mission.book.REFRESH_PERIOD
INDEX_FULL_READ_S = 60.0  # garden.mission.book.INDEX_FULL_READ_PERIOD
MISSION_RENEW_S = 300.0  # garden.mission.book.MISSION_RENEW_PERIOD
TARGETS = {"lookup_p99_s": 1.0, "duplicate_shards": 0, "lost_shards": 0, "shards_time_over_ideal": 1.2,
           "round_large_over_small": 2.0}  # fmt: skip
quiet = False


def log(message: str) -> None:
    if not quiet:
        print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- a host process: some of the swarm's nodes ---------------------------------------------------------------


class NodeDHT:
    """What ``LeaseManager`` calls on a ``hivemind.DHT`` (``get``/``store`` with ``return_future=True``), on a
    ``DHTNode`` of this process's event loop: the same records, validators and RPCs, without a DHT process per
    node."""

    def __init__(self, node: Any, beam: int) -> None:
        self.node, self.beam = node, beam

    def get(self, key: str, latest: bool = False, **_: Any) -> Any:
        return asyncio.ensure_future(self.node.get(key, latest=latest, beam_size=self.beam))

    def store(self, key: str, value: Any, expiration_time: float, subkey: Any = None, **_: Any) -> Any:
        return asyncio.ensure_future(self.node.store(key, value, expiration_time, subkey=subkey, beam_size=self.beam))


class Host:
    """``count`` DHT nodes with garden's validators, each announcing like an idle garden peer."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.nodes: list[Any] = []
        self.keys_: list[Any] = []
        self.reads: dict[str, list[float]] = {"peers": [], "missions": [], "heads": []}
        self.failed_reads = 0
        self.finds: list[tuple[float, bool]] = []  # each rpc_find this host's nodes sent: seconds, answered
        self.lags: list[float] = []  # how late this process's event loop woke a 0.1 s sleep
        self.find_errors: Counter[str] = Counter()  # why the unanswered rpc_finds failed (hivemind logs it)
        self.missions: list[Any] = []
        self.tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> list[str]:
        from cryptography.hazmat.primitives.asymmetric import rsa
        from hivemind.dht.node import DHTNode
        from hivemind.dht.validation import CompositeValidator

        from garden.protocol.keys import DHTKeys
        from garden.protocol.validators import MissionRecordValidator, PeerRecordValidator, ShardRecordValidator

        keys = DHTKeys(SWARM)
        self._count_find_errors()
        initial = json.loads(self.args.initial_peers) if self.args.initial_peers else None
        for _ in range(self.args.count):
            validator = CompositeValidator(
                [PeerRecordValidator(keys), ShardRecordValidator(keys), MissionRecordValidator(keys)]
            )
            node = await DHTNode.create(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                        record_validator=validator, cache_locally=True)  # fmt: skip
            self._time_finds(node)
            self.nodes.append(node)
            self.keys_.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
            if initial is None:
                initial = [str(a) for a in await node.p2p.get_visible_maddrs()]
        if self.args.leads:
            self.missions = make_missions(self.keys_[: self.args.leads], self.args.missions)
        return initial or []

    def _count_find_errors(self) -> None:
        """hivemind's ``call_find`` swallows the error of a find that failed and logs it at debug level."""
        import logging

        errors = self.find_errors

        class Count(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.exc_info and record.exc_info[0] is not None:
                    errors[f"{record.exc_info[0].__name__}: {str(record.exc_info[1])[:80]}"] += 1

        protocol_log = logging.getLogger("hivemind.dht.protocol")
        protocol_log.setLevel(logging.DEBUG)
        protocol_log.propagate = False
        protocol_log.addHandler(Count())

    def _time_finds(self, node: Any) -> None:
        """Record each ``rpc_find`` the node sends (a read is one per node it visits): whether reads wait on
        the nodes that answer late or not at all (hivemind's ``wait_timeout``), or on this process."""
        send = node.protocol.call_find

        async def timed(peer: Any, keys: Any) -> Any:
            started = time.perf_counter()
            answer = await send(peer, keys)
            self.finds.append((time.perf_counter() - started, answer is not None))
            return answer

        node.protocol.call_find = timed

    async def _watch_loop(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.1)
            self.lags.append(time.perf_counter() - started - 0.1)

    def begin_announcing(self) -> None:
        self.tasks.append(asyncio.create_task(self._watch_loop()))
        for i, node in enumerate(self.nodes):
            self.tasks.append(asyncio.create_task(self._announce(i, node)))
            self.tasks.append(asyncio.create_task(self._refresh_missions(node)))

    async def _timed_read(self, node: Any, key: str, what: str) -> Any:
        started = time.perf_counter()
        try:
            found = await asyncio.wait_for(node.get(key, latest=True, beam_size=self.args.beam), timeout=10.0)
        except Exception:
            found = None
        if found is None:
            self.failed_reads += 1
        else:
            self.reads[what].append(time.perf_counter() - started)
        return found

    async def _announce(self, i: int, node: Any) -> None:
        from hivemind.utils import get_dht_time

        from garden.protocol import signing
        from garden.protocol.keys import DHTKeys
        from garden.protocol.mission import sign_index_head
        from garden.protocol.records import PeerInfo

        keys, key, beam = DHTKeys(SWARM), self.keys_[i], self.args.beam
        peer_id = signing.peer_id_of(signing.public_key_der(key))
        addresses = [f"{a}" for a in await node.p2p.get_visible_maddrs()]
        await asyncio.sleep(random.uniform(0, self.args.period))  # peers start at different moments
        # published at the start (before the measured window), then renewed each at its own moment
        renewed = {m.mission_id: -float("inf") for m in self.missions}
        while True:
            now = get_dht_time()
            record = PeerInfo(peer_id=peer_id, version="scale", roles=["shaker"], cores=2, ram_bytes=8 << 30,
                              load=0.1, addresses=addresses, reachability="public", announced_at=now)  # fmt: skip
            await node.store(keys.peers, record.to_wire(key), now + 2 * self.args.period, subkey=peer_id,
                             beam_size=beam)
            led = [m for m in (self.missions if i < self.args.leads else []) if m.lead_peer_id == peer_id]
            for mission in led:
                if time.monotonic() - renewed[mission.mission_id] >= MISSION_RENEW_S:
                    await node.store(keys.missions, mission.to_wire(), now + 2 * 3600, subkey=mission.mission_id,
                                     beam_size=beam)
                    phase = random.uniform(0, MISSION_RENEW_S) if renewed[mission.mission_id] < 0 else 0.0
                    renewed[mission.mission_id] = time.monotonic() - phase
            if led:
                head = sign_index_head(key, [m.mission_id for m in led], [], now)
                await node.store(keys.mission_heads, head, now + max(4 * self.args.period, 60.0), subkey=peer_id,
                                 beam_size=beam)
            await self._timed_read(node, keys.peers, "peers")
            await asyncio.sleep(self.args.period)

    async def _refresh_missions(self, node: Any) -> None:
        """The book's refresh: the heads every 5 s, the index whole when they changed or a minute passed (the
        heads are compared by their subkeys and digests, as the book does after checking each)."""
        from garden.protocol.keys import DHTKeys
        from garden.protocol.mission import open_index_head

        keys = DHTKeys(SWARM)
        seen: dict[Any, str] | None = None
        full_at = -float("inf")
        await asyncio.sleep(random.uniform(0, MISSION_REFRESH_S))
        while True:
            found = await self._timed_read(node, keys.mission_heads, "heads")
            heads = None
            if found is not None and hasattr(found.value, "items"):
                heads = {subkey: open_index_head(item.value, subkey, item.expiration_time, time.time()).digest
                         for subkey, item in found.value.items()}  # fmt: skip
            if (heads is not None and heads != seen) or time.monotonic() - full_at >= INDEX_FULL_READ_S:
                await self._timed_read(node, keys.missions, "missions")
                full_at, seen = time.monotonic(), heads if heads is not None else seen
            await asyncio.sleep(MISSION_REFRESH_S)

    async def lookups(self, count: int) -> None:
        from garden.protocol.keys import DHTKeys

        keys = DHTKeys(SWARM)

        async def one(node: Any, key: str, what: str) -> None:
            await asyncio.sleep(random.uniform(0, 10.0))
            await self._timed_read(node, key, what)

        await asyncio.gather(*(one(node, key, what) for node in self.nodes for _ in range(count)
                               for key, what in ((keys.peers, "peers"), (keys.missions, "missions"),
                                                 (keys.mission_heads, "heads"))))  # fmt: skip

    async def shake(self, mission_id: str, shards: int, sample_s: float, deadline: float) -> dict[str, Any]:
        """Every node a shaker of ``mission_id`` until no shard is open (or ``deadline``, wall time): what each
        finished, and when; the claims and done records that failed (a DHT call past its timeout, mostly)."""
        from garden.mission.leases import LeaseConfig, LeaseError, LeaseLostError, LeaseManager
        from garden.mission.shaking import CONFIRM_AFTER
        from garden.protocol.keys import DHTKeys

        failures, count = {"claim": 0, "done": 0, "done_refused": 0, "lost_at_confirm": 0}, [0]

        async def confirm(manager: Any, lease: Any, sampling: asyncio.Future[None]) -> Any:
            """The shaker's renewer (``garden.mission.shaking``): the lease checked a moment after the claim, while
            the shard is sampled; a claim that crossed another stops the sampling there."""
            await asyncio.sleep(min(CONFIRM_AFTER, sample_s))
            try:
                return await manager.renew(lease)
            except LeaseLostError:
                failures["lost_at_confirm"] += 1
                sampling.cancel()
                return None
            except LeaseError:
                pass  # not answered: the shaker samples on, and its done record checks the lease again
            return lease

        async def finish(manager: Any, lease: Any, finished: list[dict[str, Any]], claim_s: float) -> None:
            """The shaker's done record, published while the next shard is sampled (as ``_finish`` is)."""
            try:
                await manager.mark_done(lease, rows=1, row_set_sha256="ab" * 32)
            except LeaseLostError:  # another attempt's claim crossed this one's: it counts, not this
                failures["done_refused"] += 1
                return
            except LeaseError:
                failures["done"] += 1
                return
            finished.append({"shard": lease.shard, "attempt": lease.attempt, "at": time.time(), "claim_s": claim_s,
                             "shaker": f"{os.getpid()}/{lease.peer_id}"})
            count[0] += 1
            if count[0] % 25 == 0:
                log(f"a host's {len(self.nodes)} shakers finished {count[0]} shards")

        async def shaker(i: int, node: Any) -> list[dict[str, Any]]:
            manager = LeaseManager(NodeDHT(node, self.args.beam), DHTKeys(SWARM), self.keys_[i], LeaseConfig(),  # type: ignore[arg-type]
                                   rng=random.Random(i))  # fmt: skip
            finished: list[dict[str, Any]] = []
            finishing: list[asyncio.Task[None]] = []
            try:
                while time.time() < deadline:
                    claiming = time.monotonic()
                    try:
                        lease = await manager.claim(mission_id, shards)
                        if lease is None and not (await manager.fetch(mission_id, shards)).open_shards():
                            break  # every shard leased or done: nothing left for this shaker
                    except LeaseError:
                        failures["claim"] += 1
                        lease = None
                    if lease is None:
                        await asyncio.sleep(1.0)
                        continue
                    claim_s = time.monotonic() - claiming
                    # the teacher's time, without the teacher, with the lease confirmed beside it
                    sampling = asyncio.ensure_future(asyncio.sleep(sample_s))
                    confirming = asyncio.ensure_future(confirm(manager, lease, sampling))
                    try:
                        await sampling
                    except asyncio.CancelledError:
                        if confirming.done() and confirming.result() is None:
                            continue  # lost at the confirmation: take another shard
                        confirming.cancel()
                        raise
                    lease = await confirming
                    finishing.append(asyncio.ensure_future(finish(manager, lease, finished, claim_s)))
            finally:
                await asyncio.gather(*finishing, return_exceptions=True)
            return finished

        found = await asyncio.gather(*(shaker(i, node) for i, node in enumerate(self.nodes)))
        return {"finished": [f for one in found for f in one], "failures": failures}

    async def board(self, mission_id: str, shards: int) -> dict[str, Any]:
        """The board as one node reads it: done attempts per shard."""
        from garden.mission.leases import LeaseManager
        from garden.protocol.keys import DHTKeys

        manager = LeaseManager(NodeDHT(self.nodes[0], self.args.beam), DHTKeys(SWARM), self.keys_[0])  # type: ignore[arg-type]
        board = await manager.fetch(mission_id, shards)
        return {"done": {str(i): sorted({d.attempt for d in s.results}) for i, s in enumerate(board.shards)}}

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for node in self.nodes:
            try:
                await node.shutdown()
            except Exception as e:  # one node failing to stop must not keep the others' p2pd running
                log(f"a node did not shut down cleanly: {e!r}")


def make_missions(leads: list[Any], count: int) -> list[Any]:
    """``count`` open missions, signed by ``leads`` in turn (capitals.toml, signed at different times)."""
    from garden.data import DEMO_PROMPTS, demo_prompts
    from garden.protocol.mission import load_mission_toml, sign_mission

    draft = load_mission_toml(ROOT / "examples" / "capitals.toml", {DEMO_PROMPTS: demo_prompts})
    now = time.time()
    return [sign_mission(draft, leads[i % len(leads)], now=now + i) for i in range(count)]


async def host_main(args: argparse.Namespace) -> None:
    """A host process: commands on stdin (one JSON per line), answers on stdout (one JSON per line)."""
    host = Host(args)
    loop = asyncio.get_running_loop()

    def say(message: dict[str, Any]) -> None:
        print(json.dumps(message), flush=True)

    try:
        say({"ready": await host.start()})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            what = command["cmd"]
            if what == "announce":
                host.begin_announcing()
                say({"ok": True})
            elif what == "quiet":  # announcing and reading stop: the shard protocol measured alone
                for task in host.tasks:
                    task.cancel()
                host.tasks = []
                say({"ok": True})
            elif what == "reads":  # the latencies so far, and restart counting
                say({"reads": host.reads, "failed": host.failed_reads, "finds": host.finds, "lags": host.lags,
                     "find_errors": host.find_errors})
                host.reads, host.failed_reads = {"peers": [], "missions": [], "heads": []}, 0
                host.finds, host.lags = [], []
                host.find_errors.clear()
            elif what == "lookups":
                await host.lookups(command["count"])
                say({"ok": True})
            elif what == "missions":
                say({"missions": [m.mission_id for m in host.missions]})
            elif what == "shake":
                say(await host.shake(command["mission"], command["shards"], command["sample_s"], command["deadline"]))
            elif what == "board":
                say(await host.board(command["mission"], command["shards"]))
            elif what == "stop":
                return
    finally:
        await host.close()


# --- the coordinator ------------------------------------------------------------------------------------------


class HostProcess:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, command: dict[str, Any] | None = None, timeout: float = 600.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a host process ended (exit {self.proc.wait(timeout=timeout)})")
        return json.loads(line)

    def stop(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=30)


def daemon_beam() -> int:
    from garden.net.dht_thread import SEARCH_BEAM

    return SEARCH_BEAM


def loopback_bytes() -> int | None:
    """Bytes sent on this network namespace's loopback so far (``/proc/net/dev``), or None if unreadable."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])  # transmit bytes
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(name: str | None = None) -> float:
    """CPU seconds used so far by this process's descendants that still run (the hosts and their p2pd), or
    by those of them whose executable is ``name``."""
    import psutil

    from harness.processes import cpu_seconds as of

    children = psutil.Process().children(recursive=True)
    return of(c for c in children if name is None or _named(c, name))


def _named(proc: Any, name: str) -> bool:
    try:
        return bool(proc.name() == name)
    except Exception:  # exited meanwhile
        return False


def run_swarm(args: argparse.Namespace, parts: set[str], isolated: bool) -> dict[str, Any]:
    """The DHT and shard parts, with the nodes in host processes of this network namespace."""
    per = max(1, args.peers_per_process)
    counts = [min(per, args.peers - i) for i in range(0, args.peers, per)]
    args.beam = args.beam or daemon_beam()  # what garden's daemon searches (garden.net.dht_thread)
    base = [sys.executable, __file__, "--host", "--period", str(args.period), "--beam", str(args.beam)]
    log(f"{args.peers} DHT nodes in {len(counts)} processes")
    started = time.monotonic()
    hosts = [HostProcess([*base, "--count", str(counts[0]), "--leads", str(args.leads),
                          "--missions", str(args.missions)])]  # fmt: skip
    result: dict[str, Any] = {}
    try:
        bootstrap = hosts[0].ask()["ready"]
        hosts += [HostProcess([*base, "--count", str(c), "--leads", "0", "--initial-peers", json.dumps(bootstrap)])
                  for c in counts[1:]]  # fmt: skip
        for host in hosts[1:]:
            host.ask()
        result["nodes_started_s"] = round(time.monotonic() - started, 1)
        log(f"nodes up in {result['nodes_started_s']} s")
        if "dht" in parts:
            for host in hosts:
                host.ask({"cmd": "announce"})
            result["dht"] = measure_dht(args, hosts, isolated)
            for host in hosts:
                host.ask({"cmd": "quiet"})
        if "shards" in parts:
            result["shards"] = measure_shards(args, hosts)
    finally:
        for host in hosts:
            host.stop()
    return result


class Phase:
    """What the hosts report of one phase (the steady window, the burst): reads, rpc_finds, event-loop lags."""

    def __init__(self) -> None:
        self.reads: dict[str, list[float]] = {"peers": [], "missions": [], "heads": []}
        self.failed = 0
        self.finds: list[tuple[float, bool]] = []
        self.lags: list[float] = []
        self.find_errors: Counter[str] = Counter()

    def gather(self, hosts: list[HostProcess]) -> Phase:
        for host in hosts:
            answer = host.ask({"cmd": "reads"})
            self.failed += answer["failed"]
            self.finds.extend((seconds, answered) for seconds, answered in answer["finds"])
            self.lags.extend(answer["lags"])
            self.find_errors.update(answer["find_errors"])
            for what in self.reads:
                self.reads[what] += answer["reads"][what]
        return self

    def latency(self) -> dict[str, dict[str, Any]]:
        return {what: {"p50_s": percentile(values, 0.5), "p99_s": percentile(values, 0.99), "reads": len(values)}
                for what, values in self.reads.items()}  # fmt: skip

    def breakdown(self) -> dict[str, Any]:
        """Where a read's time goes: the rpc_finds the reads and stores sent (a read sends one per node it visits;
        an unanswered one waited hivemind's ``wait_timeout``, and the read with it), and how late the host
        processes' event loops ran (a node's answers wait on its process)."""
        times, late = [t for t, _ in self.finds], [t for t, ok in self.finds if not ok]
        operations = sum(map(len, self.reads.values())) + self.failed
        return {
            "lookup_latency": self.latency(), "failed_reads": self.failed,
            "rpc_find": {"sent": len(self.finds), "unanswered": len(late), "unanswered_p50_s": percentile(late, 0.5),
                         "per_read_or_store": round(len(self.finds) / max(1, operations), 1),
                         "p50_s": percentile(times, 0.5), "p99_s": percentile(times, 0.99),
                         "errors": dict(self.find_errors.most_common(4))},
            "event_loop_lag": {"p50_s": percentile(self.lags, 0.5), "p99_s": percentile(self.lags, 0.99),
                               "max_s": max(self.lags, default=None)},
        }  # fmt: skip


def measure_dht(args: argparse.Namespace, hosts: list[HostProcess], isolated: bool) -> dict[str, Any]:
    time.sleep(2 * args.period)  # every node announced twice and read a few times
    Phase().gather(hosts)  # warm-up reads are not counted
    log(f"measuring {args.window:.0f} s of re-announcing")
    before, cpu_before, p2pd_before, started = loopback_bytes(), cpu_seconds(), cpu_seconds("p2pd"), time.monotonic()
    time.sleep(args.window)
    after, cpu, seconds = loopback_bytes(), cpu_seconds() - cpu_before, time.monotonic() - started
    p2pd_cpu = cpu_seconds("p2pd") - p2pd_before
    steady = Phase().gather(hosts)
    per_minute = None
    if isolated and before is not None and after is not None:
        per_minute = (after - before) / args.peers / (seconds / 60.0)
    log(f"a burst of {args.lookups} lookups of each key per node")
    burst_cpu, burst_started = cpu_seconds(), time.monotonic()
    for host in hosts:  # all hosts at once: ask each, then read each answer
        assert host.proc.stdin is not None
        host.proc.stdin.write(json.dumps({"cmd": "lookups", "count": args.lookups}) + "\n")
        host.proc.stdin.flush()
    for host in hosts:
        host.ask()
    burst_cpu, burst_s = cpu_seconds() - burst_cpu, time.monotonic() - burst_started
    burst = Phase().gather(hosts)
    both = Phase()
    for what in both.reads:
        both.reads[what] = steady.reads[what] + burst.reads[what]
    latency = both.latency()
    return {
        "peers": args.peers, "open_missions": args.missions, "period_s": args.period, "search_beam": args.beam,
        "lookup_latency": latency, "failed_reads": steady.failed + burst.failed,
        "bytes_per_peer_per_minute": None if per_minute is None else round(per_minute),
        "bytes_note": None if per_minute is not None else "no network namespace of its own: loopback is shared",
        # what one idle peer's DHT work costs (its node and its p2pd), and how busy that kept this machine: past
        # 1.0 the latencies measure the queue for the cores, not the DHT
        "cpu_s_per_peer_per_minute": round(cpu / args.peers / (seconds / 60.0), 3),
        "machine_busy": round(cpu / (os.cpu_count() or 1) / seconds, 3),
        "p2pd_share_of_cpu": round(p2pd_cpu / cpu, 3) if cpu > 0 else None,
        "lookup_p99_s": max((v["p99_s"] or 0.0) for v in latency.values()),
        "steady": steady.breakdown(),  # the measured window: idle peers re-announcing
        # the burst of lookups after it (the announcing goes on beside it): whether the machine had the cores for it
        "burst": {**burst.breakdown(), "seconds": round(burst_s, 1), "machine_busy": round(
            burst_cpu / (os.cpu_count() or 1) / burst_s, 3), "cpu_s": round(burst_cpu, 1)},
    }  # fmt: skip


def measure_shards(args: argparse.Namespace, hosts: list[HostProcess]) -> dict[str, Any]:
    mission_id = hosts[0].ask({"cmd": "missions"})["missions"][0]
    cpu_before, bytes_before = cpu_seconds(), loopback_bytes()
    started = time.time()
    command = {"cmd": "shake", "mission": mission_id, "shards": args.shards, "sample_s": args.sample_s,
               "deadline": started + args.shards_timeout}  # fmt: skip
    log(f"{args.peers} shakers, {args.shards} shards of {args.sample_s} s each ({args.shards_timeout:.0f} s at most)")
    for host in hosts:
        assert host.proc.stdin is not None
        host.proc.stdin.write(json.dumps(command) + "\n")
        host.proc.stdin.flush()
    answers = [host.ask() for host in hosts]
    finished = [f for answer in answers for f in answer["finished"]]
    failures = {what: sum(a["failures"][what] for a in answers) for what in answers[0]["failures"]}
    seconds = max((f["at"] for f in finished), default=time.time()) - started
    cpu, sent, measured_s = cpu_seconds() - cpu_before, loopback_bytes(), time.time() - started
    done = hosts[0].ask({"cmd": "board", "mission": mission_id, "shards": args.shards})["done"]
    attempts_per_shard = [len(done.get(str(i), [])) for i in range(args.shards)]
    ideal = args.shards * args.sample_s / args.peers
    per_shaker = Counter(f["shaker"] for f in finished)
    claims = [f["claim_s"] for f in finished]
    return {
        "shakers": args.peers, "shards": args.shards, "sample_s": args.sample_s,
        "finished_attempts": len(finished), "failed_claims": failures["claim"], "failed_done_records": failures["done"],
        "claims_lost_at_confirm": failures["lost_at_confirm"], "done_refused_lease_lost": failures["done_refused"],
        "duplicate_shards": sum(1 for n in attempts_per_shard if n > 1),
        "lost_shards": sum(1 for n in attempts_per_shard if n == 0),
        "seconds": round(seconds, 1), "ideal_s": round(ideal, 1),
        "shards_time_over_ideal": round(seconds / ideal, 3),
        # where the time beyond the ideal goes: each claim (read a segment, store, read back) is time not sampling,
        # and shards do not divide evenly (a shaker with one more shard than the mean ends sample_s later)
        "claim_s_mean": round(sum(claims) / max(len(claims), 1), 3),
        "claim_s_p90": round(percentile(claims, 0.9) or 0.0, 3),
        "shards_per_shaker_max": max(per_shaker.values(), default=0),
        "shards_per_shaker_min": min(per_shaker.values(), default=0) if len(per_shaker) == args.peers else 0,
        # what the protocol costs per shard finished, all peers together (the nodes, their p2pd): on separate
        # machines this is spread over the shakers; here it shares two cores, and machine_busy near 1 means
        # the cores, not the protocol's round trips, set the pace
        "cpu_s_per_shard": round(cpu / max(len(finished), 1), 3),
        "bytes_per_shard": round((sent - bytes_before) / max(len(finished), 1)) if sent and bytes_before else None,
        "machine_busy": round(cpu / (os.cpu_count() or 1) / measured_s, 3),
    }  # fmt: skip


def measure_round(args: argparse.Namespace) -> dict[str, Any]:
    """One round of each size in a child process (garden's patches apply to a whole process)."""
    argv = [sys.executable, __file__, "--round-child", "--round-params", str(args.round_params),
            "--round-small", str(args.round_small), "--round-large", str(args.round_large)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the averaging rounds failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def round_child(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import torch
    from hivemind.p2p import P2P

    from garden.collab import hivemind_patches
    from harness.trainers import average_round

    hivemind_patches.install()
    first = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    maddrs = await first.get_visible_maddrs()
    others = await asyncio.gather(*(P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
                                    for _ in range(args.round_large - 1)))  # fmt: skip
    p2ps = [first, *others]
    report: dict[str, Any] = {"params": args.round_params}
    try:
        for size in (args.round_small, args.round_large):
            tensors = [[torch.randn(args.round_params)] for _ in range(size)]
            await average_round(p2ps[:size], tensors, [1.0] * size, timeout=120.0)  # warm: connections, buffers
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            results = await average_round(p2ps[:size], tensors, [1.0] * size, timeout=120.0)
            seconds = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise RuntimeError(f"a round of {size} failed: {failed[0]!r}")
            expected = sum(t[0] for t in tensors) / size
            error = max(float((r[0] - expected).abs().max()) for r in results)  # type: ignore[index]
            cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime  # this process, not the p2pds
            report[str(size)] = {"seconds": round(seconds, 3), "max_error": error, "python_cpu_s": round(cpu_s, 3)}
        small, large = report[str(args.round_small)], report[str(args.round_large)]
        report["round_large_over_small"] = round(large["seconds"] / small["seconds"], 3)
        report["cpu_bound_ratio"] = round(args.round_large / args.round_small, 3)
        return report
    finally:
        for p2p in p2ps:
            await p2p.shutdown()


def inside(args: argparse.Namespace, isolated: bool) -> dict[str, Any]:
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {"isolated_network": isolated}
    if parts & {"dht", "shards"}:
        result.update(run_swarm(args, parts, isolated))
    if "round" in parts:
        log(f"averaging rounds of {args.round_params} parameters: {args.round_small} and {args.round_large} peers")
        result["round"] = measure_round(args)
    measured = {
        "lookup_p99_s": (result.get("dht") or {}).get("lookup_p99_s"),
        "duplicate_shards": (result.get("shards") or {}).get("duplicate_shards"),
        "lost_shards": (result.get("shards") or {}).get("lost_shards"),
        "shards_time_over_ideal": (result.get("shards") or {}).get("shards_time_over_ideal"),
        "round_large_over_small": (result.get("round") or {}).get("round_large_over_small"),
    }
    result["targets"] = TARGETS
    result["meets_targets"] = {name: (None if measured[name] is None else measured[name] <= limit)
                               for name, limit in TARGETS.items()}  # fmt: skip
    return result


def main() -> int:
    global quiet
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="dht,shards,round")
    parser.add_argument("--peers", type=int, default=50)
    parser.add_argument("--peers-per-process", type=int, default=10)
    parser.add_argument("--period", type=float, default=30.0, help="seconds between announces (garden's default)")
    parser.add_argument("--leads", type=int, default=10)
    parser.add_argument("--missions", type=int, default=100)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of re-announcing measured")
    parser.add_argument("--lookups", type=int, default=4, help="reads of each key per node in the burst")
    parser.add_argument("--shards", type=int, default=500)
    parser.add_argument("--sample-s", type=float, default=3.0)
    parser.add_argument("--shards-timeout", type=float, default=600.0, help="seconds the shakers work at most")
    parser.add_argument("--round-params", type=int, default=1_000_000)
    parser.add_argument("--round-small", type=int, default=4)
    parser.add_argument("--round-large", type=int, default=16)
    parser.add_argument("--beam", type=int, default=0,
                        help="nodes a read or a store searches for (default: the daemon's SEARCH_BEAM; hivemind's 20)")
    parser.add_argument("--json-only", action="store_true")
    parser.add_argument("--no-netns", action="store_true", help="stay in this network namespace (no byte figure)")
    # internal: a host process of nodes, the averaging child, the run inside the namespace
    parser.add_argument("--host", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", default="", help=argparse.SUPPRESS)
    parser.add_argument("--round-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet = args.json_only
    if args.host:
        if os.environ.get("SCALE_PROFILE"):
            import cProfile

            cProfile.runctx("asyncio.run(host_main(args))", globals(), {"args": args},
                            f"{os.environ['SCALE_PROFILE']}.{os.getpid()}")
            return 0
        asyncio.run(host_main(args))
        return 0
    if args.round_child:
        print(json.dumps(asyncio.run(round_child(args))))
        return 0
    if args.inside or args.no_netns:
        print(json.dumps(inside(args, isolated=args.inside), indent=2))
        return 0
    namespace = f"gscale{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", namespace], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        log(f"no network namespace ({made.stderr.strip()}): running without the byte figure")
        print(json.dumps(inside(args, isolated=False), indent=2))
        return 0
    try:
        subprocess.run(["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up"], check=True)
        argv = ["ip", "netns", "exec", namespace, sys.executable, __file__, "--inside", *sys.argv[1:]]
        return subprocess.run(argv, check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


if __name__ == "__main__":
    sys.exit(main())
