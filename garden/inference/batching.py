"""Work of concurrent sessions, run one pass at a time on one worker thread, with waiting calls merged.

A server with several clients receives their one-token steps at nearly the same time; a peer generating
several answers needs the LM head for each of them at nearly the same time. Run one by one, each call reads
all of its weights (the layers' or the head's), which is what a CPU pass spends its time on; run together,
they read them once (8 decode steps of SmolLM2's layers cost 1.7x one step, not 8x). So such calls go
through a :class:`PassQueue`: while a pass runs, the calls that arrive wait, and the next pass takes every
waiting call of the same kind at once (continuous batching, as in vLLM, without padding). A lone caller
never waits for a batch to fill: a call that finds the queue idle runs at once.

Calls that cannot merge (a prompt's many tokens, a replay after a fail-over) run alone, in their turn. The
passes run on one worker thread, so the event loop never waits for one and two passes never compete for the
same cores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")

RECENT_S = 1.0
"""A caller that called within this many seconds is expected to call again soon (see ``linger_s``)."""


@dataclass
class BatchStats:
    """:ivar passes: passes run
    :ivar merged_calls: calls run by passes that could merge them (their passes: ``merged_passes``)
    :ivar largest_batch: the most calls one pass ran"""

    passes: int = 0
    merged_calls: int = 0
    merged_passes: int = 0
    largest_batch: int = 0


@dataclass(eq=False)  # calls are told apart by identity: their items may hold tensors
class _Call(Generic[Item]):
    item: Item
    kind: Hashable | None
    done: asyncio.Future[Any]


@dataclass
class PassQueue(Generic[Item]):
    """Runs calls on ``executor`` (give it one worker): ``run_one(item)`` alone, or ``run_many(items)`` for
    at most ``max_batch`` waiting calls of the same ``kind(item)`` (None: never merged), which must return
    the results in order."""

    executor: Executor
    run_one: Callable[[Item], Any]
    run_many: Callable[[list[Item]], list[Any]]
    kind: Callable[[Item], Hashable | None]
    max_batch: int = 16
    linger_s: float = 0.0
    stats: BatchStats = field(default_factory=BatchStats)
    _waiting: list[_Call[Item]] = field(default_factory=list)
    _running: list[_Call[Item]] = field(default_factory=list)
    _worker: asyncio.Task[None] | None = None
    _recent: dict[Hashable, dict[Hashable, float]] = field(default_factory=dict)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, item: Item, caller: Hashable | None = None) -> Any:
        """The result of ``item``'s call, run alone or with others that wait too. ``caller`` (a session)
        lets the queue linger for the callers that called with this kind of item in the last second."""
        call = _Call(item, self.kind(item), asyncio.get_running_loop().create_future())
        if caller is not None and call.kind is not None:
            self._recent.setdefault(call.kind, {})[caller] = time.monotonic()
        self._waiting.append(call)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="garden-pass-queue")
        return await call.done

    def forget(self, caller: Hashable) -> None:
        """``caller`` will not call again (its session closed): nobody lingers for it."""
        for recent in self._recent.values():
            recent.pop(caller, None)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._fail_all()

    def _fail_all(self) -> None:
        for call in [*self._running, *self._waiting]:
            if not call.done.done():
                call.done.set_exception(RuntimeError("the pass queue stopped"))
        self._running, self._waiting = [], []

    def _next_pass(self) -> list[_Call[Item]]:
        self._waiting = [c for c in self._waiting if not c.done.done()]  # a cancelled caller's call: not run
        if not self._waiting:
            return []
        head = self._waiting[0]
        batch = [head] if head.kind is None else [c for c in self._waiting if c.kind == head.kind][: self.max_batch]
        taken = {id(c) for c in batch}
        self._waiting = [c for c in self._waiting if id(c) not in taken]
        return batch

    async def _drain(self) -> None:
        try:
            await self._passes()
        finally:  # stopped, or a fault of this queue: no caller waits forever
            self._fail_all()

    def _expected(self, kind: Hashable) -> int:
        recent = self._recent.get(kind, {})
        now = time.monotonic()
        for caller in [c for c, at in recent.items() if now - at > RECENT_S]:
            del recent[caller]
        return min(len(recent), self.max_batch)

    async def _linger(self) -> None:
        """Wait up to ``linger_s`` for the recent callers of the first waiting call's kind to call too."""
        if self.linger_s <= 0 or not self._waiting or self._waiting[0].kind is None:
            return
        kind = self._waiting[0].kind
        expected = self._expected(kind)
        deadline = time.monotonic() + self.linger_s
        while sum(c.kind == kind for c in self._waiting) < expected and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break

    async def _passes(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._linger()
            batch = self._running = self._next_pass()
            if not batch:
                return
            items = [c.item for c in batch]
            try:
                if len(batch) == 1:
                    results = [await loop.run_in_executor(self.executor, self.run_one, items[0])]
                else:
                    results = await loop.run_in_executor(self.executor, self.run_many, items)
            except Exception as e:  # noqa: BLE001 - each call's caller reports it
                for call in batch:
                    if not call.done.done():
                        call.done.set_exception(e)
                continue
            self.stats.passes += 1
            if batch[0].kind is not None:
                self.stats.merged_passes += 1
                self.stats.merged_calls += len(batch)
                self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            for call, result in zip(batch, results, strict=True):
                if not call.done.done():  # its caller may have gone (a cancelled RPC)
                    call.done.set_result(result)
