"""The mission index is read whole only when a lead's head says it changed, against real daemons and a hostile
lead (a plain hivemind DHT with a key of its own): an idle peer reads a few hundred bytes a refresh, a new mission
still reaches it within one, and neither a forged head nor a lead that keeps changing its own makes it read more
than once a refresh. And a holder renews a mission's record every few minutes, not every period."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import hivemind
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.utils.timed_storage import get_dht_time

from garden.data import demo_prompts
from garden.mission import book as book_module
from garden.mission.book import MISSION_RENEW_PERIOD, MissionBook
from garden.net.identity import load_or_create_identity
from garden.net.swarm import Swarm, SwarmConfig
from garden.net.transfer import ContentTransfer
from garden.protocol import signing
from garden.protocol.keys import DHTKeys
from garden.protocol.mission import MissionDraft, MissionSpec, cancel_subkey, sign_index_head
from garden.store import Store
from harness.daemons import Daemon, DaemonFactory, wait_until

pytestmark = pytest.mark.swarm

SPEC = {
    "name": "index",
    "teachers": ["builtin:smollm2-135m"],
    "prompts": "prompts.jsonl",
    "shard_size": 2,
    "student": {"base": "builtin:smollm2-135m"},
}
FULL, HEADS = 'garden_mission_index_reads_total{kind="full"}', 'garden_mission_index_reads_total{kind="heads"}'


def metric(daemon: Daemon, name: str) -> float:
    return sum(float(line.split()[-1]) for line in daemon.get("/metrics").text.splitlines() if line.startswith(name))


def reads(daemon: Daemon) -> tuple[float, float]:
    return metric(daemon, FULL), metric(daemon, HEADS)


def create(lead: Daemon, name: str) -> str:
    body = {"spec": SPEC | {"name": name}, "prompts": [p.model_dump(mode="json") for p in demo_prompts()[:4]]}
    created = lead.request("POST", "/missions", json=body)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def quiet(reader: Daemon, seconds: float) -> tuple[float, float]:
    """Whole and head reads of ``reader`` over ``seconds`` in which no lead changed anything."""
    full, heads = reads(reader)
    time.sleep(seconds)
    after_full, after_heads = reads(reader)
    return after_full - full, after_heads - heads


def test_an_idle_peer_reads_the_heads_and_the_whole_index_only_after_a_change(daemons: DaemonFactory) -> None:
    # no shaker: nothing is sampled; the announce period (1 s) is the refresh period
    lead = daemons.start("--roles", "trainer")
    reader = daemons.start("--roles", "trainer", "--join", lead.join_addr)
    first = create(lead, "index-1")
    wait_until(lambda: reader.get(f"/missions/{first}").status_code == 200, 30, 0.2, "the reader knows it")
    time.sleep(3)  # the whole read after the change, and the one more after it

    # idle: a head read every refresh, the whole index never (its net is a minute away)
    full, heads = quiet(reader, 8)
    assert full == 0 and heads >= 4, (full, heads)

    # a second mission changes the lead's head: the reader reads the index whole and knows it within seconds
    started = time.monotonic()
    second = create(lead, "index-2")
    wait_until(lambda: reader.get(f"/missions/{second}").status_code == 200, 30, 0.2, "the reader knows the second")
    print(f"a new mission reached the idle reader in {time.monotonic() - started:.1f} s")
    # and the lead's cancel too, through its head
    assert lead.request("DELETE", f"/missions/{first}").status_code == 200
    wait_until(lambda: reader.get(f"/missions/{first}").json()["state"] == "cancelled", 30, 0.2, "the cancel")
    time.sleep(3)
    assert quiet(reader, 5)[0] == 0

    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker_id = signing.peer_id_of(signing.public_key_der(attacker))
    hostile = hivemind.DHT(initial_peers=[lead.join_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        keys = DHTKeys()
        # a head for the lead signed by the attacker: refused by the honest nodes, and never read as a change
        refused = sum(metric(d, 'garden_invalid_mission_records_total{kind="mission (DHT)"}') for d in (lead, reader))
        forged = sign_index_head(attacker, ["ab" * 32], [], get_dht_time())
        hostile.store(keys.mission_heads, forged, get_dht_time() + 600, subkey=lead.peer_id)
        full, heads = quiet(reader, 6)
        assert full == 0 and heads >= 3, (full, heads)
        after = sum(metric(d, 'garden_invalid_mission_records_total{kind="mission (DHT)"}') for d in (lead, reader))
        assert after > refused

        # a lead that changes its own head every 0.2 s costs each reader one whole read a refresh, no more
        full, heads = reads(reader)
        for i in range(40):
            head = sign_index_head(attacker, [f"{i:064x}"], [], get_dht_time())
            hostile.store(keys.mission_heads, head, get_dht_time() + 600, subkey=attacker_id)
            time.sleep(0.2)
        flapped_full, flapped_heads = reads(reader)
        assert 0 < flapped_full - full <= flapped_heads - heads + 1, (flapped_full - full, flapped_heads - heads)
        assert reader.get("/health").json() == {"status": "ok"}
        assert [m["id"] for m in reader.get("/missions").json()] == [second, first]  # the stranger named nothing
    finally:
        hostile.shutdown()


def test_a_holder_renews_a_mission_record_every_few_minutes_not_every_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real book on a real DHT: each store of one subkey of the index costs the index's size (hivemind's store
    asks the key's nodes, which answer with its value), so the record is stored at once, again when cancelled,
    and otherwise every ``MISSION_RENEW_PERIOD``; the rows announcement still goes out every period."""
    identity = load_or_create_identity(tmp_path / "identity.key")
    swarm = Swarm(SwarmConfig(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"], announce_maddrs=[],
                              client_mode=False, identity_path=str(identity.path), dht_timeout=10.0))  # fmt: skip
    swarm.start()  # before the event loop runs: the DHT forks
    stored: list[tuple[str, object]] = []
    real_store = swarm.store

    async def counted(key: str, value: object, expiration_time: float, subkey: object = None) -> bool:
        stored.append((key, subkey))
        return await real_store(key, value, expiration_time, subkey=subkey)

    monkeypatch.setattr(swarm, "store", counted)
    keys = DHTKeys(f"renew-{identity.peer_id[-6:]}")

    def index_stores() -> list[object]:
        return [subkey for key, subkey in stored if key == keys.missions]

    async def run() -> None:
        transfer = ContentTransfer(swarm, namespace=keys.swarm)
        book = MissionBook(Store(tmp_path / "garden.db"), swarm, keys, identity.private_key, identity.peer_id,
                           period=1.0, transfer=transfer)  # fmt: skip
        draft = MissionDraft(spec=MissionSpec.model_validate(SPEC), prompts=tuple(demo_prompts()[:4]))
        mission = await book.publish(draft)
        assert index_stores() == [mission.id] and (keys.mission_heads, identity.peer_id) in stored
        for _ in range(3):  # three announce periods
            assert await book.announce(mission)
        assert index_stores() == [mission.id]
        assert [k for k, _ in stored].count(keys.mission_rows(mission.id)) == 4  # what it holds: every period
        found = await swarm.get(keys.missions, latest=True)
        assert found is not None and mission.id in dict(found.value.items())

        await book.cancel(mission.id)  # the cancel goes out at once, with the record
        assert index_stores()[1:] == [mission.id, cancel_subkey(mission.id, identity.peer_id)]
        assert await book.announce(mission) and len(index_stores()) == 3

        later = time.monotonic() + MISSION_RENEW_PERIOD + 1
        monkeypatch.setattr(book_module.time, "monotonic", lambda: later)
        assert await book.announce(mission)
        assert index_stores()[3:] == [mission.id, cancel_subkey(mission.id, identity.peer_id)]

    try:
        asyncio.run(run())
    finally:
        swarm.shutdown()
