"""Hole punching (libp2p's DCUtR) between two home peers behind NAT routers, in the internet-like namespace world
(``harness.netns.NatWorld(internet=True)``): each p2p daemon started as garden starts a peer of that
reachability (``garden.net.reach.plan``: the homes private, reserving a slot on the relay, their libp2p DHT a
client). Home 1 dials home 2 through the relay; libp2p upgrades the relayed connection to a direct one, seen
from outside as a TCP connection between home 1 and home 2's router, and a round trip over it is measured
against one through the relay.

What it takes, and what the test builds (``docs/running-a-peer.md``, "Behind NAT"): public-looking addresses,
four peers at different IPs that saw a home at the same address (the relay and three observers here), routers
that drop what reaches them unasked (as home routers do), and both homes knowing their public address before
the relayed connection opens (libp2p tries a punch once per relayed connection).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.daemons import wait_until
from harness.netns import INTERNET_IPS, NatWorld, world_for_test

pytestmark = pytest.mark.swarm
ROOT = Path(__file__).resolve().parents[2]
PORT = 4001


@pytest.fixture
def world() -> Iterator[NatWorld]:
    with world_for_test(internet=True) as built:
        yield built


class Peers:
    """The ``harness.p2p_peer`` processes of one test: started in namespaces, stopped (and their p2pd killed,
    by the pid each wrote) at the end."""

    def __init__(self, run: Path):
        self.run, self.procs = run, dict[str, subprocess.Popen[bytes]]()

    def start(self, name: str, ns: str, **config: Any) -> dict[str, Any]:
        out = (self.run / f"{name}.out").open("wb")
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "harness.p2p_peer", name, str(self.run),
             json.dumps(config)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        return wait_until(lambda: self.ready(name), 60, 0.2, f"{name} up")

    def ready(self, name: str) -> dict[str, Any] | None:
        if self.procs[name].poll() is not None:
            raise AssertionError(f"{name} exited: {(self.run / f'{name}.out').read_text()[-3000:]}")
        return self.ready_quietly(name)

    def log(self, name: str) -> str:
        path = self.run / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def states(self, name: str) -> list[dict[str, Any]]:
        path = self.run / f"{name}.state"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def command(self, name: str, line: str) -> None:
        with (self.run / f"{name}.cmd").open("a") as f:
            f.write(line + "\n")

    def close(self) -> None:
        for name in self.procs:
            (self.run / f"{name}.stop").touch()
        deadline = time.monotonic() + 10
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            info = self.ready_quietly(name)
            if info is not None:
                try:
                    os.kill(info["pid"], signal.SIGKILL)  # its p2pd, if the peer did not stop it
                except ProcessLookupError:
                    pass

    def ready_quietly(self, name: str) -> dict[str, Any] | None:
        path = self.run / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None


def test_two_home_peers_behind_nat_punch_a_direct_connection(world: NatWorld, tmp_path: Path) -> None:
    if shutil.which("ss") is None:
        pytest.skip("`ss` (iproute2) is not installed")
    peers = Peers(tmp_path)
    try:
        public = {"relay": INTERNET_IPS[0], **{f"observer{i}": INTERNET_IPS[i] for i in (1, 2, 3)}}
        ids = {
            name: peers.start(name, world.ns("public"), host=[f"/ip4/{ip}/tcp/{PORT}"], reach="public")["id"]
            for name, ip in public.items()
        }
        addrs = {name: f"/ip4/{ip}/tcp/{PORT}/p2p/{ids[name]}" for name, ip in public.items()}
        for home in ("home1", "home2"):
            ids[home] = peers.start(
                home, world.ns(home), host=[f"/ip4/0.0.0.0/tcp/{PORT}"], reach="private", relays=[addrs["relay"]],
                initial=list(addrs.values()),
            )["id"]  # fmt: skip
        # four peers at four IPs saw each home at its router's address: libp2p takes it as the home's own
        for home in ("home1", "home2"):
            wait_until(lambda h=home: "Host now has a public address" in peers.log(h), 60, 0.2,
                       f"{home} knows its public address")  # fmt: skip

        circuit = f"{addrs['relay']}/p2p-circuit/p2p/{ids['home2']}"
        dialled = time.monotonic()
        peers.command("home1", f"connect {circuit}")

        def direct() -> list[str] | None:
            for state in peers.states("home1"):
                assert "error" not in state, state
                for peer, seen in state.get("peers", []):
                    if peer == ids["home2"] and any("p2p-circuit" not in a for a in seen):
                        return [a for a in seen if "p2p-circuit" not in a]
            return None

        found = wait_until(direct, 30, 0.1, "home 1 connected to home 2 directly")
        took = time.monotonic() - dialled
        router2 = world.wan(2)[1]
        assert found == [f"/ip4/{router2}/tcp/{PORT}"], found  # home 2's router's address, the port kept
        sockets = subprocess.run(
            ["ip", "netns", "exec", world.ns("home1"), "ss", "-tnH", "state", "established", "dst", router2],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"{router2}:{PORT}" in sockets, sockets  # a TCP connection straight to home 2's router
        assert "hole punch" in peers.log("home2") or "hole punch" in peers.log("home1")
        print(f"relayed connection upgraded to a direct one {took:.2f} s after the dial")
    finally:
        peers.close()


def test_a_public_peer_fetches_past_the_relays_limit_over_the_connection_the_home_opens(
    world: NatWorld, tmp_path: Path
) -> None:
    """hivemind's p2pd sometimes relays with libp2p's default limits (128 KiB a direction per relayed
    connection: docs/running-a-peer.md); the relay here does so always. A public peer that reaches a home only
    through it still fetches 1 MiB from the home: the home's libp2p dials a public peer back as soon as its
    relayed connection arrives, and the fetch (or its retry, garden.net.transfer.TRANSIENT) goes over that
    direct connection. Between two homes with no punch (no observers here), the same fetch is cut at the relay's
    limit: the limit is real, and what saves the public peer is the connection the home opened."""
    peers = Peers(tmp_path)
    size = 1 << 20
    try:
        relay_id = peers.start("relay", world.ns("public"), host=[f"/ip4/{INTERNET_IPS[0]}/tcp/{PORT}"],
                               reach="public", default_relay_only=True)["id"]  # fmt: skip
        relay = f"/ip4/{INTERNET_IPS[0]}/tcp/{PORT}/p2p/{relay_id}"
        peers.start("fetcher", world.ns("public"), host=[f"/ip4/{INTERNET_IPS[1]}/tcp/{PORT}"], reach="public",
                    initial=[relay])  # fmt: skip
        homes = {
            home: peers.start(home, world.ns(home), host=[f"/ip4/0.0.0.0/tcp/{PORT}"], reach="private",
                              relays=[relay], initial=[relay], serve_bytes=size if home == "home1" else 0)["id"]
            for home in ("home1", "home2")
        }  # fmt: skip
        circuit = f"{relay}/p2p-circuit/p2p/{homes['home1']}"

        def reached(name: str) -> bool:  # through the relay, once home 1 holds its slot there
            states = peers.states(name)
            if any(s.get("connected") == circuit for s in states):
                return True
            if sum("error" in s for s in states) < 60:
                peers.command(name, f"connect {circuit}")
            return False

        def fetched(name: str) -> dict[str, Any] | None:
            return next((s for s in peers.states(name) if "fetched" in s or "fetch_failed" in s), None)

        def dialled_back() -> list[str] | None:  # home 1's router's address: the connection home 1 opened
            latest = next(s for s in reversed(peers.states("fetcher")) if "peers" in s)["peers"]
            seen = next((a for p, a in latest if p == homes["home1"]), [])
            return [a for a in seen if "p2p-circuit" not in a] or None

        wait_until(lambda: reached("fetcher"), 60, 1.0, "the public peer reached home 1 through the relay")
        direct = wait_until(dialled_back, 30, 0.2, "home 1 dialled the public peer back")
        assert all(a.startswith(f"/ip4/{world.wan(1)[1]}/tcp/") for a in direct), direct  # through its router
        peers.command("fetcher", f"fetch {homes['home1']} {size}")
        public = wait_until(lambda: fetched("fetcher"), 90, 0.2, "the public peer's fetch")
        assert public.get("fetched") == size and not public["failures"], public

        wait_until(lambda: reached("home2"), 60, 1.0, "home 2 reached home 1 through the relay")
        peers.command("home2", f"fetch {homes['home1']} {size}")
        other = wait_until(lambda: fetched("home2"), 120, 0.2, "home 2's fetch")
        assert "fetched" not in other and other["failures"].get("short") == 2, other  # cut twice, at 128 KiB
        print(f"public fetcher: {public}; home to home through the relay alone: {other}")
    finally:
        peers.close()
