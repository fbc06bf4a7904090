"""Nudges: a peer tells others "look now" (a new mission, a cancel), so that they read the DHT at once instead of at
their next period.

A nudge carries no data, only a topic name: the receiver reads what the topic names from the DHT, where every
record is signed and checked as always, so a nudge can make a peer look sooner, never believe anything. A
hostile peer that floods nudges gains one extra read per topic per :data:`MIN_INTERVAL` at most: a receiver acts
on the first nudge of a topic in that interval and answers the rest without acting. An unknown topic or an
oversized request is refused and counted. The sender picks at most :data:`MAX_TARGETS` peers at random from those
it knows, and waits :data:`SEND_TIMEOUT` for each, all at once: a nudge that is lost costs only the period's wait.

Why: peers read the missions' heads every few seconds (``garden.mission.book.REFRESH_PERIOD``); a second peer of
a new mission started that much after its lead, which was most of what two peers lost against one in
``benchmarks/swarm_shaking.py``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from garden.lifecycle import Service

logger = logging.getLogger(__name__)

MIN_INTERVAL = 1.0
"""Seconds during which a receiver acts on one nudge of a topic; the others in it are answered and ignored."""
MAX_TARGETS = 32
"""Peers one nudge goes to at most (random among those known): the rest learn at their next period."""
SEND_TIMEOUT = 2.0
"""Seconds the sender waits for each peer's answer."""
MAX_TOPIC = 32
"""Longest topic name, in bytes."""


def protocol_name(namespace: str) -> str:
    return f"{namespace}.nudge"


class Nudges(Service):
    """Sends nudges and acts on those that arrive, by topic (:meth:`on`).

    :param p2p_from: the swarm (its P2P replica is taken in :meth:`start`) or a hivemind P2P
    """

    name = "nudges"

    def __init__(self, p2p_from: Any, namespace: str = "garden") -> None:
        self._p2p_from, self.namespace = p2p_from, namespace
        self._p2p: P2P | None = p2p_from if isinstance(p2p_from, P2P) else None
        self._callbacks: dict[str, Callable[[], None]] = {}
        self._acted: dict[str, float] = {}
        self.acted = 0  # nudges that made this peer look
        self.ignored = 0  # nudges within MIN_INTERVAL of an acted one
        self.refused = 0  # unknown topics, oversized requests
        self.sent = 0  # peers that answered this peer's nudges

    def on(self, topic: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop; it must not block) when another peer nudges ``topic``."""
        if not 0 < len(topic.encode()) <= MAX_TOPIC:
            raise ValueError(f"a topic is 1 to {MAX_TOPIC} bytes, not {topic!r}")
        self._callbacks[topic] = callback

    async def start(self) -> None:
        if self._p2p is None:
            self._p2p = await self._p2p_from.p2p()
        await self._p2p.add_protobuf_handler(protocol_name(self.namespace), self._rpc_nudge, runtime_pb2.ExpertRequest)

    async def close(self) -> None:
        if self._p2p is not None:
            try:
                await self._p2p.remove_protobuf_handler(protocol_name(self.namespace))
            except Exception as e:  # the daemon may be gone already
                logger.debug("could not remove the nudge handler: %s", e)

    async def send(self, topic: str, peers: Iterable[str]) -> int:
        """Nudge up to :data:`MAX_TARGETS` of ``peers`` (ids; this peer is left out) about ``topic``; returns how
        many answered. Never raises: a nudge is a courtesy."""
        if self._p2p is None:
            return 0
        own = self._p2p.peer_id.to_base58()
        targets = [p for p in dict.fromkeys(peers) if p != own]
        targets = random.sample(targets, min(len(targets), MAX_TARGETS))
        answered = await asyncio.gather(*(self._send_one(peer, topic) for peer in targets))
        self.sent += sum(answered)
        return sum(answered)

    async def _send_one(self, peer: str, topic: str) -> bool:
        assert self._p2p is not None
        request = runtime_pb2.ExpertRequest(uid=topic)
        try:
            await asyncio.wait_for(
                self._p2p.call_protobuf_handler(
                    PeerID.from_base58(peer), protocol_name(self.namespace), request, runtime_pb2.ExpertResponse
                ),
                timeout=SEND_TIMEOUT,
            )
            return True
        except Exception as e:  # gone, unreachable, an older garden without the handler: it learns at its period
            logger.debug("could not nudge %s about %s: %s", peer, topic, e)
            return False

    async def _rpc_nudge(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        sender = context.remote_id.to_base58()
        topic = request.uid
        callback = self._callbacks.get(topic)
        if callback is None or request.tensors or request.metadata or len(topic.encode()) > MAX_TOPIC:
            self.refused += 1
            logger.info("refused a nudge from %s: topic %r, %d bytes of metadata", sender, topic[:MAX_TOPIC],
                        len(request.metadata))  # fmt: skip
            return runtime_pb2.ExpertResponse()
        now = time.monotonic()
        if now - self._acted.get(topic, -MIN_INTERVAL) < MIN_INTERVAL:
            self.ignored += 1
            return runtime_pb2.ExpertResponse()
        self._acted[topic] = now
        self.acted += 1
        logger.debug("nudged by %s about %s", sender, topic)
        callback()
        return runtime_pb2.ExpertResponse()
