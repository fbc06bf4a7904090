"""The event loop's lag, as ``/metrics`` shows it: a call that holds the loop shows up, an idle loop does not."""

from __future__ import annotations

import asyncio
import time

from garden.host.loop_lag import BUCKETS, LoopLag


def test_buckets_are_cumulative_and_quantiles_read_them() -> None:
    lag = LoopLag()
    for seconds in (0.001, 0.002, 0.03, 0.3, 20.0):
        lag.observe(seconds)
    lag.observe(-0.001)  # a clock that woke early counts as no lag
    snap = lag.snapshot()
    assert snap.count == 6 and snap.worst == 20.0 and abs(snap.total - 20.333) < 1e-9
    assert dict(zip(snap.buckets, snap.counts, strict=True))[0.005] == 3
    assert dict(zip(snap.buckets, snap.counts, strict=True))[0.05] == 4
    assert snap.counts[-1] == 5 and snap.buckets == BUCKETS  # 20 s is past the last bound: only in +Inf
    assert snap.quantile(0.5) == 0.005 and snap.quantile(0.8) == 0.5 and snap.quantile(1.0) == float("inf")


async def test_a_call_that_holds_the_loop_is_seen() -> None:
    lag = LoopLag(period=0.01)
    stop = asyncio.Event()
    probe = asyncio.create_task(lag.run(stop))
    await asyncio.sleep(0.2)
    quiet = lag.snapshot()
    time.sleep(0.3)  # what a model load on the loop would do
    await asyncio.sleep(0.05)
    stop.set()
    await probe
    held = lag.snapshot()
    assert quiet.count >= 5 and quiet.worst < 0.25
    assert held.worst >= 0.29
    assert held.count - held.counts[BUCKETS.index(0.25)] >= 1  # one probe past 250 ms
