"""The reach check between two real p2p daemons on 127.0.0.1, a hostile asker's requests, and the plans."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgpack
import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from garden.config import GardenSettings
from garden.net.reach import (
    Reach,
    ReachResponder,
    RelayLimits,
    assess,
    check,
    decide,
    loopback_only,
    plan,
    protocol_name,
)
from garden.protocol.reach import ReachReply
from garden.protocol.records import decode_record

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


@asynccontextmanager
async def _pair() -> AsyncIterator[tuple[P2P, P2P, ReachResponder]]:
    """A public peer answering reach checks, and an asker joined to it; both daemons stopped afterwards."""
    server = await P2P.create(host_maddrs=LOCAL)
    responder = ReachResponder(server, Reach(reachability="public", relay_service=True), namespace="t")
    asker: P2P | None = None
    try:
        await responder.start()
        maddrs = [str(m) for m in await server.get_visible_maddrs()]
        asker = await P2P.create(initial_peers=maddrs, host_maddrs=LOCAL)
        yield server, asker, responder
    finally:
        await responder.close()
        if asker is not None:
            await asker.shutdown()
        await server.shutdown()


async def _ask(asker: P2P, server: P2P, metadata: bytes) -> ReachReply:
    response = await asker.call_protobuf_handler(
        server.peer_id, protocol_name("t"), runtime_pb2.ExpertRequest(metadata=metadata), runtime_pb2.ExpertResponse
    )
    return decode_record(ReachReply, response.metadata, "reply")


def test_a_peer_dials_the_asker_back_at_the_address_its_connection_came_from() -> None:
    async def main() -> None:
        async with _pair() as (server, asker, responder):
            join = [str(m) for m in await server.get_visible_maddrs()]
            reach = await check(asker, join, "t")
            assert reach.reachability == "public" and reach.observed == ["127.0.0.1"]
            assert reach.checked_by[server.peer_id.to_base58()].startswith("public; dialled back: ")
            assert responder.answered == 1

    asyncio.run(main())


def test_a_hostile_asker_gets_no_scan_of_others_and_no_flood() -> None:
    """The asker names only ports (never an address: the IP is its own connection's), a closed port is reported
    closed, garbage is refused, and asking again at once is refused without dialling anything."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: a dial there is refused

        async def main() -> None:
            async with _pair() as (server, asker, responder):
                reply = await _ask(asker, server, msgpack.packb({"ports": [port], "ip": "10.0.0.1"}))
                assert (reply.observed, reply.open, reply.error) == ("127.0.0.1", [], None)  # "ip" ignored
                assert (await _ask(asker, server, msgpack.packb({"ports": [port]}))).error == "too soon"
                responder._asked.clear()
                assert (await _ask(asker, server, b"\xc1garbage")).error == "bad request"
                responder._asked.clear()
                too_many = msgpack.packb({"ports": list(range(1000, 1010))})
                assert (await _ask(asker, server, too_many)).error == "bad request"
                responder._asked.clear()
                assert (await _ask(asker, server, b"x" * 5000)).error == "bad request"
                assert responder.answered == 1 and responder.refused == 4

        asyncio.run(main())


def test_the_plans_follow_the_reachability() -> None:
    limits = RelayLimits(max_circuits=3, max_reservations=5, data_limit=1 << 20, time_limit=60)
    public = plan(Reach(reachability="public"), limits)
    assert public.options == {"force_reachability": "public"} and public.flags["relayMaxCircuits"] == 3
    assert public.flags["relayTimeLimit"] == "60s" and not public.announce and not public.client_mode
    assert public.check_relay  # 1 MiB a connection: a probe can tell garden's limit from libp2p's 128 KiB
    assert not plan(Reach(reachability="public"), RelayLimits(data_limit=300_000)).check_relay  # it could not
    relay = "/ip4/10.99.1.1/tcp/4001/p2p/QmRelay"
    private = plan(Reach(reachability="private", relays=[relay]), limits)
    assert private.options["use_auto_relay"] and private.options["trusted_relays"] == [relay]
    assert private.flags == {"relayDiscovery": False} and private.announce == [relay + "/p2p-circuit"]
    assert plan(Reach(reachability="private"), limits).client_mode
    assert plan(Reach(), limits).options == {} and not plan(Reach(), limits).check_relay
    assert loopback_only(["/ip4/127.0.0.1/tcp/0"]) and not loopback_only(["/ip4/0.0.0.0/tcp/0"])
    assert not loopback_only([])


def test_the_owner_decides_and_a_swarm_on_this_machine_or_a_new_one_is_not_checked() -> None:
    assert asyncio.run(assess([], ["/ip4/0.0.0.0/tcp/0"], "t", "public")).relay_service
    assert asyncio.run(assess(["/ip4/127.0.0.1/tcp/1/p2p/QmX"], LOCAL, "t")).reachability == "public"  # loopback
    assert asyncio.run(assess([], ["/ip4/0.0.0.0/tcp/0"], "t")).reachability == "unknown"  # a new swarm
    client = asyncio.run(assess(["/ip4/127.0.0.1/tcp/1/p2p/QmX"], LOCAL, "t", client_mode=True))
    assert client.mode == "client" and "cannot serve" in client.note


def test_reachability_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="reached only through a relay"):
        GardenSettings(reachability="private")
    with pytest.raises(ValueError, match="not a relay's address"):
        GardenSettings(join=["/ip4/1.2.3.4/tcp/1/p2p/QmX"], relay=["http://example.com"])
    ok = GardenSettings(reachability="private", relay=["/ip4/10.0.0.1/tcp/4001/p2p/" + "Qm" + "a" * 44])
    assert ok.relay and ok.relay_data_limit == 1 << 30


def test_one_lying_join_peer_cannot_make_a_peer_behind_a_nat_give_up_its_relays() -> None:
    """A join peer that claims it dialled back (it did not) is outvoted by the honest ones; its claim to relay is
    only one relay among the others, and garbage answers were dropped before (``check``)."""
    relay = "/ip4/10.0.0.1/tcp/1/p2p/QmHonest" + "a" * 37
    other = "/ip4/10.0.0.2/tcp/1/p2p/QmHonest" + "b" * 37
    liar = "/ip4/10.0.0.3/tcp/1/p2p/QmLiar" + "c" * 39
    honest = ReachReply(observed="203.0.113.9", open=[], reachability="public")
    lie = ReachReply(observed="203.0.113.9", open=[4001], reachability="public")
    reach = decide([(relay, honest), (other, honest), (liar, lie)])
    assert reach.reachability == "private" and reach.relays == [relay, other, liar]
    assert reach.checked_by["QmLiar" + "c" * 39] == "public; dialled back: 4001"
    assert decide([(relay, honest), (liar, lie)]).reachability == "private"  # a tie keeps the relays
    assert decide([(relay, lie.model_copy(update={"reachability": "unknown"})), (liar, lie)]).public()
    assert decide([]).reachability == "unknown"
    assert decide([(relay, ReachReply(reachability="public"))]).reachability == "unknown"  # came via a relay
