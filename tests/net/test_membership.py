"""Joining: identity that survives restarts, one daemon per data dir, stock hivemind bootstrap peers."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness.daemons import DaemonFactory, wait_until

pytestmark = pytest.mark.swarm


def test_restart_keeps_the_peer_id(daemons: DaemonFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "volunteer"
    first_run = daemons.start(data_dir=data_dir)
    key = data_dir / "identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert first_run.stop() == 0
    assert not (data_dir / "daemon.json").exists(), "the runtime file must go with the daemon"
    second_run = daemons.start(data_dir=data_dir)
    assert second_run.peer_id == first_run.peer_id
    assert second_run.get("/status").json()["peer_id"] == first_run.peer_id


def test_a_restart_rejoins_through_a_peer_it_saw_when_the_one_it_joined_through_is_gone(
    daemons: DaemonFactory, tmp_path: Path
) -> None:
    """A peer remembers the peers it sees as soon as it reads them (here: a ``/peers`` read between two of its
    announces, an hour apart), and a restart with ``--join`` of a peer that is gone joins through one of them."""
    first = daemons.start()
    volunteer = tmp_path / "volunteer"
    third = daemons.start("--join", first.join_addr, data_dir=volunteer, announce_period=3600.0)
    second = daemons.start("--join", first.join_addr)  # after the volunteer's first (and last) periodic read
    wait_until(lambda: second.peer_id in third.peer_ids(), 30, 0.5, "the volunteer sees the second peer")
    assert third.stop() == 0
    assert first.stop() == 0
    again = daemons.start("--join", first.join_addr, data_dir=volunteer)
    assert again.peer_id == third.peer_id
    wait_until(lambda: second.peer_id in again.peer_ids(), 30, 0.5, "the volunteer sees the second peer again")


def test_second_daemon_on_one_data_dir_refuses_to_start(daemons: DaemonFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    running = daemons.start(data_dir=data_dir)
    intruder = daemons.start(data_dir=data_dir, wait=False)
    assert intruder.proc.wait(timeout=60) == 2
    assert f"already using the data dir {data_dir}" in intruder.stderr()
    assert f"pid {running.proc.pid}" in intruder.stderr()
    assert "Traceback" not in intruder.stderr()
    # the first one is untouched
    assert running.get("/status").json()["peer_id"] == running.peer_id


def test_stock_hivemind_bootstrap_peer(daemons: DaemonFactory, tmp_path: Path) -> None:
    """A plain `hivemind-dht` as the only --join address: two garden peers find each other through it."""
    log = tmp_path / "bootstrap.log"
    hivemind_dht = Path(sys.executable).with_name("hivemind-dht")
    with open(log, "wb") as out:
        bootstrap = subprocess.Popen(
            [str(hivemind_dht), "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--refresh_period", "5"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        maddr = wait_until(
            lambda: re.search(r"--initial_peers (\S+)", log.read_text()), timeout=30, message="bootstrap address"
        ).group(1)
        first = daemons.start("--join", maddr)
        second = daemons.start("--join", maddr)
        both = {first.peer_id, second.peer_id}
        for daemon in (first, second):
            wait_until(lambda d=daemon: d.peer_ids() == both, timeout=15, message="peers found via the bootstrap")
    finally:
        children = psutil.Process(bootstrap.pid).children(recursive=True)
        bootstrap.terminate()
        bootstrap.wait(timeout=15)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"hivemind-dht left {alive}"


def test_unreachable_join_address_fails_clearly(daemons: DaemonFactory) -> None:
    dead = "/ip4/127.0.0.1/tcp/9/p2p/QmVzN4oCCoFTNUgPPNdNzhF1aXqetWXks8XVHBmZkea2HW"
    started = time.time()
    daemon = daemons.start("--join", dead, wait=False)
    assert daemon.proc.wait(timeout=90) == 2
    assert "could not start the swarm" in daemon.stderr()
    assert "--join addresses" in daemon.stderr()
    # tried three times (garden.net.swarm.BOOTSTRAP_RETRIES) before giving up
    assert daemon.stderr().count("reached none of the 1 join peer address(es); starting again") == 2
    assert time.time() - started < 90


@pytest.mark.parametrize(
    "address, message",
    [("not-a-multiaddr", "is not a multiaddr"), ("/ip4/127.0.0.1/tcp/9", "lacks the peer id")],
)
def test_malformed_join_address_fails_clearly(daemons: DaemonFactory, address: str, message: str) -> None:
    daemon = daemons.start("--join", address, wait=False)
    assert daemon.proc.wait(timeout=60) == 2
    assert message in daemon.stderr()
    assert "Traceback" not in daemon.stderr()


def test_a_newcomer_joins_with_the_invite_line(daemons: DaemonFactory) -> None:
    """`garden invite` on a peer prints one line; `garden run --join <line>` joins that swarm (named in the line),
    trusting the inviter as a lead when asked."""
    first = daemons.start("--swarm", "friends")
    second = daemons.start("--swarm", "friends", "--join", first.join_addr)
    wait_until(lambda: len(first.peer_ids()) == 2, 30, 0.5, "first sees second")
    shown = subprocess.run(
        [sys.executable, "-m", "garden", "invite", "--url", first.url, "--trust-me"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    line = shown.stdout.strip()
    assert line.startswith("garden-invite:") and "\n" not in line and "garden run --join" in shown.stderr
    invite = first.get("/invite", params={"me": "true"}).json()
    assert invite["line"] == line and invite["swarm"] == "friends" and invite["leads"] == [first.peer_id]
    assert first.join_addr in invite["peers"] and second.join_addr in invite["peers"]
    newcomer = daemons.start("--join", line)  # no --swarm: the line names it
    assert newcomer.get("/status").json()["swarm"] == "friends"
    wait_until(lambda: newcomer.peer_ids() == {first.peer_id, second.peer_id, newcomer.peer_id}, 30, 0.5,
               "the newcomer sees both")  # fmt: skip
    refused = daemons.start("--join", line, "--swarm", "another", wait=False)
    assert refused.proc.wait(timeout=60) == 2 and "invite is for swarm 'friends'" in refused.stderr()
