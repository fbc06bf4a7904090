"""Real ``garden run`` processes for tests, on 127.0.0.1, with their descendants tracked by PID.

Every daemon a test starts is stopped at teardown, and the test fails if any process it spawned
(``p2pd``, the sampling process, torch's shm manager) outlives it. Only processes this module started, or
their descendants recorded by PID and create time, are ever signalled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class TrackedProcess:
    """A process this test run started (``proc``) and its descendants, recorded by PID and create time so
    that only they are ever signalled, and so that one that outlives its parent is seen."""

    proc: subprocess.Popen
    descendants: dict[int, float]

    def record_descendants(self) -> None:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    self.descendants[child.pid] = child.create_time()
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def alive_descendants(self) -> list[psutil.Process]:
        alive = []
        for pid, created in self.descendants.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                pass
        return alive


@dataclass
class Daemon(TrackedProcess):
    proc: subprocess.Popen
    data_dir: Path
    stdout_path: Path
    stderr_path: Path
    url: str = ""
    peer_id: str = ""
    addresses: list[str] = field(default_factory=list)
    descendants: dict[int, float] = field(default_factory=dict)  # pid -> create_time
    via: Any = None  # runs the HTTP calls in the daemon's network namespace (harness.netns.NatWorld.caller)

    @property
    def join_addr(self) -> str:
        return self.addresses[0]

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self.via is not None:
            return self.via(httpx.request, method, self.url + path, **({"timeout": 30} | kwargs))
        return httpx.request(method, self.url + path, **({"timeout": 30} | kwargs))

    def peer_ids(self) -> set[str]:
        response = self.get("/peers")
        response.raise_for_status()
        return {peer["peer_id"] for peer in response.json()}

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def loop_stalls(self) -> list[str]:
        """The times its event loop was held past the lag budget by its own work (``garden.host.loop_lag``'s
        watchdog logs each, with where the loop was: the stack lines that follow are part of each entry; a wait
        for a CPU is logged apart, at debug)."""
        stalls: list[str] = []
        inside = False  # within a stall's entry: its stack's lines are indented
        for line in self.stderr().splitlines():
            if "the event loop was held" in line:
                stalls.append(line)
                inside = True
            elif inside and line.startswith(" "):
                stalls[-1] += "\n" + line
            else:
                inside = False
        return stalls

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def send(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.record_descendants()
            self.proc.send_signal(signum)

    def send_to_group(self, signum: int) -> None:
        """What Ctrl+C in a terminal does: signal every process in the daemon's process group."""
        self.record_descendants()
        for pid in [self.proc.pid, *self.descendants]:
            try:
                if os.getpgid(pid) == self.proc.pid:
                    os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal the daemon and wait; returns its exit code. Kills it (and fails loudly) past ``timeout``."""
        self.send(signum)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"daemon {self.peer_id} did not stop within {timeout} s after {signum}") from None

    def kill_all(self) -> None:
        self.record_descendants()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for proc in self.alive_descendants():
            try:
                proc.kill()
            except psutil.Error:
                pass

    def wait_children_gone(self, timeout: float = 5.0) -> list[psutil.Process]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            alive = self.alive_descendants()
            if not alive:
                return []
            time.sleep(0.1)
        return self.alive_descendants()


class DaemonFactory:
    """Starts daemons in ``base_dir``; ``close()`` stops them all and reports orphans."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.daemons: list[Daemon] = []
        self._count = 0

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GARDEN_")}
        env.update(
            PYTHONUNBUFFERED="1",
            XDG_CONFIG_HOME=str(self.base_dir / "xdg-config"),  # never read the developer's own config
            XDG_DATA_HOME=str(self.base_dir / "xdg-data"),
        )
        env.update(extra or {})
        return env

    def start(
        self,
        *args: str,
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
        announce_period: float | None = 1.0,
        wait: bool = True,
        host_maddr: str = "/ip4/127.0.0.1/tcp/0",
        netns: str | None = None,
        via: Any = None,
    ) -> Daemon:
        """A daemon with ``args``; in network namespace ``netns`` (``ip netns exec``: it replaces itself with the
        daemon, whose PID is the one tracked), its HTTP calls made through ``via`` there."""
        self._count += 1
        name = f"peer{self._count}"
        data_dir = data_dir or self.base_dir / name
        stdout_path = self.base_dir / f"{name}.out"
        stderr_path = self.base_dir / f"{name}.err"
        argv = [
            *(["ip", "netns", "exec", netns] if netns else []),
            sys.executable, "-m", "garden", "run",
            "--data-dir", str(data_dir),
            "--http-port", "0",
            "--host-maddr", host_maddr,
            *(["--announce-period", str(announce_period)] if announce_period else []),
            *args,
        ]  # fmt: skip
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            # a session (and process group) of its own, like a shell gives a command: see send_to_group()
            proc = subprocess.Popen(
                argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env(env), start_new_session=True
            )
        daemon = Daemon(proc=proc, data_dir=data_dir, stdout_path=stdout_path, stderr_path=stderr_path, via=via)
        self.daemons.append(daemon)
        if wait:
            self.wait_ready(daemon)
        return daemon

    def wait_ready(self, daemon: Daemon, timeout: float = START_TIMEOUT) -> Daemon:
        deadline = time.time() + timeout
        runtime = daemon.data_dir / "daemon.json"
        while time.time() < deadline:
            if daemon.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {daemon.proc.returncode}:\n{daemon.stdout()}\n{daemon.stderr()}"
                )
            try:
                info = json.loads(runtime.read_text())
            except (OSError, ValueError):
                info = None
            if info and info.get("pid") == daemon.proc.pid:
                daemon.url, daemon.peer_id, daemon.addresses = info["url"], info["peer_id"], info["addresses"]
                daemon.record_descendants()
                return daemon
            time.sleep(0.1)
        daemon.kill_all()
        raise AssertionError(f"daemon not ready in {timeout} s:\n{daemon.stdout()}\n{daemon.stderr()}")

    def close(self) -> list[str]:
        """Stop every daemon still running; return a description of each orphaned descendant."""
        for daemon in self.daemons:
            if daemon.proc.poll() is None:
                try:
                    daemon.stop()
                except AssertionError:
                    pass
        orphans = []
        for daemon in self.daemons:
            for proc in daemon.wait_children_gone():
                try:
                    orphans.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
                    proc.kill()
                except psutil.Error:
                    pass
        return orphans


def wait_until(predicate: Any, timeout: float, interval: float = 0.25, message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail with the last value after ``timeout``. Prints how
    long each wait took (pytest shows it with a failure, or with ``-s``): where a swarm test spends its time. It
    goes to stderr: a benchmark's stdout is its JSON alone."""
    began = time.time()
    deadline = began + timeout
    last: Any = None
    while time.time() < deadline:
        last = predicate()
        if last:
            print(f"[{time.strftime('%H:%M:%S')}] {message}: {time.time() - began:.1f} s", file=sys.stderr)
            return last
        time.sleep(interval)
    raise AssertionError(f"{message} not reached in {timeout} s (last value: {last!r})")


_POLLER = """
import json, sys, time, httpx
from pathlib import Path
url, stop, latencies, served = sys.argv[1], Path(sys.argv[2]), [], []
with httpx.Client(timeout=30) as client:
    while not stop.exists():
        began = time.monotonic()
        answer = client.get(url + "/health")
        answer.raise_for_status()
        latencies.append(time.monotonic() - began)
        served.append(float(answer.headers["server-timing"].split(",")[0].partition("app;dur=")[2]) / 1000)
        time.sleep(0.05)
print(json.dumps([latencies, served]))
"""


class HealthPoller:
    """Asks a daemon's ``/health`` every 50 ms, from a process of its own (the test's process may be busy
    serving or fetching), until :meth:`stop`, which returns every answer's time in seconds::

        with HealthPoller(daemon, tmp_path) as health:
            ...  # the load under test
        assert max(health.served) < 0.25

    ``latencies`` are the times the poller saw; ``served`` the daemon's own, from its ``Server-Timing`` header (its
    ``app`` time, which leaves out the time the daemon's event loop was ready to run but waited for a CPU): a bound
    on the daemon's work that the machine's other processes (the other test worker's daemons on a 2-core machine)
    do not move. (The daemon's own threads outside the loop, while they hold both CPUs, do not move it either;
    while they hold the GIL, they do.) Its event loop's stalls: :meth:`Daemon.loop_stalls`.
    """

    def __init__(self, daemon: Daemon, scratch: Path) -> None:
        self._stop_file = scratch / f"stop-polling-{daemon.proc.pid}"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _POLLER, daemon.url, str(self._stop_file)], stdout=subprocess.PIPE, text=True
        )
        self.latencies: list[float] = []
        self.served: list[float] = []

    def stop(self) -> list[float]:
        """End the polling and return the latencies; fails if the daemon stopped answering. Idempotent."""
        if self._proc.poll() is None or not self.latencies:
            self._stop_file.touch()
            try:
                out, _ = self._proc.communicate(timeout=60)
                self.latencies, self.served = (list(times) for times in json.loads(out))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.close()
                raise AssertionError("the /health poller failed (the daemon stopped answering?)") from None
        assert self.latencies, "the /health poller got no answer"
        return self.latencies

    def close(self) -> None:
        """Stop the poller without asking for its answers (a test that failed already)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def __enter__(self) -> HealthPoller:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.stop()
        else:
            self.close()


def printed_mission_id(stdout: str) -> str:
    """The mission id ``garden mission create`` prints on a line of its own (64 hex digits; a table's border
    line of its prompts can be 64 characters wide too)."""
    found = [line.strip() for line in stdout.splitlines() if re.fullmatch(r"[0-9a-f]{64}", line.strip())]
    assert len(found) == 1, stdout
    return found[0]
