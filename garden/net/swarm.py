"""Swarm membership: the hivemind DHT node (on a thread of the daemon, ``garden.net.dht_thread``, with its
``p2pd``), and bounded, counted access to it from the daemon's event loop.

Every call to the DHT has a timeout (``dht_timeout``): a slow or partitioned swarm must make a
request fail, never hang the HTTP port. Failures are counted for ``/metrics`` and returned as
``None``/``False``, because a missing answer from a peer-to-peer network is normal, not exceptional.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Sequence

import psutil
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.timed_storage import ValueWithExpiration

from garden.net.dht_thread import ThreadDHT
from garden.net.reach import P2PPlan
from garden.net.relay_probe import RelayProbe, probe_relay, relay_address

logger = logging.getLogger(__name__)

DHT_STARTUP_TIMEOUT = 60.0
"""Seconds to wait for the DHT node to start and bootstrap (p2pd start ~1 s; pinging initial peers)."""
BOOTSTRAP_RETRIES = (2.0, 5.0)
"""Pauses (seconds) before starting again when ``p2pd`` reached none of the join peers: a restart right after the
peer's own stop (or its network coming up) has seen a join peer that answered another daemon a moment before
refuse this one's first dial. A join list that stays unreachable fails after the last."""
BOOTSTRAP_FAILURE = "failed to connect to bootstrap peers"  # what p2pd says
RELAY_P2PD_ENV = {"GOMAXPROCS": "1"}
"""The environment of a relaying peer's ``p2pd``. hivemind's p2pd registers two relay services, and the one that
registers last serves (``garden.net.relay_probe``): garden's, from a goroutine woken by the reachability event, or
libp2p's defaults, from the main goroutine right after. On one scheduler thread the woken goroutine runs only once
the main one blocks, after it: garden's limits served after 12 of 12 starts on an idle 2-core machine, and 11 of 12
with four busy loops beside it; with Go's default, one per core, after 1 of 12 and 8 of 15. One thread is ample for
a volunteer's p2p traffic."""
RELAY_STARTS = 5
"""Starts of ``p2pd`` a relaying peer tries until its relay serves with garden's limits (each start measured above:
11 of 12 at worst), after which it goes on with the defaults and says so."""


class SwarmError(RuntimeError):
    """The swarm could not be started or joined; the message says what to do."""


@dataclass
class SwarmConfig:
    """What the DHT needs from the settings (see ``garden.config`` for meanings and defaults)."""

    initial_peers: Sequence[str]
    host_maddrs: Sequence[str]
    announce_maddrs: Sequence[str]
    client_mode: bool
    identity_path: str
    dht_timeout: float
    record_validators: Sequence[RecordValidatorBase] = ()
    p2p: P2PPlan = field(default_factory=P2PPlan)  # reachability: relay service, relays, announced circuits
    check_relay: bool = False  # probe this peer's relay after each start, and start again while it has the defaults


@dataclass
class DHTStats:
    """DHT requests made by this daemon, by operation and outcome (``ok``, ``miss``, ``error``, ``timeout``)."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)


class Swarm:
    def __init__(self, config: SwarmConfig):
        self.config = config
        self.stats = DHTStats()
        self.dht: ThreadDHT | None = None
        self._p2p: Any = None
        self._p2p_lock: asyncio.Lock | None = None
        self.relay_probe: RelayProbe | None = None  # the last probe of this peer's relay (check_relay)
        self.starts = 0  # of the DHT and its p2pd, counting the starts again for the relay

    async def p2p(self) -> Any:
        """This process's handle on the DHT's ``p2pd`` (a replica made on first use, shared by the content
        transfer and the block servers): the services that need it are built before the event loop runs,
        and take it in their ``start``."""
        if self._p2p_lock is None:
            self._p2p_lock = asyncio.Lock()
        async with self._p2p_lock:
            if self._p2p is None:
                self._p2p = await self._require().replicate_p2p()
        return self._p2p

    async def close_p2p(self) -> None:
        """Close this process's replica (not the DHT's ``p2pd``, which :meth:`shutdown` stops)."""
        if self._p2p is not None:
            p2p, self._p2p = self._p2p, None
            await p2p.shutdown()

    def start(self) -> None:
        """Start the DHT node and join (or found) the swarm; with ``check_relay``, start again (up to
        :data:`RELAY_STARTS` in all) while this peer's relay serves with libp2p's default limits. Synchronous: call
        before the event loop starts (the relay probe runs its own loop)."""
        for maddr in self.config.initial_peers:
            _check_join_maddr(maddr)
        self._join()
        while self.config.check_relay and self._relay_has_defaults() and self.starts < RELAY_STARTS:
            assert self.relay_probe is not None
            probe = self.relay_probe
            logger.warning("this peer's relay serves with libp2p's default limits, not garden's (%s): starting the "
                           "p2p daemon again, %d of %d", probe.detail, self.starts + 1, RELAY_STARTS)  # fmt: skip
            self.shutdown()
            self._join()
        if self.config.check_relay and self.relay_probe is not None and self.relay_probe.verdict == "default":
            logger.warning("this peer's relay still serves with libp2p's default limits after %d starts: transfers "
                           "over 128 KiB between two peers that reach each other only through it are cut short "
                           "(docs/running-a-peer.md); restart the peer to try again", self.starts)  # fmt: skip

    def _relay_has_defaults(self) -> bool:
        """Probe this peer's relay (``garden.net.relay_probe``); True when libp2p's default limits serve."""
        address = relay_address(self.visible_maddrs(), self.config.host_maddrs, self.peer_id)
        if address is None:
            self.relay_probe = RelayProbe("unknown", 0, 0, 0.0, "no direct TCP address to probe")
        else:
            self.relay_probe = asyncio.run(probe_relay(address))
        logger.info("relay probe after start %d: %s, %d of %d bytes in %.1f s %s", self.starts,
                    self.relay_probe.verdict, self.relay_probe.received, self.relay_probe.size,
                    self.relay_probe.seconds, self.relay_probe.detail)  # fmt: skip
        return self.relay_probe.verdict == "default"

    def _join(self) -> None:
        self.starts += 1
        for pause in [*BOOTSTRAP_RETRIES, None]:
            try:
                self._start_dht()
                return
            except SwarmError as e:
                if pause is None or not self.config.initial_peers or BOOTSTRAP_FAILURE not in str(e):
                    raise
                logger.warning("reached none of the %d join peer address(es); starting again in %.0f s",
                               len(self.config.initial_peers), pause)  # fmt: skip
                time.sleep(pause)

    def _start_dht(self) -> None:
        try:
            plan = self.config.p2p
            announce = [*self.config.announce_maddrs, *plan.announce]
            self.dht = ThreadDHT(
                initial_peers=list(self.config.initial_peers) or None,
                host_maddrs=list(self.config.host_maddrs),
                announce_maddrs=announce or None,
                client_mode=self.config.client_mode or plan.client_mode,
                p2pd_flags=plan.flags,
                p2pd_env=RELAY_P2PD_ENV if self.config.check_relay else None,
                **plan.options,
                identity_path=self.config.identity_path,
                # the data-dir lock already keeps one identity to one daemon on this machine; the
                # network check spawns a second p2pd and adds seconds to every restart
                check_if_identity_free=False,
                record_validators=list(self.config.record_validators),
            )
            self.dht.start(timeout=DHT_STARTUP_TIMEOUT)
        except Exception as e:
            self.shutdown()
            hint = (
                " Check that the --join addresses are right and those peers are running."
                if self.config.initial_peers
                else ""
            )
            raise SwarmError(f"could not start the swarm: {e}.{hint}") from None

    @property
    def peer_id(self) -> str:
        return self._require().peer_id.to_base58()

    def visible_maddrs(self) -> list[str]:
        """The addresses this peer's p2pd shows others, or, while it shows none, those it was told to announce.

        A private peer's p2pd shows its addresses behind relays with public IPs only once a relay holds its slot
        (libp2p's autorelay drops the announced ones until then), and hivemind raises ``ValueError`` for a peer
        with none: right after the start, that was a crash of a home peer behind internet relays."""
        try:
            return [str(m) for m in self._require().get_visible_maddrs()]
        except ValueError as e:
            announced = [*self.config.announce_maddrs, *self.config.p2p.announce]
            logger.info("the p2p daemon shows no address yet (%s): using the %d announced", e, len(announced))
            return [f"{m}/p2p/{self.peer_id}" for m in announced]

    def child_pids(self) -> list[int]:
        """The DHT node's ``p2pd``, this process's child."""
        pid = self.dht.p2pd_pid if self.dht is not None else None
        return [pid] if pid is not None else []

    def failure(self) -> str | None:
        """Why this peer has lost the swarm (its DHT node or ``p2pd`` stopped), or None while both run.

        hivemind restarts neither, and the daemon's services hold clients of that p2pd, so the daemon stops
        and leaves the restart to its service manager.
        """
        if self.dht is None:
            return "the swarm is not started"
        if not self.dht.is_alive():
            return f"the DHT node stopped ({self.dht.error or 'shut down'})"
        pid = self.dht.p2pd_pid
        try:
            if pid is None or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return "the p2p daemon (p2pd) exited"
        except psutil.Error:
            return "the p2p daemon (p2pd) exited"
        return None

    async def get(self, key: str, latest: bool = False) -> ValueWithExpiration[Any] | None:
        return await self._call("get", lambda dht: dht.get(key, latest=latest, return_future=True))

    async def store(self, key: str, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        return bool(
            await self._call(
                "store", lambda dht: dht.store(key, value, expiration_time, subkey=subkey, return_future=True)
            )
        )

    async def _call(self, op: str, request: Callable[[ThreadDHT], Any]) -> Any:
        try:
            # sending the request can fail too (a stopped DHT node: RuntimeError)
            result = await asyncio.wait_for(request(self._require()), timeout=self.config.dht_timeout)
        except TimeoutError:
            self.stats.requests[op, "timeout"] += 1
            logger.warning("DHT %s timed out after %.1f s", op, self.config.dht_timeout)
            return None
        except Exception as e:
            self.stats.requests[op, "error"] += 1
            logger.warning("DHT %s failed: %s", op, e)
            return None
        self.stats.requests[op, "ok" if result else "miss"] += 1
        return result

    def _require(self) -> ThreadDHT:
        if self.dht is None:
            raise SwarmError("the swarm is not started")
        return self.dht

    def shutdown(self) -> None:
        """Stop the DHT node; it stops its ``p2pd`` on the way out."""
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None


def _check_join_maddr(maddr: str) -> None:
    try:
        parsed = Multiaddr(maddr)
    except Exception as e:
        raise SwarmError(f"--join {maddr!r} is not a multiaddr ({e})") from None
    if "p2p" not in parsed:
        raise SwarmError(
            f"--join {maddr!r} lacks the peer id: use the full address printed by the peer you join, "
            "ending in /p2p/<peer id>"
        )
