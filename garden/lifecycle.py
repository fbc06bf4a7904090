"""The one lifecycle every long-running service of a peer shares: start, run until stopped, close.

The Gardener builds every service fully before any of them starts, then its supervisor
(``garden.daemon.supervisor``) starts them in order, runs them until the stop event, and closes them in the
reverse order. A service overrides what it needs; the defaults do nothing, so a service with no
background loop (the content transfer) or nothing to release (the peer directory) stays short.
Level 0: any package may define a service, and any child process may tie its life to its parent's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import psutil

PARENT_WATCH_PERIOD = 0.5
"""Seconds between checks that a child process's parent still lives."""


class Service:
    """Base of the daemon's services. ``name`` appears in task names and in the log when one fails."""

    name: str = "service"

    async def start(self) -> None:
        """Acquire what the service needs on the event loop (P2P handlers, threads); raise to abort start-up."""

    async def run(self, stop: asyncio.Event) -> None:
        """The service's background work; returns once ``stop`` is set (at once when it has none)."""

    async def close(self) -> None:
        """Release what ``start`` acquired; called once, after every service's ``run`` returned or timed out."""


def watch_parent(parent_pid: int) -> None:
    """Tie this process to ``parent_pid``: once the parent is gone (killed, crashed), stop this process's own
    children and exit. Every child garden starts (trainer workers, their DHT processes and averagers) runs
    this, so no process outlives the daemon, and ``p2pd`` is never orphaned (the daemon's own ``p2pd``, its direct
    child, the kernel stops: ``garden.net.p2pd_patch.launch``)."""
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="garden-parent-watch", daemon=True).start()


STOP_WITH_ENV = "GARDEN_STOP_WITH"
"""A process id: a daemon started with it in its environment stops (as on SIGTERM) once that process is gone.
``garden demo`` starts its peers with it, in sessions of their own: killed outright, the demo leaves none behind."""


def stop_with(pid: int) -> None:
    """Send this process SIGTERM once ``pid`` is gone (its orderly stop: a daemon's store and children are
    closed as on Ctrl+C)."""

    def watch() -> None:
        while psutil.pid_exists(pid) and _alive(pid):
            time.sleep(PARENT_WATCH_PERIOD)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="garden-stop-with", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_WATCH_PERIOD)
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=3)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(1)
