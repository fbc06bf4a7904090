"""``garden run``: the daemon process from start to clean exit.

Order matters. Everything that can fail for a user-fixable reason (data dir in use, HTTP port taken,
bad join address) is checked before anything long-running starts, so the user sees one clear line
and no traceback. The DHT starts before the event loop (it forks). On SIGINT/SIGTERM the daemon
stops accepting requests, says goodbye to the swarm, stops the DHT and its ``p2pd``, and exits 0
within ``STOP_TIMEOUT``; a second signal skips the politeness, kills the children and exits at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import psutil

from garden.daemon.http_server import HttpPortError, HttpServer, bind_http_socket, is_loopback_host, make_server
from garden.config import GardenSettings
from garden.daemon.gardener import Gardener
from garden.host.logs import log_file, setup_logging
from garden.daemon.datadir import DataDir, DataDirBusyError, DataDirLock
from garden.net.identity import IdentityError
from garden.net.swarm import SwarmError
from garden.store import StoreError
from garden.mission.shaking import sampling_in_progress
from garden.lifecycle import STOP_WITH_ENV, stop_with

logger = logging.getLogger("garden")

STOP_TIMEOUT = 8.0
"""Seconds a clean stop may take before the runner forces it (a stop must finish within 10 s)."""
SWARM_CHECK_PERIOD = 1.0
"""Seconds between checks that the DHT node and its p2pd still run."""
EXIT_USAGE = 2  # the daemon could not start for a reason the user can fix


def say(message: str, error: bool = False, warning: bool = False) -> None:
    """A line for the person at the terminal: news on stdout, errors and warnings on stderr (with the logs)."""
    prefix = "error: " if error else "warning: " if warning else ""
    print(f"garden: {prefix}{message}", file=sys.stderr if error or warning else sys.stdout, flush=True)


AppFactory = Callable[[Gardener], Any]
"""Builds the ASGI app of the HTTP port for a gardener. Passed in by the ``garden`` command: the HTTP API sits
above the daemon (it reads the gardener's services), so the daemon never imports it."""


def run(settings: GardenSettings, create_app: AppFactory) -> int:
    code = _run(settings, create_app)
    if sampling_in_progress():
        # A shard was being sampled when the stop came: its thread is inside torch, and interpreter
        # shutdown stopping it there aborts the process (SIGABRT). Everything is closed by now (the DHT,
        # the store, the lock), and the unfinished shard is lost by design: leave without finalising.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    # the interpreter's last collections walk every object torch and transformers made: seconds on a loaded
    # machine, after the stop said "stopped" (a test saw the exit take 10 s). Nothing is left to collect that
    # matters; the objects are kept out of those walks.
    gc.freeze()
    return code


def _run(settings: GardenSettings, create_app: AppFactory) -> int:
    setup_logging(settings.log_level)  # stderr only until the data dir is ours: a refused second daemon
    # must not write into the running one's log
    data_dir = DataDir(settings.data_dir)
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except DataDirBusyError as e:
        say(str(e), error=True)
        return EXIT_USAGE
    setup_logging(settings.log_level, log_file(settings.data_dir).parent)
    sock = None
    gardener: Gardener | None = None
    try:
        sock = bind_http_socket(settings.http_host, settings.http_port)
        data_dir.new_http_token()  # before the app reads it: a token from an earlier start is void
        if not is_loopback_host(settings.http_host):
            say(
                f"the local HTTP port listens on {settings.http_host}, beyond this machine: anyone who can reach it "
                "and holds the token (in the data dir's http-token file) can read this peer's status, pause it, "
                "generate text, and launch or cancel missions in its name; every request but /health needs the token",
                warning=True,
            )
        say("starting the swarm" if not settings.join else f"joining the swarm via {len(settings.join)} peer(s)")
        gardener = Gardener.open(settings)
        return asyncio.run(_serve(gardener, settings, sock, create_app))
    except (HttpPortError, SwarmError, IdentityError, StoreError) as e:
        say(str(e), error=True)
        return EXIT_USAGE
    finally:
        if gardener is not None:
            gardener.close()
        data_dir.clear_runtime()
        if sock is not None:
            sock.close()
        lock.release()


async def _serve(gardener: Gardener, settings: GardenSettings, sock: socket.socket, create_app: AppFactory) -> int:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals_seen: list[int] = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            say(f"{signal.Signals(signum).name} received, stopping (again to force)")
            stop_requested.set()
        else:
            _force_exit(gardener)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    watched = os.environ.get(STOP_WITH_ENV, "")
    if watched.isdigit():
        stop_with(int(watched))

    server = make_server(create_app(gardener), settings.log_level)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="garden-http")
    await gardener.start()
    port = sock.getsockname()[1]
    url = f"http://{_url_host(settings.http_host)}:{port}"
    _announce_ready(gardener, url, gardener.data_dir.read_http_token())

    stopper = asyncio.create_task(stop_requested.wait())
    watcher = asyncio.create_task(_watch_swarm(gardener))
    done, _ = await asyncio.wait({serving, stopper, watcher}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if watcher in done:
        say(f"{watcher.result()}; this peer has left the swarm and stops (restart it to rejoin)", error=True)
        exit_code = 1
    elif serving in done and not stop_requested.is_set():
        say("the HTTP server stopped unexpectedly; shutting down", error=True)
        exit_code = 1
    for task in (stopper, watcher):
        task.cancel()
    try:
        await asyncio.wait_for(_stop(gardener, server, serving), timeout=STOP_TIMEOUT)
    except TimeoutError:
        logger.warning("clean stop took over %.0f s; stopping the swarm now", STOP_TIMEOUT)
    say("stopped")
    return exit_code


async def _watch_swarm(gardener: Gardener) -> str:
    """Returns (ending the daemon) when the swarm connection is gone for good."""
    while True:
        await asyncio.sleep(SWARM_CHECK_PERIOD)
        failure = await asyncio.to_thread(gardener.swarm.failure)  # psutil reads /proc: not on the loop
        if failure is not None:
            return failure


async def _stop(gardener: Gardener, server: HttpServer, serving: asyncio.Task) -> None:
    server.should_exit = True
    await gardener.stop()
    await serving


def _announce_ready(gardener: Gardener, url: str, token: str | None) -> None:
    join = _best_maddr(gardener.addresses)
    if join:
        say(f"peer {gardener.peer_id} is up; others join with: garden run --join {join}")
    else:
        say(f"peer {gardener.peer_id} is up (client mode: others cannot join through this peer)")
    say(f"local HTTP port: {url} (status: {url}/status, API docs: {url}/docs)")
    if not is_loopback_host(gardener.settings.http_host):
        say(f"dashboard (this link carries the token once, then a cookie does): {url}/?token={token}")
    gardener.data_dir.write_runtime(
        {"pid": os.getpid(), "url": url, "peer_id": gardener.peer_id, "addresses": gardener.addresses}
    )


def _best_maddr(addresses: list[str]) -> str | None:
    """The address most likely to work from another machine: a routable IPv4 one, else loopback."""

    def rank(maddr: str) -> int:
        if "/ip4/127." in maddr or "/ip6/::1/" in maddr:
            return 2
        return 0 if "/ip4/" in maddr else 1

    return min(addresses, key=rank) if addresses else None


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _force_exit(gardener: Gardener) -> None:
    """Second signal: kill our own children (the DHT node's p2pd), by PID, and leave now."""
    say("forced stop")
    for pid in gardener.child_pids():
        try:
            parent = psutil.Process(pid)
            for proc in parent.children(recursive=True) + [parent]:
                proc.kill()
        except psutil.Error:
            pass
    gardener.data_dir.clear_runtime()
    os._exit(130)
