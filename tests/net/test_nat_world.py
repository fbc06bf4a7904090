"""Home peers behind NAT routers, in a small internet of network namespaces (``harness.netns``): two public peers
(one the bootstrap), two homes behind routers that masquerade and forward nothing unasked. Real daemons, a
real mission with the built-in teacher.

The homes learn they are private (the public peers dial back and fail), reserve slots on both public peers and
announce addresses behind them; everyone sees everyone in ``/peers``; a mission led from a home is fetched by
the public side and shaken at home only, and the public side copies the homes' row sets through the relays.
Mid-mission, the relay the homes joined through is stopped: they are reached through the other one, and the
mission runs to its end. In a second
world of peers, the two homes train a student together (averaging through the relays), the public lead pulls
their checkpoint to vouch for it, and a generation on the public side runs layers served from a home."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.daemons import Daemon, DaemonFactory, wait_until
from harness.netns import PUBLIC_IP, NatWorld, world_for_test
from tests.mission.test_missions_swarm import (  # noqa: F401 (converted: a fixture)
    converted,
    create,
    detail,
    held_row_sets,
    mission_body,
    wait_done,
)
from tests.mission.test_training_swarm import mission_body as training_body
from tests.mission.test_training_swarm import tiny, training  # noqa: F401 (tiny: a fixture)

MODEL = "builtin:smollm2-135m"

pytestmark = [pytest.mark.swarm, pytest.mark.serial]


@pytest.fixture(scope="module")
def world() -> Iterator[NatWorld]:
    with world_for_test() as built:
        yield built


def start(daemons: DaemonFactory, world: NatWorld, role: str, cache: Path, *args: str, **kwargs: Any) -> Daemon:
    env = {"GARDEN_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    return daemons.start(
        "--max-threads", "1", "--vouch-quiet", "5", *args, env=env, host_maddr="/ip4/0.0.0.0/tcp/0",
        netns=world.ns(role), via=world.caller(role), **kwargs,
    )  # fmt: skip


def public_addr(daemon: Daemon) -> str:
    return next(a for a in daemon.addresses if a.startswith(f"/ip4/{PUBLIC_IP}/"))


def network(daemon: Daemon) -> dict[str, Any]:
    return daemon.get("/status").json()["network"]


def seen(daemon: Daemon) -> dict[str, str]:
    return {p["peer_id"]: p["reachability"] for p in daemon.get("/peers").json()}


def copied_from(daemon: Daemon, mission_id: str) -> set[str]:
    db = sqlite3.connect(f"file:{daemon.data_dir / 'garden.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        found = db.execute("SELECT received_from FROM row_sets WHERE mission_id = ?", (mission_id,)).fetchall()
    finally:
        db.close()
    return {peer for (peer,) in found}


def prompts_from(daemon: Daemon, mission_id: str) -> str | None:
    """The peer ``daemon`` fetched the mission's prompts from, as its log says."""
    marker = f"prompts of mission {mission_id[:12]} from "
    line = next((line for line in daemon.stderr().splitlines() if marker in line), None)
    return line.split(marker)[1].split()[0] if line else None


def test_home_peers_behind_nat_join_through_relays_and_serve_what_they_shake(
    daemons: DaemonFactory, converted: Path, world: NatWorld  # noqa: F811 (the fixture imported above)
) -> None:
    a = start(daemons, world, "public", converted, "--reachability", "public", "--roles", "server")
    b = start(daemons, world, "public", converted, "--join", public_addr(a), "--roles", "server")
    relays = [public_addr(a), public_addr(b)]
    # the homes join with the line `garden invite` prints on a: the swarm, a's and b's addresses
    wait_until(lambda: seen(a).get(b.peer_id) == "public", 30, 0.5, "a sees b")
    invite = a.get("/invite").json()
    assert set(relays) <= set(invite["peers"]) and invite["swarm"] == "garden"
    homes = [
        start(daemons, world, f"home{i}", converted, "--join", invite["line"], "--roles", "shaker") for i in (1, 2)
    ]

    # who can be dialled: a was told; b was dialled back by a; the homes were not, and went behind both relays
    assert network(a)["reachability"] == "public" and network(a)["relay_service"]
    checked = network(b)
    assert checked["reachability"] == "public" and checked["relay_service"] and checked["mode"] == "direct"
    assert checked["checked_by"][a.peer_id].startswith("public; dialled back: ")
    for i, home in enumerate(homes, start=1):
        net = network(home)
        assert (net["reachability"], net["mode"]) == ("private", "relayed"), net
        assert net["observed"] == [f"10.99.{i}.2"]  # its router's address, as the public peers saw it
        assert sorted(net["relays"]) == sorted(relays) and not net["relay_service"]
        assert net["checked_by"][a.peer_id] == "public; dialled back: nothing"
        assert net["addresses"] and all("/p2p-circuit/p2p/" + home.peer_id in x for x in net["addresses"])

    # each public peer probed its own relay after it started (and started again while libp2p's defaults served):
    # it knows which limits serve; the homes relay for nobody
    for public in (a, b):
        net = network(public)
        assert net["relay_limits"] in ("garden", "libp2p-default") and "through its relay" in net["relay_check"], net
    assert all(network(home)["relay_limits"] == "" for home in homes)

    # everyone sees everyone, with what each is
    expected = {a.peer_id: "public", b.peer_id: "public", homes[0].peer_id: "private", homes[1].peer_id: "private"}
    for daemon in (a, b, *homes):
        wait_until(lambda d=daemon: seen(d) == expected, 60, 0.5, f"{daemon.peer_id} sees all four")  # type: ignore[misc]

    # a mission led from home 1, shaken at home only (the public peers do not shake): the public side fetches its
    # prompts from home 1, and copies every row set from the homes, all through the relays
    mission_id = create(homes[0], mission_body(16, shard_size=2, max_new_tokens=4))
    wait_until(lambda: prompts_from(a, mission_id), 60, 0.5, "a fetched the prompts")
    assert prompts_from(a, mission_id) == homes[0].peer_id
    home_ids = {h.peer_id for h in homes}
    # each row set is held twice: the public peer that asks first copies it (b copied all of them once, so a
    # had nothing left to copy)
    public_copies = lambda: copied_from(a, mission_id) | copied_from(b, mission_id)  # noqa: E731
    wait_until(public_copies, 120, 0.5, "a public peer copied a home's row set")
    assert public_copies() <= home_ids

    # mid-mission, the relay the homes joined through goes away (the homes hold still meanwhile, so that the
    # mission cannot end first): they are reached through b, and the mission runs to its end
    for home in homes:
        assert home.request("POST", "/pause", json={}).json()["paused"] is True
    done_before = detail(b, mission_id)["shards"]["done"]
    assert done_before < 8
    assert a.stop() == 0
    for home in homes:
        assert home.request("POST", "/resume").json()["paused"] is False
    final = wait_done(b, mission_id)
    assert final["shards"]["done"] == 8 and {p["peer_id"] for p in final["peers"] if p["shards_done"]} <= home_ids
    # every row set is held twice or more (replication), and the public side's copies came from the homes
    wait_until(lambda: held_row_sets(b, mission_id), 90, 1.0, "b holds the homes' rows")
    assert copied_from(b, mission_id) <= home_ids

    # home 1 restarts, told to join through a alone (gone): it remembered b, joins through it and relays there
    assert homes[0].stop() == 0
    again = start(daemons, world, "home1", converted, "--join", relays[0], "--roles", "shaker",
                  data_dir=homes[0].data_dir)  # fmt: skip
    assert network(again)["relays"] == [relays[1]] and network(again)["mode"] == "relayed"
    wait_until(lambda: seen(b).get(again.peer_id) == "private", 60, 0.5, "b sees home 1 again")
    for daemon in (b, *homes, again):
        assert "Traceback" not in daemon.stderr()


def test_home_peers_average_gradients_write_checkpoints_and_serve_layers_through_relays(
    daemons: DaemonFactory, converted: Path, tiny: Path, world: NatWorld  # noqa: F811 (fixtures imported above)
) -> None:
    a = start(daemons, world, "public", converted, "--reachability", "public", "--roles", "server",
              "--serve", f"{MODEL}:0-15")  # fmt: skip
    trusting = ["--join", public_addr(a), "--trust-lead", a.peer_id, "--allow-local-models", "--train-batch-size", "2"]
    h1 = start(daemons, world, "home1", converted, *trusting, "--roles", "shaker,trainer,server",
               "--serve", f"{MODEL}:15-30")  # fmt: skip
    h2 = start(daemons, world, "home2", converted, *trusting, "--roles", "shaker,trainer")
    assert {network(h)["mode"] for h in (h1, h2)} == {"relayed"}
    # a home peer whose only join peer cannot relay falls back to client mode, and says so: that peer founded a
    # swarm of its own without saying it is public, so its reachability is unknown and it offers no relay
    lone = start(daemons, world, "public", converted, "--roles", "server", "--swarm", "alone")
    assert network(lone)["reachability"] == "unknown"
    stuck = start(daemons, world, "home2", converted, "--join", public_addr(lone), "--roles", "shaker",
                  "--swarm", "alone")  # fmt: skip
    net = network(stuck)
    assert (net["reachability"], net["mode"], net["relays"]) == ("private", "client", []), net
    assert "cannot serve row sets, checkpoints or layers" in net["note"] and stuck.addresses == []
    wait_until(lambda: seen(lone).get(stuck.peer_id) == "private", 60, 0.5, "the client-mode peer is seen")
    assert stuck.stop() == 0 and lone.stop() == 0

    # both homes train, and only together (min_trainers 2): every round averages through the relays
    mission_id = create(a, training_body(tiny, max_epochs=1, min_trainers=2))
    wait_until(lambda: all(training(h, mission_id).get("state") == "done" for h in (h1, h2)), 300, 1.0,
               "both homes trained")  # fmt: skip
    for home in (h1, h2):
        train = training(home, mission_id)
        assert train["epoch"] == 1 and train["bytes_sent"] > 0 and train["peers"] == 2, train
    # a checkpoint written at home, pulled by the public lead (every hash checked) and vouched for
    wait_until(
        lambda: any(c["epoch"] == 1 and c["verified"] for c in a.get(f"/missions/{mission_id}/checkpoints").json()),
        240, 1.0, "the lead pulled and vouched for a home checkpoint",
    )  # fmt: skip
    # (a trains nothing: to vouch, it pulled the files from a home, every sha256 checked, through the relay)
    listed = a.get(f"/missions/{mission_id}/checkpoints").json()
    written_at_home = [c for c in listed if c["peer_id"] in (h1.peer_id, h2.peer_id)]
    assert written_at_home and any(c["verified"] for c in written_at_home), listed

    # a generation asked on the public side runs layers 0-15 there and 15-30 at home 1, through the relay
    wait_until(lambda: all(s["layers"] for s in h1.get("/status").json()["serving"]), 120, 0.5, "home 1 serves")
    wait_until(lambda: MODEL in [m["id"] for m in a.get("/v1/models").json()["data"]], 60, 0.5, "covered")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0}  # fmt: skip
    answer = a.request("POST", "/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    assert h1.get("/status").json()["serving"][0]["tokens_served"] > 0
    for daemon in (a, h1, h2):
        assert "Traceback" not in daemon.stderr()

