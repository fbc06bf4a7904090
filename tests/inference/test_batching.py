"""The pass queue that merges concurrent sessions' calls (``garden.inference.batching``): waiting calls of
one kind share a pass, others never do, a lone call does not wait, a cancelled call is not run, a failed
pass fails only its own calls, and a stopped queue leaves no caller waiting."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from garden.inference.batching import PassQueue


class Recorder:
    """``run_one``/``run_many`` that record their passes; ``gate`` holds the first pass until released."""

    def __init__(self) -> None:
        self.passes: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def one(self, item: int) -> int:
        self.gate.wait(5)
        if item < 0:
            raise ValueError("a bad item")
        self.passes.append([item])
        return item * 10

    def many(self, items: list[int]) -> list[int]:
        self.gate.wait(5)
        if any(i < 0 for i in items):
            raise ValueError("a bad item")
        self.passes.append(list(items))
        return [i * 10 for i in items]


@pytest.fixture
def executor() -> ThreadPoolExecutor:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def queue(rec: Recorder, executor: ThreadPoolExecutor, **kw: float) -> PassQueue[int]:
    # even items merge; odd ones (a prompt, say) always run alone
    return PassQueue(executor, rec.one, rec.many, lambda i: "even" if i % 2 == 0 else None, max_batch=3, **kw)


async def test_waiting_calls_of_one_kind_share_a_pass(executor: ThreadPoolExecutor) -> None:
    rec = Recorder()
    q = queue(rec, executor)
    rec.gate.clear()
    first = asyncio.create_task(q.run(2))
    await asyncio.sleep(0.05)  # the first pass runs (held at the gate); the rest wait behind it
    rest = [asyncio.create_task(q.run(i)) for i in (4, 5, 6, 8, 10)]
    await asyncio.sleep(0.05)
    rec.gate.set()
    assert await first == 20 and [await t for t in rest] == [40, 50, 60, 80, 100]
    # the lone first call ran at once; then 3 evens (max_batch), the odd alone in its turn, then the last even
    assert rec.passes == [[2], [4, 6, 8], [5], [10]]
    assert q.stats.largest_batch == 3 and q.stats.merged_calls == 5 and q.stats.passes == 4


async def test_a_lone_call_does_not_linger_but_recent_callers_are_awaited(executor: ThreadPoolExecutor) -> None:
    rec = Recorder()
    q = queue(rec, executor, linger_s=0.5)
    started = time.monotonic()
    assert await q.run(2, caller="a") == 20
    assert time.monotonic() - started < 0.3  # nobody else called lately: no wait
    # two sessions called lately: the first of their next calls waits for the other's, and they share a pass
    await q.run(4, caller="b")
    a = asyncio.create_task(q.run(6, caller="a"))
    await asyncio.sleep(0.1)
    b = asyncio.create_task(q.run(8, caller="b"))
    assert (await a, await b) == (60, 80)
    assert rec.passes[-1] == [6, 8]
    # a forgotten caller (its session closed) is not awaited
    q.forget("b")
    started = time.monotonic()
    assert await q.run(10, caller="a") == 100
    assert time.monotonic() - started < 0.3


async def test_cancelled_and_failed_calls(executor: ThreadPoolExecutor) -> None:
    rec = Recorder()
    q = queue(rec, executor)
    rec.gate.clear()
    first = asyncio.create_task(q.run(2))
    await asyncio.sleep(0.05)
    gone = asyncio.create_task(q.run(4))
    bad = asyncio.create_task(q.run(-2))
    good = asyncio.create_task(q.run(6))
    await asyncio.sleep(0.05)
    gone.cancel()  # its caller left before its pass: not run
    await asyncio.sleep(0.01)
    rec.gate.set()
    assert await first == 20
    with pytest.raises(ValueError, match="a bad item"):  # the pass of -2 and 6 failed: both callers hear it
        await bad
    with pytest.raises(ValueError):
        await good
    assert await q.run(8) == 80  # and the queue goes on
    assert [4] not in rec.passes and all(4 not in p for p in rec.passes)


async def test_a_stopped_queue_leaves_no_caller_waiting(executor: ThreadPoolExecutor) -> None:
    rec = Recorder()
    q = queue(rec, executor)
    rec.gate.clear()
    calls = [asyncio.create_task(q.run(i)) for i in (2, 4, 6)]
    await asyncio.sleep(0.05)
    q.close()
    rec.gate.set()
    for call in calls:
        with pytest.raises((RuntimeError, asyncio.CancelledError)):
            await asyncio.wait_for(call, 2)
