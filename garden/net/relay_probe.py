"""Whether this peer's relay serves with garden's limits: a probe of the relay from this machine (issue 18).

hivemind 1.1.12's ``p2pd`` starts two circuit-relay services on a public peer: the one configured with garden's
limits (``--relay-data-limit`` and friends, :class:`garden.net.reach.RelayLimits`), and a bare one with libp2p's
defaults, 128 KiB per relayed connection and direction, 2 minutes (``p2pd/main.go`` calls ``EnableRelayV2()``
beside the configured service). Both register the same hop protocol; whichever registers last serves every
circuit, decided by a race at start-up (docs/running-a-peer.md). When the default one wins, two home peers that
cannot reach each other directly cannot move a row set or a checkpoint: every relayed transfer over 128 KiB is
cut short.

The race is mostly settled before it starts: a relaying peer's ``p2pd`` runs on one scheduler thread
(``garden.net.swarm.RELAY_P2PD_ENV``), under which garden's service registers last. What is left of it is checked.
Nothing outside the daemon can tell which one won, so the peer asks its own relay: two throwaway p2p daemons on
this machine, one holding a slot on the relay as a home peer would (private, static relay, no hole punching, so
the bytes must cross the relay), the other dialling it through its relayed address and reading
:data:`PROBE_BYTES` (twice the default limit) from it. Whole: the configured service serves. Cut short: the default
one won, and the swarm starts its ``p2pd`` again, which re-rolls the race (``garden.net.swarm.Swarm.start``).
The probe costs two short-lived ``p2pd`` processes and about a second, once per start of a public peer that
relays for others (never on a loopback swarm, where nobody needs a relay).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hivemind.p2p import P2P

from garden.net import p2pd_patch

logger = logging.getLogger(__name__)

DEFAULT_RELAY_DATA_LIMIT = 1 << 17
"""libp2p's default relay data limit (``relay.DefaultLimit``: 128 KiB per relayed connection and direction)."""
PROBE_BYTES = 2 * DEFAULT_RELAY_DATA_LIMIT
"""What the probe reads through the relay: past the default limit with room for the stream's own framing."""
PROBE_TIMEOUT = 20.0
"""Seconds the whole probe may take (two daemons started, a slot reserved, the bytes read)."""
DIAL_RETRY = 1.0
"""Seconds between dials through the relay while the holder's slot is not there yet (libp2p backs off ~5 s)."""
START_TRIES = 3
"""Starts of the probe's relayed daemon: p2pd exits when it cannot reach its bootstrap peer (the relay), and a relay
busy for a moment (a probe just before, a loaded machine) does not mean it cannot relay."""
HANDLER = "garden.relay-probe"
CIRCUIT = "/p2p-circuit"
LISTEN = "/ip4/127.0.0.1/tcp/0"
"""The throwaway daemons listen on loopback only: nobody but the relay (which they dial) is meant to meet them."""

Verdict = Literal["configured", "default", "unknown"]


class GoMultiaddr:
    """A multiaddr for p2pd's control protocol: hivemind's Python ``Multiaddr`` writes a ``/p2p/`` value as a
    CIDv1 (0x01 0x72 + multihash), which the go-multiaddr in hivemind's p2pd refuses inside an address
    ("length greater than remaining number of bytes in buffer"): a relayed address has one in its middle."""

    def __init__(self, text: str):
        self.text = text

    def to_bytes(self) -> bytes:
        from hivemind.utils.multiaddr import Multiaddr

        raw = bytearray(Multiaddr(self.text).to_bytes())
        out, i = bytearray(), 0
        while i < len(raw):
            # /p2p/ (code 421, varint a5 03), a one-byte length, then a CIDv1 of a libp2p key (01 72 ...)
            if raw[i : i + 2] == b"\xa5\x03" and raw[i + 3 : i + 5] == b"\x01\x72":
                size = raw[i + 2]
                out += b"\xa5\x03" + bytes([size - 2]) + raw[i + 5 : i + 3 + size]
                i += 3 + size
            else:
                out.append(raw[i])
                i += 1
        return bytes(out)


@dataclass(frozen=True)
class RelayProbe:
    """What one probe of a relay found.

    :param verdict: ``configured`` (the bytes came through whole), ``default`` (the relayed stream opened and was
        cut short: libp2p's default limits serve), ``unknown`` (the probe could not tell: no slot, no relayed
        connection, a timeout)
    :param received: bytes read through the relay, of ``size``
    :param seconds: how long the probe took
    :param detail: what went wrong, for ``default`` and ``unknown``
    """

    verdict: Verdict
    received: int
    size: int
    seconds: float
    detail: str = ""


async def probe_relay(relay: str, size: int = PROBE_BYTES, timeout: float = PROBE_TIMEOUT) -> RelayProbe:
    """Read ``size`` bytes through the relay at ``relay`` (a multiaddr ending in ``/p2p/<its id>``) between two
    throwaway p2p daemons on this machine (see the module docstring). Never raises: a failure is ``unknown``."""
    began = time.monotonic()
    daemons: list[P2P] = []
    received, opened, stage = 0, False, "starting two p2p daemons"
    try:
        async with asyncio.timeout(timeout):
            # static relays only (libp2p's relay finder would wait for four candidates, or three minutes); no
            # AutoNAT nor hole punching: the bytes must go through the relay, never around it
            with p2pd_patch.extra_flags({"relayDiscovery": False}):
                for start in range(1, START_TRIES + 1):  # p2pd exits when its bootstrap dial fails: a busy relay
                    try:
                        holder = await P2P.create(
                            initial_peers=[relay], host_maddrs=[LISTEN], use_auto_relay=True, trusted_relays=[relay],
                            force_reachability="private", dht_mode="client", auto_nat=False, nat_port_map=False,
                        )  # fmt: skip
                        break
                    except Exception as e:
                        if "failed to connect to bootstrap peers" not in str(e) or start == START_TRIES:
                            raise
                        stage = f"starting two p2p daemons (the relay did not answer: {str(e)[-80:]})"
                        await asyncio.sleep(DIAL_RETRY)
                daemons.append(holder)
                reader_side = await P2P.create(host_maddrs=[LISTEN], dht_mode="client", auto_nat=False,
                                               nat_port_map=False)  # fmt: skip
                daemons.append(reader_side)
            await holder.add_binary_stream_handler(HANDLER, _writer_of(bytes(size)))
            stage = "dialling through the relay"
            while True:  # the holder's slot may not be there yet: NO_RESERVATION, then libp2p's dial backoff
                try:
                    await reader_side._client.connect(holder.peer_id, [GoMultiaddr(relay + CIRCUIT)])
                    break
                except Exception as e:
                    stage = f"dialling through the relay ({str(e)[-80:]})"
                    await asyncio.sleep(DIAL_RETRY)
            stage = "reading through the relay"
            _, reader, writer = await reader_side.call_binary_stream_handler(holder.peer_id, HANDLER)
            opened = True
            try:
                while received < size:
                    chunk = await reader.read(1 << 16)
                    if not chunk:
                        break
                    received += len(chunk)
            except (ConnectionError, asyncio.IncompleteReadError) as e:  # the relay reset the circuit
                stage = f"reading through the relay ({type(e).__name__})"
            finally:
                writer.close()
    except Exception as e:  # TimeoutError included: whatever failed, the probe says it could not tell
        why = str(e)[:200] or type(e).__name__
        return RelayProbe("unknown", received, size, time.monotonic() - began, f"{stage}: {why}")
    finally:
        for daemon in daemons:
            try:
                await daemon.shutdown()
            except Exception as e:  # a daemon that died on its own
                logger.debug("relay probe: could not stop a p2p daemon: %s", e)
    seconds = time.monotonic() - began
    if received >= size:
        return RelayProbe("configured", received, size, seconds)
    if opened:  # the relay carried the stream, then ended it early; under load its reset can outrun every byte
        return RelayProbe("default", received, size, seconds, f"cut short after {received} of {size} bytes")
    return RelayProbe("unknown", received, size, seconds, f"{stage}: nothing came through")


def _writer_of(payload: bytes) -> Any:
    async def write(_info: Any, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(payload)
            await writer.drain()
        except ConnectionError:  # the relay cut the circuit: the reading side tells
            pass
        finally:
            writer.close()

    return write


def relay_address(visible: Sequence[str], host_maddrs: Sequence[str], peer_id: str) -> str | None:
    """The address of this peer's relay that its probe dials from this machine: a loopback one it shows, else the
    interface and port it listens on (an announced address may be a router's, which few routers let the LAN dial
    back), else the first direct TCP address it shows."""
    suffix = f"/p2p/{peer_id}"
    direct = [m.split("/p2p/")[0] for m in visible if "/tcp/" in m and CIRCUIT not in m]
    for address in direct:
        if address.startswith("/ip4/127."):
            return address + suffix
    for maddr in host_maddrs:
        parts = maddr.split("/")
        if len(parts) >= 5 and parts[1] == "ip4" and parts[3] == "tcp" and parts[4] not in ("", "0"):
            ip = "127.0.0.1" if parts[2] == "0.0.0.0" else parts[2]
            return f"/ip4/{ip}/tcp/{parts[4]}{suffix}"
    return direct[0] + suffix if direct else None
