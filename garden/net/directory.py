"""The swarm's phone book: this peer announces its signed ``PeerInfo`` under ``<swarm>/peers`` every
``announce_period`` seconds (expiring after 2x, so a peer that vanishes drops out on its own), and
reads everyone else's. On a clean stop it announces ``state="offline"`` so that others drop it at
once instead of waiting for the expiry.
"""

from __future__ import annotations

import asyncio
import time
import logging
from dataclasses import dataclass
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils.timed_storage import get_dht_time

from garden.lifecycle import Service
from garden.net.swarm import Swarm
from garden.protocol.keys import DHTKeys
from garden.protocol.records import PROTOCOL_VERSION, IncompatibleVersionError, PeerInfo, PeerState, RecordError

logger = logging.getLogger(__name__)

GOODBYE_TIMEOUT = 3.0
"""Seconds a clean stop waits for the ``offline`` record to be stored; the record expires anyway."""
MAX_DEPARTED = 4096
"""Departed peers remembered (the oldest forgotten first): a swarm's churn, bounded."""


@dataclass(frozen=True)
class PeerEntry:
    info: PeerInfo
    expiration_time: float  # DHT time at which the record expires unless re-announced

    @property
    def last_seen(self) -> float:
        return self.info.announced_at


@dataclass(frozen=True)
class DirectorySnapshot:
    """What ``/status`` and ``/metrics`` show of the swarm's phone book, as of the last read.

    :param peers_seen: peers in the last read, this one included
    :param joined: this peer's record is in the DHT
    :param incompatible_peers: peers ignored because they speak another protocol version
    :param upgrade_advice: what to tell the owner when some of those are newer, else None
    :param invalid_records: peer records dropped when reading (unsigned, forged, malformed)
    """

    peers_seen: int
    joined: bool
    incompatible_peers: int
    upgrade_advice: str | None
    invalid_records: int


MAX_BOOTSTRAP = 8
"""Peers remembered as bootstrap addresses (and put in an invite): enough that some are up after days away."""


def dialable(addresses: list[str], peer_id: str) -> list[str]:
    """A peer's own direct addresses (ending in its id, no relay), loopback ones only when it has no other."""
    usable = [a for a in addresses if a.endswith(f"/p2p/{peer_id}") and "/p2p-circuit" not in a]
    outside = [a for a in usable if not a.startswith(("/ip4/127.", "/ip6/::1/"))]
    return outside or usable


def bootstrap_peers(
    entries: list[PeerEntry], self_id: str, limit: int = MAX_BOOTSTRAP, first_seen: dict[str, float] | None = None
) -> list[str]:
    """Addresses to join this swarm through, from the peers seen: public ones first (others dial them), then
    those of unknown reachability; never a client-mode peer (nobody dials it), a private one (only while its
    relay lasts) or this one; loopback addresses only when a peer has no other (a swarm on one machine). Among
    equals, the peer this one has known longest (``first_seen``, else its record's time) comes first: identities
    cost nothing, and a crowd of new ones must not push the swarm's old peers out of what a restart dials."""
    rank = {"public": 0, "unknown": 1}
    known = first_seen or {}
    found: list[str] = []
    for entry in sorted(entries, key=lambda e: (rank.get(e.info.reachability, 2),
                                                 known.get(e.info.peer_id, e.last_seen))):  # fmt: skip
        info = entry.info
        if info.peer_id == self_id or info.client_mode or info.reachability not in rank:
            continue
        found.extend(dialable(info.addresses, info.peer_id)[:2])
        if len(found) >= limit:
            break
    return found[:limit]


def remembered_peers(found: list[str], before: list[str], limit: int = MAX_BOOTSTRAP) -> list[str]:
    """The bootstrap addresses to remember after a read that ``found`` these (:func:`bootstrap_peers`): those
    first, then the ones remembered ``before`` that it missed, up to ``limit``. A DHT read can come back partial
    (through a relay, on a slow link): one that missed a peer must not make a restart forget it."""
    return list(dict.fromkeys([*found, *before]))[:limit]


class PeerDirectory(Service):
    """:param make_record: builds this peer's current record (load and roles change over time)
    :param period: seconds between announces; the record's TTL is twice that
    :param remember: called (in a thread) with :func:`bootstrap_peers` whenever they change, so that a restart
        rejoins through them even when the peer it first joined through is gone"""

    name = "directory"

    def __init__(
        self,
        swarm: Swarm,
        keys: DHTKeys,
        private_key: rsa.RSAPrivateKey,
        make_record: Callable[[PeerState], PeerInfo],
        period: float,
        remember: Callable[[list[str]], None] | None = None,
    ):
        self.swarm, self.keys, self._private_key = swarm, keys, private_key
        self.peer_id = swarm.peer_id
        self._make_record = make_record
        self.period = period
        self.invalid_records = 0
        self.last_announced: PeerInfo | None = None  # this peer's latest record stored in the DHT
        self.known: list[PeerEntry] = []
        self.incompatible: dict[str, int] = {}  # peer id -> protocol version, of peers ignored for it (last read)
        self._warned: set[tuple[str, int]] = set()
        self._remember, self._remembered = remember, list[str]()
        self.first_seen: dict[str, float] = {}  # peer id -> when this peer first read its record (this run)
        self._expires: dict[str, float] = {}  # peer id -> DHT expiration of its latest online record read here
        self.departed: dict[str, float] = {}  # peer id -> DHT time this peer saw it leave (see read)

    @property
    def joined(self) -> bool:
        return self.last_announced is not None

    async def announce(self, state: PeerState = "online") -> bool:
        record = self._make_record(state)
        ok = await self.swarm.store(
            self.keys.peers,
            record.to_wire(self._private_key),
            expiration_time=record.announced_at + 2 * self.period,
            subkey=record.peer_id,
        )
        if ok:
            self.last_announced = record
        else:
            logger.warning("could not announce this peer in the DHT (will retry in %.0f s)", self.period)
        return ok

    async def read(self) -> list[PeerEntry]:
        """Valid, online, unexpired records, sorted by peer id. Invalid ones are logged and counted."""
        found = await self.swarm.get(self.keys.peers, latest=True)
        entries: list[PeerEntry] = []
        incompatible: dict[str, int] = {}
        offline: list[str] = []
        answered = False
        if found is not None:
            if not isinstance(found.value, (dict, DictionaryDHTValue)):
                self._drop("<whole key>", f"value is a {type(found.value).__name__}, not a dictionary")
            else:
                answered = True
                now = get_dht_time()
                for subkey, item in found.value.items():
                    try:
                        raw, expiration_time = item
                        info = PeerInfo.from_wire(raw, subkey)
                        info.check_fresh(expiration_time, now)
                    except IncompatibleVersionError as e:
                        if (e.peer_id, e.version) not in self._warned:  # one line per peer, not per read
                            self._warned.add((e.peer_id, e.version))
                            logger.warning("ignoring %s", e)
                        incompatible[e.peer_id] = e.version
                        continue
                    except (RecordError, TypeError, ValueError) as e:
                        self._drop(subkey, str(e))
                        continue
                    if info.state == "online" and expiration_time > now:
                        entries.append(PeerEntry(info, expiration_time))
                    elif info.state == "offline":
                        offline.append(info.peer_id)
        mine = self.last_announced
        if mine is not None and mine.state == "online" and not any(e.info.peer_id == self.peer_id for e in entries):
            # this peer is alive whatever the DHT answered (e.g. a read that timed out)
            entries.append(PeerEntry(mine, mine.announced_at + 2 * self.period))
        self.known = sorted(entries, key=lambda e: e.info.peer_id)
        if answered:
            self._note_departures(offline)
        now = time.time()
        self.first_seen = {e.info.peer_id: self.first_seen.get(e.info.peer_id, now) for e in self.known}
        self.incompatible = incompatible
        await self._remember_peers()
        return self.known

    async def _remember_peers(self) -> None:
        """Hand :func:`remembered_peers` to ``remember`` when they changed: at every read (the loop's, and one
        for ``GET /peers``), so that a peer seen is remembered at once, not a period later (a restart in between
        rejoined without it)."""
        found = bootstrap_peers(self.known, self.peer_id, first_seen=self.first_seen)
        peers = remembered_peers(found, self._remembered)
        if self._remember is None or not peers or peers == self._remembered:
            return
        try:
            await asyncio.to_thread(self._remember, peers)
            self._remembered = peers
        except Exception as e:  # a full disk: remembered at the next read
            logger.warning("could not remember the swarm's bootstrap peers: %s", e)

    def _note_departures(self, offline: list[str]) -> None:
        """After a read the DHT answered: a peer left when its record says ``offline`` (a clean stop), or when the
        record this peer last read of it has expired and no newer one came (killed, or cut off: it re-announces
        every ``period`` and its records last twice that). A read that found nothing proves nothing (a timeout
        reads as an empty swarm), so only answered reads count."""
        now = get_dht_time()
        online = {e.info.peer_id: e.expiration_time for e in self.known}
        left = [p for p, expires in self._expires.items() if p not in online and expires <= now]
        for peer_id in [*offline, *left]:
            if peer_id != self.peer_id and peer_id not in online:
                self.departed.setdefault(peer_id, now)
        self._expires = {p: e for p, e in self._expires.items() if p not in online and p not in self.departed}
        self._expires.update(online)
        for peer_id in online:
            self.departed.pop(peer_id, None)  # back
        for peer_id in sorted(self.departed, key=self.departed.__getitem__)[:-MAX_DEPARTED]:
            del self.departed[peer_id]

    def gone(self) -> frozenset[str]:
        """Peers seen leaving (see :meth:`_note_departures`) and not back since: their shard leases hold nothing
        (``garden.mission.leases``)."""
        return frozenset(self.departed)

    def snapshot(self) -> DirectorySnapshot:
        return DirectorySnapshot(
            peers_seen=len(self.known), joined=self.joined, incompatible_peers=len(self.incompatible),
            upgrade_advice=self.upgrade_advice, invalid_records=self.invalid_records,
        )  # fmt: skip

    @property
    def upgrade_advice(self) -> str | None:
        """What ``garden status`` tells the owner when peers speak a newer protocol, or None."""
        newer = sorted({v for v in self.incompatible.values() if v > PROTOCOL_VERSION})
        if not newer:
            return None
        count = sum(1 for v in self.incompatible.values() if v > PROTOCOL_VERSION)
        return (
            f"{count} peer(s) speak protocol v{newer[-1]}, newer than this garden's v{PROTOCOL_VERSION}, and are "
            "ignored: upgrade garden (pip install -U communal-garden) to work with them"
        )

    def _drop(self, subkey: object, reason: str) -> None:
        self.invalid_records += 1
        logger.info("ignored an invalid peer record under %r: %s", str(subkey)[:80], reason)

    async def run(self, stop: asyncio.Event) -> None:
        """Announce and refresh until ``stop`` is set."""
        while not stop.is_set():
            await self.announce()
            await self.read()
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.period)
            except TimeoutError:
                pass

    async def say_goodbye(self) -> None:
        await self.announce(state="offline")

    async def close(self) -> None:
        """Leave politely: an ``offline`` record, if this peer ever announced and its DHT still runs (the record
        expires anyway, so a goodbye that takes too long is given up)."""
        if not self.joined or self.swarm.failure() is not None:
            return
        try:
            await asyncio.wait_for(self.say_goodbye(), timeout=GOODBYE_TIMEOUT)
        except TimeoutError:
            logger.info("goodbye record not stored in time; it will expire on its own")
