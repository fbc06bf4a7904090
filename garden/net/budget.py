"""``--max-serving-memory``: the bytes this peer holds in memory at once for peers that fetch from it.

A row set or a prompt list is served from memory whole (up to 64 MiB each); a checkpoint file is streamed
from disk, a few chunks at a time. Without a bound, eight peers fetching eight row sets would make a
volunteer's machine hold half a gigabyte for strangers; with it, a fetch that does not fit waits a little,
then is answered "busy" and the fetcher tries another holder or tries again later.
"""

from __future__ import annotations

import asyncio


class ByteBudget:
    """At most ``total`` bytes taken at once; :meth:`take` waits for room.

    ``peak`` is the most ever taken at once, for ``/metrics`` and the tests that hold the peer to its setting."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a byte budget must be positive, got {total}")
        self.total, self.used, self.peak = total, 0, 0
        self._freed = asyncio.Event()

    async def take(self, n: int, timeout: float) -> bool:
        """Take ``n`` bytes, waiting up to ``timeout`` seconds for room; False when there was none (or ``n`` is
        more than the whole budget)."""
        if n > self.total:
            return False
        try:
            async with asyncio.timeout(timeout):
                while self.used + n > self.total:
                    self._freed.clear()
                    await self._freed.wait()
        except TimeoutError:
            return False
        self._add(n)
        return True

    def grow(self, n: int) -> bool:
        """Take ``n`` more bytes only if they fit now (an estimate that turned out low); False when not."""
        if self.used + n > self.total:
            return False
        self._add(n)
        return True

    def give(self, n: int) -> None:
        """Give back ``n`` bytes taken before."""
        self.used = max(0, self.used - n)
        self._freed.set()

    def _add(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)
