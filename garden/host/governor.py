"""The good guest: one place that says whether this peer may work now, and how fast.

Three reasons to hold back, in order of strength:

* **paused** by the owner (``garden pause``, ``POST /pause``): shaking stops at the next decoding step and
  gives its lease back, trainers checkpoint their step and exit, and nothing starts again until
  ``garden resume`` or the end of ``--for``. The pause is kept in the store, so it survives a restart.
  The peer stays in the swarm (announces, relays, and serves layers unless the pause says otherwise).
* **held** in idle-only mode (``--when idle``) while the owner's own programs use the machine, or on
  battery: work waits where it is (a shard keeps its lease) and goes on when the machine is quiet.
* **throttled** by ``--max-cpu``: work waits between steps while the tree is over its share.

Work asks :meth:`Governor.hold` between steps (it blocks while held or throttled and returns True when
the work should stop because of a pause); the daemon's loops read :attr:`Governor.paused`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, Field

from garden.host.cpu_budget import SAMPLE_PERIOD, CpuBudget
from garden.host.idle import IdleConfig, IdleWatch
from garden.store import Store

logger = logging.getLogger(__name__)

PAUSE_META = "pause"
"""Store meta key of the owner's pause (a ``PauseState`` as JSON)."""
HOLD_LIMIT = 30.0
"""Longest :meth:`Governor.hold` waits for the CPU budget (a guard: the budget refills in well under a second)."""


class PauseState(BaseModel):
    """The owner's pause, as kept in the store and shown by ``/status``."""

    paused: bool = False
    since: float | None = Field(None, description="unix time the pause began")
    until: float | None = Field(None, description="unix time it ends by itself; None: until resumed")
    serving: bool = Field(False, description="layer serving is paused too (--pause-serving)")


@dataclass(frozen=True)
class GovernorSnapshot:
    """What the owner sees of the good guest (``/status``, the dashboard), read in one go.

    :param cpu: the share of the machine the peer's process tree used lately (with ``--max-cpu``), else None
    :param held_s: seconds work has waited for the CPU cap in all
    :param owner_load: with ``--when idle``: the share of the machine other programs use, else None
    """

    paused: bool
    pause: PauseState
    working: str
    cpu: float | None
    held_s: float
    owner_load: float | None


class Governor:
    """:param store: where the pause is kept
    :param max_cpu: share of the machine (0..1] the peer's tree may use, None: no cap
    :param idle: idle-only mode's settings, None: work whenever
    :param root_pid: the tree the cap and the idle watch account for (this daemon)"""

    def __init__(
        self,
        store: Store | None,
        max_cpu: float | None = None,
        idle: IdleConfig | None = None,
        root_pid: int | None = None,
    ):
        root = root_pid or os.getpid()
        self.store = store
        self.budget = CpuBudget(max_cpu, root)
        self.idle = IdleWatch(idle, root) if idle is not None else None
        self._pause = self._load()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []

    # --- the monitor ------------------------------------------------------------------------------------
    def start(self) -> Governor:
        if self._thread is None and (self.budget.enabled or self.idle is not None or self._pause.until):
            self.budget.prime()
            self._start_sampling()
        return self

    def _start_sampling(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="garden-governor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_PERIOD):
            if self.budget.enabled:
                self.budget.sample()
            if self.idle is not None:
                self.idle.sample()
            self._expire()

    def on_change(self, listener: Callable[[], None]) -> None:
        """``listener()`` is called (from any thread) when the pause begins or ends."""
        self._listeners.append(listener)

    # --- the owner's pause ----------------------------------------------------------------------------
    @property
    def pause_state(self) -> PauseState:
        self._expire()
        return self._pause

    @property
    def paused(self) -> bool:
        return self.pause_state.paused

    @property
    def serving_paused(self) -> bool:
        state = self.pause_state
        return state.paused and state.serving

    def pause(self, for_s: float | None = None, serving: bool = False) -> PauseState:
        now = time.time()
        if for_s is not None and not 0 < for_s <= 366 * 86400:
            raise ValueError(f"a pause lasts between 0 s and a year, not {for_s} s")
        self._set(PauseState(paused=True, since=now, until=now + for_s if for_s else None, serving=serving))
        if for_s:
            self._start_sampling()  # the pause ends by itself
        logger.info("paused by the owner%s", f" for {for_s:.0f} s" if for_s else "")
        return self._pause

    def resume(self) -> PauseState:
        if self._pause.paused:
            logger.info("resumed by the owner")
        self._set(PauseState())
        return self._pause

    def _expire(self) -> None:
        state = self._pause
        if state.paused and state.until is not None and time.time() >= state.until:
            logger.info("the pause ended (--for elapsed)")
            self._set(PauseState())

    def _set(self, state: PauseState) -> None:
        changed = state.paused != self._pause.paused
        self._pause = state
        if self.store is not None:
            self.store.set_meta(PAUSE_META, state.model_dump_json())
        if changed:
            for listener in self._listeners:
                try:
                    listener()
                except Exception:
                    logger.exception("pause listener failed")

    def _load(self) -> PauseState:
        raw = self.store.get_meta(PAUSE_META) if self.store is not None else None
        if not raw:
            return PauseState()
        try:
            return PauseState.model_validate_json(raw)
        except ValueError:
            logger.warning("the stored pause state is unreadable; starting unpaused")
            return PauseState()

    # --- for work -----------------------------------------------------------------------------------------
    @property
    def held_reason(self) -> str | None:
        """Why work waits now (idle-only mode), or None."""
        return self.idle.reason if self.idle is not None else None

    def snapshot(self) -> GovernorSnapshot:
        usage = self.budget.usage() if self.budget.enabled else None
        return GovernorSnapshot(
            paused=self.paused, pause=self.pause_state, working=self.working_state(),
            cpu=round(usage, 4) if usage is not None else None, held_s=round(self.budget.held_s, 3),
            owner_load=round(self.idle.owner_load, 4) if self.idle is not None else None,
        )  # fmt: skip

    def working_state(self) -> str:
        """One word or line for ``/status`` and the dashboard."""
        if self.paused:
            until = self._pause.until
            return f"paused for {max(0, until - time.time()):.0f} s more" if until else "paused"
        if self.held_reason:
            return f"waiting: {self.held_reason}"
        if self.budget.over():
            return "working (throttled by --max-cpu)"
        return "working"

    def hold(self, give_up: Callable[[], bool] | None = None) -> bool:
        """Called by work between steps (from any thread). Blocks while idle-only mode holds work (as long as
        the owner works: the caller's lease is renewed elsewhere) or the CPU share is spent (at most
        ``HOLD_LIMIT``, should the measurement ever fail); returns True when the work should stop now
        (paused, or ``give_up()``)."""

        def stop() -> bool:
            return self.paused or (give_up is not None and give_up())

        while self.held_reason is not None:
            if stop():
                return True
            time.sleep(SAMPLE_PERIOD)
        if stop():
            return True
        self.budget.wait(stop, limit=HOLD_LIMIT)
        return stop()

    def verdict(self, give_up: Callable[[], bool] | None = None, period: float = SAMPLE_PERIOD) -> str:
        """:meth:`hold` without blocking, for work in another process that a thread here watches every
        ``period`` seconds: ``"stop"`` (paused, or ``give_up()``), ``"hold"`` (idle-only mode holds work, or the
        CPU share is spent: the time counts as held) or ``"run"``."""
        if self.paused or (give_up is not None and give_up()):
            return "stop"
        if self.held_reason is not None:
            return "hold"
        if self.budget.over():
            self.budget.held_s += period
            return "hold"
        return "run"

    async def wait_until_free(self, stop: asyncio.Event, period: float = 1.0) -> None:
        """For loops on the event loop: return once work may go on (or ``stop`` is set)."""
        while not stop.is_set() and (self.paused or self.held_reason is not None):
            try:
                await asyncio.wait_for(stop.wait(), timeout=period)
            except TimeoutError:
                pass
