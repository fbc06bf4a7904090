"""Starting and stopping a daemon the way users do: signals, port clashes, layered settings."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from harness.daemons import DaemonFactory, wait_until

pytestmark = pytest.mark.swarm


def test_sigint_stops_cleanly(daemons: DaemonFactory) -> None:
    daemon = daemons.start()
    started = time.time()
    assert daemon.stop(signal.SIGINT) == 0
    assert time.time() - started < 10
    assert not daemon.wait_children_gone(), "DHT process or p2pd outlived the daemon"
    assert "garden: stopped" in daemon.stdout()
    assert "Traceback" not in daemon.stderr()
    assert not (daemon.data_dir / "daemon.json").exists()


def test_ctrl_c_in_a_terminal_stops_cleanly(daemons: DaemonFactory) -> None:
    """A terminal's Ctrl+C signals the whole process group; p2pd must not die ahead of the daemon."""
    first = daemons.start()
    second = daemons.start("--join", first.join_addr)
    wait_until(lambda: first.peer_ids() == {first.peer_id, second.peer_id}, timeout=15, message="both seen")
    second.record_descendants()
    names = {pid: psutil.Process(pid).name() for pid in second.descendants}
    assert "p2pd" in names.values()
    # p2pd on all interfaces exits at once on SIGINT and leaves the DHT to be killed "the hard way"
    # (seen with `make run`); out of the terminal's process group it only hears the daemon
    assert all(os.getpgid(pid) != second.proc.pid for pid in second.descendants), names
    started = time.time()
    second.send_to_group(signal.SIGINT)
    assert second.proc.wait(timeout=10) == 0
    assert time.time() - started < 10
    assert not second.wait_children_gone()
    log = second.stderr()
    assert "ERROR" not in log and "hard way" not in log and "Traceback" not in log, log
    # its goodbye reached the swarm: dropped at once, not after the record's expiry
    wait_until(lambda: first.peer_ids() == {first.peer_id}, timeout=5, message="goodbye seen")


def test_second_signal_forces_exit(daemons: DaemonFactory) -> None:
    daemon = daemons.start()
    daemon.send(signal.SIGINT)
    daemon.send(signal.SIGINT)
    code = daemon.proc.wait(timeout=10)
    assert code in (0, 130)  # 0 if the clean stop won the race with the second signal
    assert not daemon.wait_children_gone()


def test_a_daemon_tied_to_a_process_stops_in_order_once_it_is_killed(daemons: DaemonFactory) -> None:
    """``garden demo`` ties its peers to itself (GARDEN_STOP_WITH): killed with SIGKILL, it leaves none behind."""
    import subprocess
    import sys

    from garden.lifecycle import STOP_WITH_ENV

    demo = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        daemon = daemons.start(env={STOP_WITH_ENV: str(demo.pid)})
        daemon.record_descendants()
        time.sleep(1.5)  # a few watch periods: it stays while the process lives
        assert daemon.proc.poll() is None
        demo.kill()
        demo.wait(timeout=10)
        assert daemon.proc.wait(timeout=20) == 0  # an orderly stop, as on SIGTERM
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=10)
    assert not daemon.wait_children_gone()
    assert "SIGTERM received, stopping" in daemon.stdout() + daemon.stderr()
    assert "Traceback" not in daemon.stderr()


def test_http_port_in_use_fails_clearly(daemons: DaemonFactory) -> None:
    first = daemons.start()
    port = first.url.rsplit(":", 1)[1]
    clash = daemons.start("--http-port", port, wait=False)
    assert clash.proc.wait(timeout=60) == 2
    assert f"cannot open the HTTP port 127.0.0.1:{port}" in clash.stderr()
    assert "--http-port 0" in clash.stderr()
    assert "Traceback" not in clash.stderr()
    assert first.get("/health").status_code == 200


def test_settings_layers_in_a_real_daemon(daemons: DaemonFactory, tmp_path: Path) -> None:
    """flag > env > file > default, observed through /status of a running daemon."""
    config = tmp_path / "garden.toml"
    config.write_text('swarm = "from-file"\nroles = ["server"]\nannounce_period = 7.0\n')
    daemon = daemons.start(
        "--config", str(config), "--roles", "shaker",
        env={"GARDEN_SWARM": "from-env", "GARDEN_ROLES": "trainer"},
        announce_period=None,
    )  # fmt: skip
    status = daemon.get("/status").json()
    assert status["roles"] == ["shaker"]  # flag beats env and file
    assert status["swarm"] == "from-env"  # env beats file
    assert status["announce_period_s"] == 7.0  # file beats default
    assert status["client_mode"] is False  # default
    assert daemon.url.startswith("http://127.0.0.1:")  # default http_host


def test_losing_the_swarm_stops_the_daemon(daemons: DaemonFactory) -> None:
    """If its p2pd dies, the daemon says so and exits non-zero (for a restart). (A DHT node whose thread stops is
    the same failure: ``tests/net/test_dht_thread.py``.)"""

    daemon = daemons.start()
    target = next(p for p in psutil.Process(daemon.proc.pid).children() if p.name() == "p2pd")
    target.kill()
    assert daemon.proc.wait(timeout=15) == 1
    assert "has left the swarm" in daemon.stderr()
    assert "Traceback" not in daemon.stderr()
    assert not daemon.wait_children_gone()


def test_damaged_files_stop_the_start_and_are_kept(daemons: DaemonFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "damaged"
    data_dir.mkdir()
    (data_dir / "identity.key").write_bytes(b"\x00not a key")
    (data_dir / "identity.key").chmod(0o600)
    daemon = daemons.start(data_dir=data_dir, wait=False)
    assert daemon.proc.wait(timeout=60) == 2
    assert "identity file" in daemon.stderr() and "damaged" in daemon.stderr()
    assert (data_dir / "identity.key").read_bytes() == b"\x00not a key"

    (data_dir / "identity.key").unlink()
    (data_dir / "garden.sqlite3").write_bytes(b"this is not sqlite" * 100)
    daemon = daemons.start(data_dir=data_dir, wait=False)
    assert daemon.proc.wait(timeout=60) == 2
    assert "is not a readable garden database" in daemon.stderr()
    assert (data_dir / "garden.sqlite3").read_bytes() == b"this is not sqlite" * 100
    assert "Traceback" not in daemon.stderr()
