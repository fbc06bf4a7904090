"""How late the daemon's event loop runs: the measure of "nothing blocks the loop".

Everything time-bound in a peer lives on one event loop: the HTTP port (and so Pause), lease renewals,
DHT reads, block RPCs. Work that holds the loop (a model load, a large write, a hash of a big file) delays
all of them at once, and lost leases follow. A probe sleeps ``PERIOD`` seconds again and again; how much
later than asked it wakes is the loop's lag at that moment. ``/metrics`` shows the lags as a histogram
(``garden_event_loop_lag_seconds``). And a watchdog thread logs where the loop was when it is held past
``STALL``: the one line that turns "the port is slow" into the call to fix.

A stall counts the loop's own time only. The time its thread was ready to run but waited for a CPU (Linux's
schedstat, as ``api/timing.py``'s ``wait``) is the machine's: on a busy home PC the owner's programs, on a
2-core test machine the other test's daemons. A wait of 0.6 s for a CPU with 0.07 s of the loop's own is
logged at debug, apart; 0.3 s of the loop's own is the warning, with where the loop was.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from garden.lifecycle import Service

logger = logging.getLogger(__name__)

PERIOD = 0.25
"""Seconds between probes. A stall is seen when it covers a probe's wake-up time, so every stall longer than
the period is seen, and a shorter one with a chance of its length over the period. 0.25 s sees every stall
that matters (the lag budget is 0.25 s) and costs an idle peer nothing measurable (probing 20 times a second
doubled its idle CPU, 0.5 % to 1.1 % of a core)."""
STALL = 0.25
"""Seconds the loop may be held before the watchdog logs where it is (the lag budget)."""
SCHEDSTAT = "/proc/self/task/{tid}/schedstat"


def cpu_wait_s(native_id: int | None = None) -> float:
    """Seconds a thread of this process (the calling one by default; ``threading.get_native_id()``'s number)
    has waited for a CPU while ready to run, since it started: the second field of Linux's schedstat. 0.0 where
    the system does not count it."""
    try:
        with open(SCHEDSTAT.format(tid=threading.get_native_id() if native_id is None else native_id), "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the histogram's buckets; the last, +Inf, is implied."""


@dataclass(frozen=True)
class LagSnapshot:
    """The lags seen since the start: ``counts[i]`` probes at most ``BUCKETS[i]`` late (cumulative, as
    Prometheus wants them), ``count`` probes in all, ``total`` seconds of lag, ``worst`` the longest."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    total: float
    worst: float

    def quantile(self, q: float) -> float:
        """The bucket bound under which a share ``q`` of the probes fell (inf when above the last bound)."""
        need = q * self.count
        for bound, seen in zip(self.buckets, self.counts, strict=True):
            if seen >= need:
                return bound
        return float("inf")


def _probe(when: list[float], ran: threading.Event) -> None:
    """The watchdog's no-op, run by the loop: notes when it ran and the loop thread's CPU wait by then."""
    when.extend((time.monotonic(), cpu_wait_s()))
    ran.set()


class LoopLag(Service):
    """Probes the running loop's lag for as long as the daemon runs."""

    name = "loop lag"

    def __init__(self, period: float = PERIOD):
        self.period = period
        self._counts = [0] * (len(BUCKETS) + 1)  # per bucket, the last one past every bound
        self._count, self._total, self._worst = 0, 0.0, 0.0

    def observe(self, lag: float) -> None:
        lag = max(0.0, lag)
        self._counts[bisect.bisect_left(BUCKETS, lag)] += 1
        self._count += 1
        self._total += lag
        self._worst = max(self._worst, lag)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        ended = threading.Event()
        watchdog = threading.Thread(
            target=self._watch,
            args=(loop, threading.get_ident(), threading.get_native_id(), ended),
            name="garden-loop-watch",
            daemon=True,
        )
        watchdog.start()
        try:
            while not stop.is_set():
                asked = loop.time()
                await asyncio.sleep(self.period)
                self.observe(loop.time() - asked - self.period)
        finally:
            ended.set()

    def _watch(
        self, loop: asyncio.AbstractEventLoop, loop_thread: int, loop_native: int, ended: threading.Event
    ) -> None:
        """From a thread of its own: ask the loop to run a no-op; when it has not run it after ``STALL``, take the
        loop thread's stack as it is at that moment, and once the no-op ran, log it unless most of the time was the
        machine's (the module's docstring)."""
        while not ended.wait(self.period):
            ran = threading.Event()
            when: list[float] = []
            asked, waited = time.monotonic(), cpu_wait_s(loop_native)
            try:
                loop.call_soon_threadsafe(_probe, when, ran)
            except RuntimeError:  # the loop is closed: the daemon is stopping
                return
            if ran.wait(STALL):
                continue
            frame = sys._current_frames().get(loop_thread)
            where = "".join(traceback.format_stack(frame)[-6:]) if frame is not None else "(unknown)\n"
            while not ran.wait(1.0):
                if ended.is_set():
                    return
            # A wait under way when the probe was asked is not in ``waited`` yet (Linux adds a wait when it ends),
            # so ``cpu`` may count some from before: capped at ``held``, it blames the machine for no more than all.
            held = when[0] - asked
            cpu = min(held, max(0.0, when[1] - waited))
            if held - cpu > STALL:
                logger.warning(
                    "the event loop was held for over %.2f s (%.2f s, %.2f s of it waiting for a CPU); it was at:\n%s",
                    STALL, held, cpu, where.rstrip(),
                )  # fmt: skip
            else:
                # debug: a machine its owner keeps busy would write this every second
                logger.debug("the event loop waited %.2f s, %.2f s of it for a CPU: the machine was busy", held, cpu)

    def snapshot(self) -> LagSnapshot:
        cumulative, running = [], 0
        for seen in self._counts[:-1]:
            running += seen
            cumulative.append(running)
        return LagSnapshot(BUCKETS, tuple(cumulative), self._count, self._total, self._worst)
