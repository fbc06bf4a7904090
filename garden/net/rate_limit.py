"""``--max-upload-rate`` / ``--max-download-rate``: a token bucket that content transfers wait on.

What it covers: the bytes garden itself streams (row sets, prompts, checkpoint files; ``garden.net.
transfer``), which are nearly all of a peer's bulk traffic. What it cannot: hivemind's DHT and gradient
averaging go through libp2p's daemon, which has no rate limit to set; averaging traffic is small next
to checkpoints (``benchmarks/collab_scaling.py``: 8-bit averaging sends about 0.3 MB per 64 steps).
"""

from __future__ import annotations

import asyncio
import time


class RateLimit:
    """At most ``rate`` bytes per second on average, with bursts up to ``burst`` bytes (default: one
    second's worth). ``rate`` None: no limit, and :meth:`take` returns at once."""

    def __init__(self, rate: float | None, burst: float | None = None):
        if rate is not None and rate <= 0:
            raise ValueError(f"a rate limit must be positive, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else (rate or 0.0)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = asyncio.Lock()
        self.waited_s = 0.0

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may pass. Callers queue in order: one big chunk cannot starve the rest."""
        if self.rate is None or n <= 0:
            return
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            if self._tokens < 0:
                delay = -self._tokens / self.rate
                self.waited_s += delay
                await asyncio.sleep(delay)
