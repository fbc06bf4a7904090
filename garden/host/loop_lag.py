"""How late the daemon's event loop runs: the measure of "nothing blocks the loop".

Everything time-bound in a peer lives on one event loop: the HTTP port (and so Pause), lease renewals,
DHT reads, block RPCs. Work that holds the loop (a model load, a large write, a hash of a big file) delays
all of them at once, and lost leases follow. A probe sleeps ``PERIOD`` seconds again and again; how much
later than asked it wakes is the loop's lag at that moment. ``/metrics`` shows the lags as a histogram
(``garden_event_loop_lag_seconds``). And a watchdog thread logs where the loop was when it is held past
``STALL``: the one line that turns "the port is slow" into the call to fix.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import sys
import threading
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
            target=self._watch, args=(loop, threading.get_ident(), ended), name="garden-loop-watch", daemon=True
        )
        watchdog.start()
        try:
            while not stop.is_set():
                asked = loop.time()
                await asyncio.sleep(self.period)
                self.observe(loop.time() - asked - self.period)
        finally:
            ended.set()

    def _watch(self, loop: asyncio.AbstractEventLoop, loop_thread: int, ended: threading.Event) -> None:
        """From a thread of its own: ask the loop to run a no-op; when it has not run it after ``STALL``, log
        the loop thread's stack as it is at that moment, once per stall."""
        while not ended.wait(self.period):
            ran = threading.Event()
            try:
                loop.call_soon_threadsafe(ran.set)
            except RuntimeError:  # the loop is closed: the daemon is stopping
                return
            if ran.wait(STALL):
                continue
            frame = sys._current_frames().get(loop_thread)
            where = "".join(traceback.format_stack(frame)[-6:]) if frame is not None else "(unknown)\n"
            while not ran.wait(1.0):
                if ended.is_set():
                    return
            logger.warning("the event loop was held for over %.2f s; it was at:\n%s", STALL, where.rstrip())

    def snapshot(self) -> LagSnapshot:
        cumulative, running = [], 0
        for seen in self._counts[:-1]:
            running += seen
            cumulative.append(running)
        return LagSnapshot(BUCKETS, tuple(cumulative), self._count, self._total, self._worst)
