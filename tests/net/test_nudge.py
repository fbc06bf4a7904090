"""Nudges between real p2p daemons on 127.0.0.1: one acted on, a hostile peer's flood and garbage, a dead target."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from garden.net import nudge
from garden.net.nudge import Nudges, protocol_name

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


@asynccontextmanager
async def _pair() -> AsyncIterator[tuple[Nudges, Nudges, list[str]]]:
    """Two peers, each with its nudges; the receiver's "missions" nudges land in the list. Stopped afterwards."""
    receiver_p2p = await P2P.create(host_maddrs=LOCAL)
    sender_p2p: P2P | None = None
    looked: list[str] = []
    receiver = Nudges(receiver_p2p, namespace="t")
    receiver.on("missions", lambda: looked.append("missions"))
    try:
        await receiver.start()
        maddrs = [str(m) for m in await receiver_p2p.get_visible_maddrs()]
        sender_p2p = await P2P.create(initial_peers=maddrs, host_maddrs=LOCAL)
        sender = Nudges(sender_p2p, namespace="t")
        await sender.start()
        try:
            yield sender, receiver, looked
        finally:
            await sender.close()
    finally:
        await receiver.close()
        if sender_p2p is not None:
            await sender_p2p.shutdown()
        await receiver_p2p.shutdown()


def _id(nudges: Nudges) -> str:
    assert nudges._p2p is not None
    return nudges._p2p.peer_id.to_base58()


def test_a_nudge_makes_the_peer_look_once_and_a_flood_no_more_often_than_the_interval() -> None:
    async def main() -> None:
        async with _pair() as (sender, receiver, looked):
            # the sender's own id is left out, a repeated one nudged once
            assert await sender.send("missions", [_id(receiver), _id(receiver), _id(sender)]) == 1
            assert looked == ["missions"] and receiver.acted == 1 and sender.sent == 1
            # a hostile peer floods: every call is answered, one in the interval is acted on
            answered = await asyncio.gather(*(sender.send("missions", [_id(receiver)]) for _ in range(20)))
            assert sum(answered) == 20
            assert looked == ["missions"] and receiver.ignored == 20
            await asyncio.sleep(nudge.MIN_INTERVAL)
            assert await sender.send("missions", [_id(receiver)]) == 1
            assert looked == ["missions", "missions"] and receiver.acted == 2

    asyncio.run(main())


def test_a_hostile_peers_unknown_topics_and_payloads_are_refused_and_nothing_happens() -> None:
    async def main() -> None:
        async with _pair() as (sender, receiver, looked):
            assert sender._p2p is not None and receiver._p2p is not None
            bad = [
                runtime_pb2.ExpertRequest(uid="shards"),  # a topic this peer does not act on
                runtime_pb2.ExpertRequest(uid="missions", metadata=b"x" * 4096),  # a nudge carries no data
                runtime_pb2.ExpertRequest(uid="m" * 4096),
                runtime_pb2.ExpertRequest(),
            ]
            for request in bad:
                await sender._p2p.call_protobuf_handler(
                    receiver._p2p.peer_id, protocol_name("t"), request, runtime_pb2.ExpertResponse
                )
            assert receiver.refused == len(bad) and receiver.acted == 0 and looked == []
            assert await sender.send("missions", [_id(receiver)]) == 1  # still answering
            assert looked == ["missions"]

    asyncio.run(main())


def test_nudging_a_peer_that_is_gone_returns_within_the_timeout() -> None:
    async def main() -> None:
        async with _pair() as (sender, receiver, looked):
            gone = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"  # a valid id nobody runs
            started = asyncio.get_running_loop().time()
            assert await sender.send("missions", [gone, _id(receiver)]) == 1  # the live one still told
            assert asyncio.get_running_loop().time() - started < nudge.SEND_TIMEOUT + 5.0  # not the p2p's own
            assert looked == ["missions"]

    asyncio.run(main())


def test_a_topic_is_a_short_name() -> None:
    for bad in ("", "x" * (nudge.MAX_TOPIC + 1)):
        with pytest.raises(ValueError, match="a topic is 1 to 32 bytes"):
            Nudges(None).on(bad, lambda: None)
