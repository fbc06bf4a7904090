"""Which missions a peer keeps and works on, against real daemons and a hostile lead (a plain hivemind DHT
signing missions with a key of its own): the per-lead cap, trusted leads, another peer's local paths, and
missions past their end."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import hivemind
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.utils.timed_storage import get_dht_time

from garden.data import demo_prompts
from garden.models.loading import builtin_gguf
from garden.protocol import signing
from garden.protocol.keys import DHTKeys
from garden.protocol.mission import MissionDraft, MissionSpec, sign_index_head, sign_mission
from harness.daemons import Daemon, DaemonFactory, HealthPoller, wait_until

pytestmark = pytest.mark.swarm

SPEC = {
    "name": "flood",
    "teachers": ["builtin:smollm2-135m"],
    "prompts": "prompts.jsonl",
    "shard_size": 2,
    "student": {"base": "builtin:smollm2-135m"},
}


def body(**spec: object) -> dict:
    return {"spec": SPEC | spec, "prompts": [p.model_dump(mode="json") for p in demo_prompts()[:4]]}


def metric(daemon: Daemon, name: str) -> float:
    return sum(float(line.split()[-1]) for line in daemon.get("/metrics").text.splitlines() if line.startswith(name))


def test_caps_trusted_leads_and_local_paths(daemons: DaemonFactory, tmp_path: Path, model_cache: Path) -> None:
    env = {"GARDEN_CACHE_DIR": str(model_cache)}  # the built-in teacher converted once for the whole run
    lead = daemons.start("--roles", "trainer", "--max-missions-per-lead", "4", env=env)  # no shaker: nothing sampled
    # the volunteer works for `lead` only, and shakes (the role that would load a stranger's teacher)
    volunteer = daemons.start("--roles", "shaker", "--join", lead.join_addr, "--trust-lead", lead.peer_id, env=env)
    # local models allowed, but for trusted leads only, and this one trusts no one in particular: no effect
    careless = daemons.start("--roles", "shaker", "--join", lead.join_addr, "--allow-local-models", env=env)

    # a lead's own cap: the fifth open mission is refused with a reason; a cancel makes room
    ids = []
    local_teacher = str(builtin_gguf("smollm2-135m"))  # a path: this file on the lead's machine
    for i in range(4):
        created = lead.request("POST", "/missions", json=body(name=f"own-{i}", teachers=[local_teacher]))
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    fifth = lead.request("POST", "/missions", json=body(name="own-4"))
    assert fifth.status_code == 409 and "max_missions_per_lead" in fifth.json()["detail"]
    assert lead.request("DELETE", f"/missions/{ids[-1]}").status_code == 200
    # a path again: the volunteer samples nothing in this test, so its port answers for the flood alone
    assert lead.request("POST", "/missions", json=body(name="own-4", teachers=[local_teacher])).status_code == 201

    # a hostile lead floods the swarm with 20 valid, signed missions
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker_id = signing.peer_id_of(signing.public_key_der(attacker))
    hostile = hivemind.DHT(initial_peers=[lead.join_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    health = HealthPoller(volunteer, tmp_path)  # the volunteer's port stays quick through the flood
    try:
        prompts = tuple(demo_prompts()[:4])
        flood = []
        for i in range(20):
            draft = MissionDraft(spec=MissionSpec.model_validate(SPEC | {"name": f"flood-{i}"}), prompts=prompts)
            signed = sign_mission(draft, attacker, now=time.time() - 100 + i)  # oldest first
            flood.append(signed.mission_id)
            hostile.store(DHTKeys().missions, signed.to_wire(), get_dht_time() + 600, subkey=signed.mission_id)
        # its head says its entries changed: every reader reads the index whole (at most once a refresh)
        head = sign_index_head(attacker, flood, [], get_dht_time())
        hostile.store(DHTKeys().mission_heads, head, get_dht_time() + 600, subkey=attacker_id)

        def theirs(daemon: Daemon) -> list[dict]:
            return [m for m in daemon.get("/missions").json() if m["lead"] == attacker_id]

        for daemon in (lead, volunteer):
            wait_until(lambda d=daemon: len(theirs(d)) == 4, 30, 0.5, "the hostile lead's missions")
        time.sleep(3)  # several refreshes: still 4, the same 4 (the oldest) on both peers
        for daemon in (lead, volunteer):
            kept = theirs(daemon)
            assert sorted(m["id"] for m in kept) == sorted(flood[:4])
            assert metric(daemon, 'garden_missions_ignored{reason="over its lead\'s cap"}') == 16
        # the volunteer lists them, marked, and never works on them (not even their prompts are fetched)
        for mission in theirs(volunteer):
            assert mission["trusted"] is False and mission["state"] == "not worked on here"
            assert "not one this peer trusts" in mission["not_worked_on"]
            here = volunteer.get(f"/missions/{mission['id']}").json()
            assert here["this_peer"]["state"].startswith("not worked on: its lead")
            assert here["shards"]["leased"] == 0
        assert all(m["trusted"] for m in theirs(lead))  # the lead trusts everyone (no --trust-lead)
        latencies = health.stop()
        served = health.served  # the daemon's own time: the other test worker's daemons do not move it
        print(f"/health through a flood: {len(latencies)} answers, slowest {max(latencies) * 1000:.0f} ms seen, "
              f"{max(served) * 1000:.0f} ms served")
        assert not volunteer.loop_stalls(), volunteer.loop_stalls()  # the watchdog saw no stall of 0.25 s
        assert max(served) < 0.25, sorted(served)[-5:]
    finally:
        health.close()
        hostile.shutdown()

    # the trusted lead's missions name a local path: the lead's own file, never the volunteer's
    for mission_id in ids[:3]:
        wait_until(lambda m=mission_id: volunteer.get(f"/missions/{m}").status_code == 200, 30, 0.5, "known")
        seen = volunteer.get(f"/missions/{mission_id}").json()
        assert seen["trusted"] is True and "is a path on this machine" in seen["not_worked_on"]
        assert seen["this_peer"]["state"].startswith("not worked on:")
        assert seen["shards"]["leased"] == 0 and seen["shards"]["done"] == 0
        assert lead.get(f"/missions/{mission_id}").json()["not_worked_on"] is None  # its lead may use it
        wait_until(lambda m=mission_id: careless.get(f"/missions/{m}").status_code == 200, 30, 0.5, "known")
        assert "is a path on this machine" in careless.get(f"/missions/{mission_id}").json()["not_worked_on"]
    assert all(d.get("/health").status_code == 200 for d in (lead, volunteer, careless))


def test_a_nudged_peer_stopped_while_converting_its_student_exits_at_once(daemons: DaemonFactory) -> None:
    """The lead of a new mission nudges the peers it knows, which look at once. A trainer measures a new mission's
    student by converting its GGUF (a child, seconds to minutes): a stop in the middle ends that child and the
    daemon within the clean stop's bound, leaving no conversion behind."""
    import psutil

    lead = daemons.start("--roles", "trainer")
    peer = daemons.start("--roles", "trainer", "--join", lead.join_addr)  # a cache of its own: it converts
    wait_until(lambda: metric(lead, "garden_peers_seen") == 2, 30, 0.2, "the lead knows the peer")
    assert lead.request("POST", "/missions", json=body(name="converting")).status_code == 201
    # the lead nudged the peer, which looked at once (not at its next read of the missions' heads)
    wait_until(lambda: metric(lead, 'garden_nudges_total{outcome="sent"}') == 1, 30, 0.2, "the peer nudged")
    assert metric(peer, 'garden_nudges_total{outcome="acted"}') == 1

    def converting() -> list[psutil.Process]:
        found = []
        for child in psutil.Process(peer.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a child that ended meanwhile
                if "garden.models.convert" in " ".join(child.cmdline()):
                    found.append(child)
        return found

    (child,) = wait_until(converting, 60, 0.1, "the peer converts the student")
    started = time.monotonic()
    assert peer.stop() == 0  # fails past 10 s
    print(f"stopped {time.monotonic() - started:.1f} s after the signal")
    assert not psutil.pid_exists(child.pid), child
    assert "stopped 1 model conversion(s) in progress" in peer.stderr()


def test_a_peer_drops_missions_past_their_end(daemons: DaemonFactory) -> None:
    """Another lead's mission older than --mission-max-age is not kept; one that was, is dropped, rows and all."""
    lead = daemons.start("--roles", "trainer")
    peer = daemons.start("--roles", "trainer", "--join", lead.join_addr, "--mission-max-age", "8")
    created = lead.request("POST", "/missions", json=body(name="short-lived"))
    assert created.status_code == 201, created.text
    mission_id = created.json()["id"]
    wait_until(lambda: peer.get(f"/missions/{mission_id}").status_code == 200, 30, 0.5, "the peer keeps it")
    wait_until(lambda: peer.get(f"/missions/{mission_id}").status_code == 404, 30, 0.5, "the peer dropped it")
    time.sleep(2)  # refreshes later: it is not kept again
    assert peer.get(f"/missions/{mission_id}").status_code == 404
    assert metric(peer, 'garden_missions_ignored{reason="too old"}') == 0  # dropped, not refused
    assert lead.get(f"/missions/{mission_id}").status_code == 200  # its lead keeps its own
    # a restarted peer does not take it back
    assert peer.stop() == 0
    peer = daemons.start(
        "--roles", "trainer", "--join", lead.join_addr, "--mission-max-age", "8", data_dir=peer.data_dir
    )  # fmt: skip
    time.sleep(3)
    assert peer.get(f"/missions/{mission_id}").status_code == 404
    assert metric(peer, 'garden_missions_ignored{reason="too old"}') == 1
