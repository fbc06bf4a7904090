"""The daemon's DHT node on a thread (``garden.net.dht_thread``), against real p2p daemons on 127.0.0.1: two nodes
store and read each other's records through hivemind's interface, a request can be awaited on another loop or
cancelled, a bad join address is a clear error that leaves no p2pd, and the node's p2pd is this process's own
child, in a process group of its own, stopped with the node."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import psutil
import pytest
from hivemind.utils import get_dht_time

from garden.net.dht_thread import SEARCH_BEAM, DHTFuture, ThreadDHT
from garden.net.swarm import Swarm, SwarmConfig

pytestmark = pytest.mark.swarm
LOCAL = "/ip4/127.0.0.1/tcp/0"


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_two_nodes_on_threads_share_records_and_each_stops_its_own_p2pd() -> None:
    first = ThreadDHT(host_maddrs=[LOCAL])
    first.start(timeout=60)
    second: ThreadDHT | None = None
    try:
        pid = first.p2pd_pid
        assert pid is not None and first.is_alive()
        p2pd = psutil.Process(pid)
        assert p2pd.name() == "p2pd" and p2pd.ppid() == os.getpid()
        assert os.getpgid(pid) == pid != os.getpgid(0)  # its own group: Ctrl+C reaches only the daemon
        second = ThreadDHT([str(m) for m in first.get_visible_maddrs()], host_maddrs=[LOCAL])
        second.start(timeout=60)
        expiration = get_dht_time() + 60
        assert first.store("garden-test/key", b"value", expiration, subkey="me") is True

        async def read() -> object:  # on another event loop, as the daemon's services read
            assert second is not None
            future = second.get("garden-test/key", latest=True, return_future=True)
            assert isinstance(future, DHTFuture)
            return await future

        found = asyncio.run(read())
        assert found is not None and found.value["me"].value == b"value"  # type: ignore[attr-defined]
        assert second.run_coroutine(lambda _, node: _peer(node)) == second.peer_id
    finally:
        if second is not None:
            second.shutdown()
        first.shutdown()
    assert not first.is_alive() and _gone(pid), "the node's p2pd outlived its shutdown"
    with pytest.raises(RuntimeError, match="not running"):
        first.get("garden-test/key")


async def _peer(node: object) -> object:
    return node.peer_id  # type: ignore[attr-defined]


@pytest.mark.serial  # 13 nodes start at once: beside another swarm test, they would starve its daemons
def test_a_read_and_a_store_search_the_beam_not_the_whole_bucket_and_a_read_still_sees_every_writer() -> None:
    """Every node a search visits answers with the key's whole value, and a latest read visits its whole beam:
    the daemon's node searches :data:`SEARCH_BEAM` (10) nodes, not hivemind's bucket of 20. In a swarm of 13, a
    read that knows every node visits the 10 nearest the key (hivemind's default: all 12 others), and it still
    gets the record of each of the 13 writers (each stored on the 5 nearest its writer found)."""
    from concurrent.futures import ThreadPoolExecutor

    first = ThreadDHT(host_maddrs=[LOCAL])
    first.start(timeout=60)
    join = [str(m) for m in first.get_visible_maddrs()]
    others = [ThreadDHT(join, host_maddrs=[LOCAL]) for _ in range(12)]
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda dht: dht.start(timeout=60), others))
        nodes = [first, *others]
        expiration = get_dht_time() + 120
        for i, dht in enumerate(nodes):
            assert dht.store("garden-test/many", i, expiration, subkey=f"writer{i}") is True
        reader = others[-1]
        sent: list[object] = []

        async def count_finds(_: object, node: object) -> None:
            protocol = node.protocol  # type: ignore[attr-defined]
            send = protocol.call_find

            async def counted(peer: object, keys: object) -> object:
                sent.append(peer)
                return await send(peer, keys)

            protocol.call_find = counted

        reader.run_coroutine(count_finds)
        assert reader.get("garden-test/many", latest=True) is not None  # the reader learns every node's address
        sent.clear()
        found = reader.get("garden-test/many", latest=True)
        assert found is not None and sorted(found.value) == sorted(f"writer{i}" for i in range(13))
        assert len(sent) <= SEARCH_BEAM + 1 < 12, f"a read visited {len(sent)} nodes"
        sent.clear()
        assert reader.store("garden-test/many", 99, expiration + 1, subkey="writer12") is True  # newer: taken
        assert len(sent) <= SEARCH_BEAM + 1, f"a store searched {len(sent)} nodes"
    finally:
        for dht in [*others, first]:
            dht.shutdown()


def test_a_request_given_up_by_its_caller_is_cancelled_on_the_node_and_the_node_goes_on() -> None:
    dht = ThreadDHT(host_maddrs=[LOCAL])
    dht.start(timeout=60)
    cancelled = asyncio.Event()  # set on the node's loop, only read after
    try:

        async def slow(_: object, __: object) -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def give_up() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(dht.run_coroutine(slow, return_future=True), timeout=0.2)

        asyncio.run(give_up())
        deadline = time.monotonic() + 5
        while not cancelled.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cancelled.is_set(), "the abandoned request still runs on the node"
        assert dht.store("garden-test/after", 1, get_dht_time() + 60) is True  # the node still answers
    finally:
        dht.shutdown()


def test_a_join_address_nobody_answers_fails_the_start_clearly_and_leaves_no_p2pd() -> None:
    before = {p.pid for p in psutil.Process().children() if p.name() == "p2pd"}
    nobody = "/ip4/127.0.0.1/tcp/9/p2p/QmR7cGZ7iGMmkk2BT473eGDDdtWW6i8x3QbyuNFxdbZ3Fd"
    dht = ThreadDHT([nobody], host_maddrs=[LOCAL])
    with pytest.raises(Exception, match="bootstrap|connect|dial"):
        dht.start(timeout=60)
    assert not dht.is_alive() and dht.error is not None
    left = [p for p in psutil.Process().children() if p.name() == "p2pd" and p.pid not in before]
    assert all(_gone(p.pid) for p in left), "a failed start left its p2pd running"


def test_a_swarm_whose_node_stops_or_whose_p2pd_dies_says_it_left_the_swarm(tmp_path: Path) -> None:
    """What the daemon checks every second (``Swarm.failure``): its DHT node's thread ending by itself (here its
    loop told to stop behind the swarm's back), or its p2pd killed."""
    for victim in ("node", "p2pd"):
        swarm = Swarm(SwarmConfig(initial_peers=[], host_maddrs=[LOCAL], announce_maddrs=[], client_mode=False,
                                  identity_path=str(tmp_path / f"{victim}.key"), dht_timeout=5.0))  # fmt: skip
        swarm.start()
        try:
            assert swarm.failure() is None
            dht = swarm.dht
            assert dht is not None and dht._loop is not None and dht._stop is not None
            (pid,) = swarm.child_pids()
            if victim == "node":
                dht._loop.call_soon_threadsafe(dht._stop.set)
                dht._thread.join(10)
                assert swarm.failure() == "the DHT node stopped (shut down)" and _gone(pid)
            else:
                psutil.Process(pid).kill()
                assert _gone(pid) and swarm.failure() == "the p2p daemon (p2pd) exited"
            assert asyncio.run(swarm.get("garden-test/key")) is None  # a failed request, counted, never raised
            assert sum(n for (op, _), n in swarm.stats.requests.items() if op == "get") == 1
        finally:
            swarm.shutdown()
