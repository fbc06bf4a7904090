"""Real swarms of `garden run` processes on 127.0.0.1."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from harness.daemons import DaemonFactory, wait_until

pytestmark = pytest.mark.swarm


def test_three_peers_see_each_other_and_drop_a_stopped_one(daemons: DaemonFactory) -> None:
    first = daemons.start()
    second = daemons.start("--join", first.join_addr)
    third = daemons.start("--join", first.join_addr)
    everyone = {first.peer_id, second.peer_id, third.peer_id}
    assert len(everyone) == 3

    started = time.time()
    for daemon in (first, second, third):
        wait_until(lambda d=daemon: d.peer_ids() == everyone, timeout=15, message=f"{daemon.peer_id} sees all three")
    assert time.time() - started < 15
    # an idle daemon holds no torch (220 MB): its DHT node is a thread, its modules defer torch to torch work
    maps = Path(f"/proc/{first.proc.pid}/maps").read_text()
    assert "libtorch" not in maps
    assert [p.name() for p in psutil.Process(first.proc.pid).children(recursive=True)] == ["p2pd"]

    assert first.stop(signal.SIGTERM) == 0
    assert not first.wait_children_gone(), "the stopped daemon's p2pd is still alive"
    rest = {second.peer_id, third.peer_id}
    for daemon in (second, third):
        # records expire after 2 x announce period (1 s); allow for the DHT's own caching
        wait_until(lambda d=daemon: d.peer_ids() == rest, timeout=15, message=f"{daemon.peer_id} drops the first")
        assert daemon.get("/health").json() == {"status": "ok"}
    assert second.get("/status").json()["peers"] == 2


def test_killed_peer_expires_from_the_others(daemons: DaemonFactory) -> None:
    """No goodbye: a peer that vanishes (kill -9) drops out when its record expires."""
    first = daemons.start()
    second = daemons.start("--join", first.join_addr)
    wait_until(lambda: second.peer_ids() == {first.peer_id, second.peer_id}, timeout=15, message="both seen")
    second.record_descendants()
    second.proc.kill()  # SIGKILL the daemon only: its p2pd must follow on its own
    second.proc.wait(timeout=10)
    killed_at = time.time()
    assert not second.wait_children_gone(timeout=10), "a SIGKILLed daemon left its children running"
    wait_until(lambda: first.peer_ids() == {first.peer_id}, timeout=20, message="the killed peer expires")
    assert time.time() - killed_at >= 1.0  # it went by expiry (TTL 2 s), not by a goodbye
