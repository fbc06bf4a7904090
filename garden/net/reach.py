"""Whether other peers can dial this one, and what the peer does about it (issue 18: reach).

Almost every home PC sits behind a NAT router: nobody can dial it. Such a peer can still take part, through a
*relay*: a publicly reachable peer holds a reservation for it (libp2p circuit relay v2), the home peer
announces its address behind that relay (``<relay>/p2p-circuit``), and others reach it through the relay. So
every peer first learns which kind it is:

1. **The check** (:func:`probe`, before the swarm starts). The peer starts a throwaway p2p daemon on the same
   listen addresses, connects to the peers it joins and asks each (``<swarm>.reach``, :class:`ReachResponder`)
   to open a plain TCP connection back to the IP its connection came from, on the ports it listens on. Most of
   the peers that saw its IP got through: *public*. Otherwise: *private* (:func:`decide`). No answer: *unknown* (a new
   swarm's first peer, or join peers that are down or too old to answer).
2. **The plan** (:func:`plan`). Public: the daemon forces libp2p's reachability to public, which starts its
   relay service, with the limits of ``--relay-*`` (circuits, reservations, bytes and time per circuit).
   Private: it reserves a slot on every join peer that said it is public (or on ``--relay`` addresses) and
   announces its addresses behind them; libp2p's DCUtR then tries to upgrade relayed connections to direct
   ones (hole punching, on with AutoNAT). Private with no relay: client mode, said in ``/status`` with what
   the peer cannot do (serve row sets, checkpoints, layers; take part in averaging as a server). Loopback
   swarms (every listen address on 127.0.0.0/8) skip the check: everyone there dials everyone.
   ``--reachability public|private`` skips it too: the owner knows (a server with a forwarded port, a peer
   that must never be dialled directly).

Why our own check rather than libp2p's AutoNAT alone: AutoNAT decides only after several peers that run its
service dialled back (minutes, in a small swarm; never with one bootstrap peer), and the relay finder waits for
it; a volunteer's peer should know in seconds, and a test world of four peers must behave like the internet.

What the answering side risks, and why it is safe: it dials only the IP the request *came from* (never an
address the asker names, so nobody can make peers scan a third party), at most :data:`MAX_REACH_PORTS` ports,
each connection closed at once, once per asker per :data:`COOLDOWN` seconds, a few checks at a time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from garden.lifecycle import Service
from garden.net.relay_probe import PROBE_BYTES, RelayProbe
from garden.protocol.reach import MAX_REACH_BYTES, Reachability, ReachReply, ReachRequest, RelayLimitsSeen
from garden.protocol.records import RecordError, decode_record

logger = logging.getLogger(__name__)

DIAL_TIMEOUT = 2.0
"""Seconds a dial back may take: a NAT drops the SYN silently, so a closed port shows only as a timeout."""
COOLDOWN = 10.0
"""Seconds before the same peer may ask again."""
MAX_CHECKS = 4
"""Checks answered at once; more are told ``busy``."""
PROBE_TIMEOUT = 15.0
"""Seconds the whole check may take before the swarm starts (the throwaway daemon, the questions)."""
CIRCUIT = "/p2p-circuit"


@dataclass(frozen=True)
class RelayLimits:
    """What a public peer's relay service gives others (p2pd's ``-relay*`` flags; libp2p's defaults are for
    a dedicated relay, a volunteer's is a guest). Sizes in bytes, time in seconds."""

    max_circuits: int = 16  # open relayed connections per peer
    max_reservations: int = 32  # peers holding a slot here
    data_limit: int = 1 << 30  # bytes relayed per connection, each way
    time_limit: float = 3600.0  # seconds one relayed connection may last

    def flags(self) -> dict[str, Any]:
        return {
            "relayMaxCircuits": self.max_circuits, "relayMaxReservations": self.max_reservations,
            "relayDataLimit": self.data_limit, "relayTimeLimit": f"{self.time_limit:g}s",
        }  # fmt: skip


@dataclass
class Reach:
    """What this peer knows of its reachability and how it takes part (``/status``'s ``network``).

    :param reachability: public (others can dial it), private (behind a NAT or firewall), unknown
    :param mode: direct (dialled at its own addresses), relayed (through ``relays``), client (dials out only)
    :param observed: the IPs the checking peers saw it come from
    :param relays: the relays it holds a slot on and announces addresses behind (private peers)
    :param relay_service: it relays for others (public peers)
    :param checked_by: peer id -> what each checking peer answered (its reachability, the ports that opened)
    :param note: in words, what follows (what a client-mode peer cannot do)
    :param relay_limits: a relaying peer's probe of its own relay (``garden.net.relay_probe``): ``garden`` (its
        limits serve), ``libp2p-default`` (128 KiB a relayed connection, after every start), ``unchecked``
    :param relay_check: that probe, in words
    """

    reachability: Reachability = "unknown"
    mode: str = "direct"
    observed: list[str] = field(default_factory=list)
    relays: list[str] = field(default_factory=list)
    relay_service: bool = False
    checked_by: dict[str, str] = field(default_factory=dict)
    note: str = ""
    relay_limits: RelayLimitsSeen = ""
    relay_check: str = ""

    def public(self) -> bool:
        return self.reachability == "public"

    def probed(self, probe: RelayProbe | None, starts: int) -> None:
        """Take what the probe of this peer's relay found after ``starts`` starts of its p2p daemon."""
        if not self.relay_service:
            return
        if probe is None:
            self.relay_limits, self.relay_check = "unchecked", "not probed (a loopback swarm, or a low data limit)"
            return
        seen: dict[str, RelayLimitsSeen] = {"configured": "garden", "default": "libp2p-default"}
        self.relay_limits = seen.get(probe.verdict, "unchecked")
        said = {
            "configured": f"{probe.size} bytes came through its relay whole",
            "default": f"{probe.size} bytes read through its relay: {probe.detail}",
        }.get(probe.verdict, f"the probe could not tell ({probe.detail})")
        self.relay_check = f"{said} (p2p daemon started {starts} time(s))"


@dataclass
class P2PPlan:
    """How the swarm's p2p daemon is started for a :class:`Reach` (``hivemind.P2P.create`` options, and the
    flags hivemind has no option for)."""

    options: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)
    announce: list[str] = field(default_factory=list)
    client_mode: bool = False
    check_relay: bool = False  # probe the relay after start (garden.net.relay_probe): it can tell the two limits apart


def plan(reach: Reach, limits: RelayLimits) -> P2PPlan:
    """The p2p daemon's settings for ``reach`` (see the module docstring)."""
    if reach.reachability == "public":
        # the probe reads PROBE_BYTES plus the stream's framing: below twice that, garden's own limit would cut it too
        return P2PPlan(options={"force_reachability": "public"}, flags=limits.flags(),
                       check_relay=limits.data_limit >= 2 * PROBE_BYTES)  # fmt: skip
    if reach.reachability == "private" and reach.relays:
        return P2PPlan(
            # libp2p's own DHT as a client: nobody dials a private peer for it, and a peer that dials others early
            # (its DHT's bootstrap) meets them through relays before it knows its public address, and libp2p
            # tries a hole punch once per relayed connection: then never (tests/net/test_hole_punch.py)
            options={"use_auto_relay": True, "trusted_relays": list(reach.relays), "force_reachability": "private",
                     "dht_mode": "client"},
            # static relays only: discovery would wait for four candidates, or three minutes, before reserving
            flags={"relayDiscovery": False},
            announce=[relay + CIRCUIT for relay in reach.relays],
        )
    if reach.reachability == "private":
        return P2PPlan(client_mode=True)
    return P2PPlan(flags=limits.flags())  # unknown: libp2p's AutoNAT decides, and the relay service follows it


def loopback_only(host_maddrs: Sequence[str]) -> bool:
    """Every listen address is on 127.0.0.0/8 or ::1: a swarm on one machine, where everyone dials everyone."""
    ips = [_ip_of(m) for m in host_maddrs]
    return bool(ips) and all(ip is not None and ip.is_loopback for ip in ips)


def _ip_of(maddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    parts = maddr.split("/")
    for proto, value in zip(parts[1::2], parts[2::2], strict=False):
        if proto in ("ip4", "ip6"):
            try:
                return ipaddress.ip_address(value)
            except ValueError:
                return None
    return None


def _tcp_port(maddr: str) -> int | None:
    parts = maddr.split("/")
    for proto, value in zip(parts[1::2], parts[2::2], strict=False):
        if proto == "tcp" and value.isdigit():
            return int(value)
    return None


def _peer_id_of(maddr: str) -> str | None:
    parts = maddr.split("/")
    ids = [value for proto, value in zip(parts[1::2], parts[2::2], strict=False) if proto == "p2p"]
    return ids[-1] if ids else None


def protocol_name(namespace: str) -> str:
    return f"{namespace}.reach"


class ReachResponder(Service):
    """Answers other peers' reach checks (see the module docstring for what it dials, and what never).

    :param p2p_from: the swarm (its P2P replica is taken in :meth:`start`) or a hivemind P2P
    :param reach: this peer's own reachability, told to askers (a public peer may relay for them)
    """

    name = "reach"

    def __init__(self, p2p_from: Any, reach: Reach, namespace: str = "garden") -> None:
        self._p2p_from, self.reach, self.namespace = p2p_from, reach, namespace
        self._p2p: P2P | None = p2p_from if isinstance(p2p_from, P2P) else None
        self._asked: dict[str, float] = {}
        self._checking = 0
        self.answered = 0
        self.refused = 0

    async def start(self) -> None:
        if self._p2p is None:
            self._p2p = await self._p2p_from.p2p()
        await self._p2p.add_protobuf_handler(protocol_name(self.namespace), self._rpc_reach, runtime_pb2.ExpertRequest)

    async def close(self) -> None:
        if self._p2p is not None:
            try:
                await self._p2p.remove_protobuf_handler(protocol_name(self.namespace))
            except Exception as e:  # the daemon may be gone already
                logger.debug("could not remove the reach handler: %s", e)

    async def _rpc_reach(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        asker = context.remote_id.to_base58()
        mine: Reachability = self.reach.reachability
        now = time.monotonic()
        if now - self._asked.get(asker, -COOLDOWN) < COOLDOWN:
            self.refused += 1
            return _reply(ReachReply(reachability=mine, error="too soon"))
        if self._checking >= MAX_CHECKS:
            self.refused += 1
            return _reply(ReachReply(reachability=mine, error="busy"))
        self._asked = {p: t for p, t in self._asked.items() if now - t < COOLDOWN}  # bounded by the cooldown
        self._asked[asker] = now
        try:
            if len(request.metadata) > MAX_REACH_BYTES:
                raise RecordError(f"{len(request.metadata)} bytes")
            asked = decode_record(ReachRequest, request.metadata, "reach request")
        except RecordError as e:
            self.refused += 1
            logger.info("malformed reach check from peer %s: %s", asker, e)
            return _reply(ReachReply(reachability=mine, error="bad request"))
        self._checking += 1
        try:
            ip = await self._observed_ip(context.remote_id)
            if ip is None:  # it came through a relay: its address is the relay's
                return _reply(ReachReply(reachability=mine))
            ports = list(dict.fromkeys(asked.ports))
            opened = await asyncio.gather(*(_dials(ip, port) for port in ports))
            self.answered += 1
            return _reply(ReachReply(observed=ip, open=[p for p, ok in zip(ports, opened, strict=True) if ok],
                                     reachability=mine))  # fmt: skip
        finally:
            self._checking -= 1

    async def _observed_ip(self, peer: PeerID) -> str | None:
        """The IP of the asker's direct connection to this peer, as the connection arrived (never a claim)."""
        assert self._p2p is not None
        for info in await self._p2p.list_peers():
            if info.peer_id != peer:
                continue
            for addr in map(str, info.addrs):
                ip = _ip_of(addr)
                if CIRCUIT not in addr and ip is not None:
                    return str(ip)
        return None


async def _dials(ip: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout=DIAL_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


def _reply(reply: ReachReply) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=msgpack.packb(reply.model_dump(mode="python"), use_bin_type=True))


async def check(p2p: P2P, join: Sequence[str], namespace: str, timeout: float = DIAL_TIMEOUT + 3.0) -> Reach:
    """Ask every join peer to dial ``p2p``'s listen ports back; what they answered, decided (module docstring)."""
    ports = sorted({port for m in await p2p.get_visible_maddrs() if (port := _tcp_port(str(m))) is not None})
    request = runtime_pb2.ExpertRequest(metadata=msgpack.packb({"ports": ports[:4]}, use_bin_type=True))

    async def ask(maddr: str) -> tuple[str, ReachReply | None]:
        peer = _peer_id_of(maddr)
        if peer is None:
            return maddr, None
        try:
            response = await asyncio.wait_for(
                p2p.call_protobuf_handler(PeerID.from_base58(peer), protocol_name(namespace), request,
                                          runtime_pb2.ExpertResponse),
                timeout=timeout,
            )  # fmt: skip
            if len(response.metadata) > MAX_REACH_BYTES:
                raise RecordError(f"{len(response.metadata)} bytes")
            return maddr, decode_record(ReachReply, response.metadata, "reach reply")
        except Exception as e:  # an old peer without the check, a dead one, a liar's garbage: no answer
            logger.info("reach check by %s: no answer (%s)", peer, str(e)[:200] or type(e).__name__)
            return maddr, None

    first = {}  # one question per peer (an invite lists two addresses of some): the first address it is known by
    for maddr in join:
        first.setdefault(_peer_id_of(maddr), maddr)
    asked = [m for peer, m in first.items() if peer is not None]
    answers = [(m, r) for m, r in await asyncio.gather(*(ask(m) for m in asked)) if r is not None and not r.error]
    return decide(answers)


def decide(answers: Sequence[tuple[str, ReachReply]]) -> Reach:
    """What the join peers' answers (``(address asked, reply)``) say. Public only when most of the peers that saw
    this one's IP also dialled it back: one liar cannot make a peer behind a NAT give up its relays (a public
    peer judged private is still reached, through relays; a private one judged public is reached by nobody)."""
    reach = Reach()
    for maddr, reply in answers:
        reach.checked_by[_peer_id_of(maddr) or maddr] = (
            f"{reply.reachability}; dialled back: {', '.join(map(str, reply.open)) or 'nothing'}"
        )
        if reply.observed and reply.observed not in reach.observed:
            reach.observed.append(reply.observed)
    seen = [r for _, r in answers if r.observed]
    if seen and 2 * sum(1 for r in seen if r.open) > len(seen):
        reach.reachability = "public"
    elif seen:
        reach.reachability = "private"
        reach.relays = [m for m, r in answers if r.reachability == "public"]
    return reach


async def probe(join: Sequence[str], host_maddrs: Sequence[str], namespace: str, attempts: int = 2) -> Reach:
    """:func:`check` from a throwaway p2p daemon on ``host_maddrs`` (the swarm's own starts after it), tried
    ``attempts`` times. Any failure is an unknown reachability, never an error: the peer then starts as it would
    have without the check."""
    reach = Reach()
    for _ in range(attempts):
        reach = await _probe_once(join, host_maddrs, namespace)
        if not reach.note:  # no failure
            break
    return reach


async def _probe_once(join: Sequence[str], host_maddrs: Sequence[str], namespace: str) -> Reach:
    p2p: P2P | None = None
    began, stage = time.monotonic(), "starting a p2p daemon"
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            p2p = await P2P.create(initial_peers=list(join), host_maddrs=list(host_maddrs), dht_mode="client")
            stage = "asking the join peers"
            reach = await check(p2p, join, namespace)
        logger.info("reach check: %s, asked %d peer(s) in %.1f s", reach.reachability, len(reach.checked_by) or 0,
                    time.monotonic() - began)  # fmt: skip
        return reach
    except Exception as e:
        why = str(e)[:200] or type(e).__name__
        logger.warning("could not check whether other peers can dial this one (%s, %s after %.1f s): "
                       "reachability unknown", why, stage, time.monotonic() - began)  # fmt: skip
        return Reach(note=f"the reach check failed while {stage}: {why}")
    finally:
        if p2p is not None:
            await p2p.shutdown()


CLIENT_NOTE = (
    "dials out only: it cannot serve row sets, checkpoints or layers to others, and averages as a client"
)


async def assess(
    join: Sequence[str],
    host_maddrs: Sequence[str],
    namespace: str,
    reachability: str = "auto",
    relays: Sequence[str] = (),
    client_mode: bool = False,
) -> Reach:
    """This peer's :class:`Reach` before its swarm starts: the owner's choice (``--reachability``,
    ``--client-mode``), or the check (module docstring). A private peer's relays are ``relays`` and the join
    peers that said they are public; with none, it dials out only."""
    if client_mode:
        return Reach(mode="client", note=f"--client-mode: {CLIENT_NOTE}")
    if reachability == "public":
        return Reach(reachability="public", relay_service=True, note="--reachability public")
    if reachability == "auto" and loopback_only(host_maddrs):
        return Reach(reachability="public", relay_service=True, note="every listen address is on this machine")
    if not join:
        return Reach(note="no peer to ask yet (a new swarm): libp2p's AutoNAT decides")
    reach = await probe(join, host_maddrs, namespace)
    if reachability == "private":
        reach.reachability, reach.note = "private", "--reachability private"
    if reach.reachability == "public":
        reach.relay_service = True
    if reach.reachability != "private":
        return reach
    reach.relays = list(dict.fromkeys([*relays, *reach.relays]))
    if reach.relays:
        reach.mode = "relayed"
        reach.note = reach.note or f"behind a NAT or firewall: reached through {len(reach.relays)} relay(s)"
    else:
        reach.mode = "client"
        reach.note = f"behind a NAT or firewall, and no peer it joined offers a relay: it {CLIENT_NOTE}"
    return reach
