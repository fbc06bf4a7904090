"""``--when idle``: work only while the owner does not need the machine.

The owner's load is the machine's CPU use minus the peer's own tree (psutil, over the last second),
so the peer's own work never counts as the owner's. Work is held within :data:`BUSY_WINDOW` of the
owner's load crossing the threshold, and starts again only after ``quiet_s`` seconds below it:
an owner who pauses for a moment between two compiles should not feel the peer jump in. On battery
(where the machine says) the peer holds too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psutil

from garden.host.cpu_budget import TreeCpu

logger = logging.getLogger(__name__)

BUSY_WINDOW = 1.0
"""Seconds of machine load averaged for one decision (work must hold within 2 s of the owner coming back)."""


@dataclass(frozen=True)
class IdleConfig:
    """:param threshold: share of the machine the owner's processes may use while the peer works
    :param quiet_s: seconds the owner's load must stay under it before work resumes"""

    threshold: float = 0.25
    quiet_s: float = 60.0


class IdleWatch:
    def __init__(self, config: IdleConfig, root_pid: int):
        self.config = config
        self.cores = psutil.cpu_count() or 1
        self._tree = TreeCpu(root_pid)
        self._tree.read()
        self._last_total = _busy_seconds()
        self._last_at = time.monotonic()
        self._window: list[tuple[float, float, float]] = []  # (at, machine busy s, own s)
        self._quiet_since: float | None = None
        self.owner_load: float = 0.0
        self.reason: str | None = "starting: measuring the machine's load"
        self._battery_checked = 0.0
        self._on_battery = False

    @property
    def held(self) -> bool:
        return self.reason is not None

    def sample(self) -> None:
        """One reading (call about every 0.1-0.25 s)."""
        was_held = self.held
        self._sample()
        if was_held != self.held:
            if self.held:
                logger.info("idle-only mode: work waits: %s", self.reason)
            else:
                logger.info("idle-only mode: the machine is quiet, work goes on")

    def _sample(self) -> None:
        now = time.monotonic()
        busy = _busy_seconds()
        own = self._tree.read()
        self._window.append((now, max(0.0, busy - self._last_total), own))
        self._last_total = busy
        self._window = [w for w in self._window if now - w[0] <= BUSY_WINDOW]
        span = max(1e-3, now - self._last_at) if len(self._window) < 2 else now - self._window[0][0] + 1e-9
        if len(self._window) >= 2:
            machine = sum(w[1] for w in self._window[1:])
            mine = sum(w[2] for w in self._window[1:])
            self.owner_load = max(0.0, machine - mine) / span / self.cores
        self._last_at = now
        if now - self._battery_checked > 10.0:
            self._battery_checked = now
            self._on_battery = _on_battery()
        if self._on_battery:
            self.reason, self._quiet_since = "on battery (idle-only mode works on AC power)", None
        elif self.owner_load > self.config.threshold:
            self.reason = f"the machine is busy ({self.owner_load * 100:.0f} % used by other programs)"
            self._quiet_since = None
        else:
            self._quiet_since = self._quiet_since if self._quiet_since is not None else now
            quiet = now - self._quiet_since
            if self.reason is not None and quiet >= self.config.quiet_s:
                self.reason = None
            elif self.reason is not None:
                self.reason = f"waiting for the machine to stay idle ({quiet:.0f}/{self.config.quiet_s:.0f} s)"


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle, summed over cores."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    total = sum(getattr(times, name) for name in times._fields if name not in ("guest", "guest_nice"))
    return total - idle


def _on_battery() -> bool:
    try:
        battery = psutil.sensors_battery()
    except (AttributeError, NotImplementedError, OSError):
        return False
    return battery is not None and battery.power_plugged is False
