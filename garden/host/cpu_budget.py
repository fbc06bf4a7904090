"""``--max-cpu``: hold a peer's whole process tree (the daemon, its p2pd, its trainer
workers) to a share of the machine.

Thread counts alone cannot do it: one torch thread is one full core, which on a 2-core machine is 50 %
already, before the DHT, p2pd and the event loop take theirs. So the work that can wait (a decoding
step of shaking, a training step) asks :meth:`CpuBudget.wait` first, and waits while the tree has spent
more than its share: a token bucket, refilled at ``cap x cores`` core-seconds per second, drained by the
CPU time psutil reports for every process of the tree. The long-run average cannot exceed the cap by
more than the bucket's size over the window, whatever runs unthrottled beside the work.

Every process that throttles work (the daemon and each trainer worker) runs its own budget over the
same tree, rooted at the daemon: they see the same spending and hold back together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import psutil

logger = logging.getLogger(__name__)

SAMPLE_PERIOD = 0.1
"""Seconds between readings of the tree's CPU times."""
BURST_SECONDS = 0.3
"""The bucket holds this many seconds of the cap: short bursts pass, the average stays under the cap."""
WAIT_STEP = 0.02
"""Seconds a held caller sleeps between looks at the bucket."""


class TreeCpu:
    """CPU seconds spent by a process and all its descendants since the first reading. Processes that
    exit take their times with them, so only each live process's growth is added up."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self._seen: dict[int, float] = {}
        self.total = 0.0

    def read(self) -> float:
        """Seconds spent since the previous call (0.0 the first time for each process)."""
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        spent = 0.0
        now_seen: dict[int, float] = {}
        for proc in procs:
            try:
                times = proc.cpu_times()
                used = times.user + times.system
            except psutil.Error:
                continue
            key = proc.pid
            previous = self._seen.get(key)
            if previous is not None and used >= previous:
                spent += used - previous
            now_seen[key] = used
        self._seen = now_seen
        self.total += spent
        return spent


class CpuBudget:
    """:param max_fraction: share of the whole machine (0.5 is half of every core), None: no cap
    :param root_pid: the tree to account for (the daemon's pid)"""

    def __init__(self, max_fraction: float | None, root_pid: int, cores: int | None = None):
        if max_fraction is not None and not 0 < max_fraction <= 1:
            raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
        self.max_fraction = max_fraction
        self.cores = cores or psutil.cpu_count() or 1
        self.tree = TreeCpu(root_pid)
        self._rate = (max_fraction or 1.0) * self.cores  # core-seconds per second
        self._size = self._rate * BURST_SECONDS
        self._tokens = self._size
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._history: deque[tuple[float, float]] = deque(maxlen=600)  # (monotonic, tree total)
        self.held_s = 0.0  # seconds callers spent waiting, for /status

    @property
    def enabled(self) -> bool:
        return self.max_fraction is not None

    def prime(self) -> None:
        """Start counting from now; :meth:`sample` is then called every ``SAMPLE_PERIOD`` by the governor's
        sampling thread (the one thread that samples the budget and the idle watch)."""
        with self._lock:
            self.tree.read()
            self._last = time.monotonic()

    def sample(self) -> None:
        with self._lock:
            spent = self.tree.read()
            now = time.monotonic()
            self._tokens = min(self._size, self._tokens + self._rate * (now - self._last) - spent)
            self._last = now
            self._history.append((now, self.tree.total))

    def over(self) -> bool:
        if not self.enabled:
            return False
        if time.monotonic() - self._last > SAMPLE_PERIOD:
            # the sampling thread is late (a busy thread holding the GIL starves it): read here, so that
            # work never runs long on a stale reading
            self.sample()
        with self._lock:
            return self._tokens < 0

    def wait(self, give_up: Callable[[], bool] | None = None, limit: float = 30.0) -> float:
        """Block while the tree is over its share; returns the seconds waited. Returns early when
        ``give_up()`` becomes true (a pause, a stop) or after ``limit`` seconds (never a deadlock)."""
        if not self.enabled:
            return 0.0
        started = time.monotonic()
        while self.over() and time.monotonic() - started < limit:
            if give_up is not None and give_up():
                break
            time.sleep(WAIT_STEP)
        waited = time.monotonic() - started
        self.held_s += waited
        return waited

    def usage(self, window: float = 10.0) -> float | None:
        """The tree's share of the machine over the last ``window`` seconds (None before two readings)."""
        with self._lock:
            if len(self._history) < 2:
                return None
            now, total = self._history[-1]
            then, before = next(((t, v) for t, v in self._history if now - t <= window), self._history[0])
        if now <= then:
            return None
        return (total - before) / (now - then) / self.cores


WORK_NICENESS = 10
"""How much lower than the daemon's own threads the work threads run (Linux nice, per thread)."""


def lower_this_thread() -> None:
    """Run the calling thread, and the torch threads it starts, at ``WORK_NICENESS`` below the process: when
    the CPU is short, the event loop (the HTTP port, Pause, lease renewals) and the owner's own programs go
    first. Linux schedules threads one by one and a new thread inherits its creator's niceness, so the
    intra-op threads torch starts for this thread's work are lowered too. Elsewhere it does nothing."""
    import os

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORK_NICENESS))
    except (AttributeError, OSError) as e:  # not Linux, or not allowed: the work runs at the daemon's priority
        logger.debug("could not lower the work thread's priority: %s", e)
