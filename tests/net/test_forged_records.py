"""A hostile peer (a plain hivemind DHT, no garden validation) writes junk under `garden/peers`.

The garden daemons must keep listing exactly the real peers, log what they dropped, and stay up.
"""

from __future__ import annotations

import subprocess
import sys
import time

import hivemind
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.utils.timed_storage import get_dht_time

from garden.protocol import signing
from garden.protocol.keys import DHTKeys
from garden.protocol.records import PeerInfo, seal
from harness.daemons import DaemonFactory, wait_until

pytestmark = pytest.mark.swarm


def forger_record(key: rsa.RSAPrivateKey, **changes: object) -> PeerInfo:
    fields = dict(
        peer_id=signing.peer_id_of(signing.public_key_der(key)), version="9.9.9", roles=["server"], cores=64,
        ram_bytes=1 << 40, load=0.0, announced_at=get_dht_time(),
    )  # fmt: skip
    fields.update(changes)
    return PeerInfo(**fields)


async def store_huge_blob(_dht: hivemind.DHT, node: object) -> bool:
    """Runs inside the hostile DHT process: a 2 MB value would not fit through hivemind's own pipe."""
    return await node.store(DHTKeys().peers, b"\x00" * 2_000_000, get_dht_time() + 60, subkey="huge")


def test_forged_and_garbage_records_are_ignored(daemons: DaemonFactory) -> None:
    first = daemons.start()
    second = daemons.start("--join", first.join_addr)
    real = {first.peer_id, second.peer_id}
    wait_until(lambda: first.peer_ids() == real and second.peer_ids() == real, timeout=15, message="swarm formed")

    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    impostor_body = forger_record(forger, peer_id=first.peer_id).model_dump()
    junk: dict[object, object] = {
        "int": 42,
        "dict": {"peer_id": "QmFake", "cores": 8},
        "text": "hello",
        "not-msgpack": b"\xc1\xc1\xc1",
        "wrong-schema": seal(msgpack.packb({"peer_id": "x", "cores": "many"}), forger),
        # a genuine signature, but claiming to be the first peer: impersonation
        first.peer_id: seal(msgpack.packb(impostor_body), forger),
        # the forger's own id, validly signed, but announced three hours ago: stale
        forger_record(forger).peer_id: forger_record(forger, announced_at=get_dht_time() - 3 * 3600).to_wire(forger),
        12345: b"non-string subkey",
    }

    hostile = hivemind.DHT(initial_peers=[first.join_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        peers_key = DHTKeys().peers
        for subkey, value in junk.items():
            hostile.store(peers_key, value, get_dht_time() + 60, subkey=subkey)
        hostile.run_coroutine(store_huge_blob)
        time.sleep(2)  # several announce/read rounds of the garden peers
        refused = [
            float(line.split()[-1])
            for daemon in (first, second)
            for line in daemon.get("/metrics").text.splitlines()
            if line.startswith("garden_invalid_peer_records_total")
        ]
        assert sum(refused) >= len(junk), f"refusals not counted in /metrics: {refused}"
        for daemon in (first, second):
            for _ in range(3):
                assert daemon.peer_ids() == real
            assert daemon.get("/health").json() == {"status": "ok"}
            assert daemon.get("/status").json()["peers"] == 2
        # the hostile node itself holds the junk; the garden nodes refused it
        hostile_view = hostile.get(peers_key, latest=False)
        assert hostile_view is not None and len(hostile_view.value) >= len(junk)

        # a newer garden (protocol v2, a field this one does not know, another type for an old one) is
        # stored for the peers that speak it, ignored here with one log line, and the owner told to upgrade
        newer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        newer = forger_record(newer_key).model_dump() | {"v": 2, "cores": "sixty-four", "shiny": [1, 2]}
        hostile.store(peers_key, seal(msgpack.packb(newer), newer_key), get_dht_time() + 60, subkey=newer["peer_id"])
        status = wait_until(
            lambda: (lambda s: s if s["upgrade"] else None)(first.get("/status").json()), 15, 0.5, "upgrade advice"
        )
        assert status["incompatible_peers"] == 1 and "v2" in status["upgrade"] and "upgrade garden" in status["upgrade"]
        assert first.peer_ids() == real
        shown = subprocess.run(
            [sys.executable, "-m", "garden", "status", "--url", first.url], capture_output=True, text=True, timeout=60
        )
        assert shown.returncode == 0 and "upgrade" in shown.stdout and "protocol v2" in shown.stdout
        time.sleep(2)  # more reads: still one line
        assert first.stderr().count(f"ignoring peer {newer['peer_id']} speaks protocol v2") == 1
    finally:
        hostile.shutdown()

    logs = first.stderr() + second.stderr()
    assert "dropped an invalid peer record" in logs
    assert "bad signature" in logs or "signed by" in logs
    assert "Traceback" not in logs
