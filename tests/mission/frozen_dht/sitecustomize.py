"""A DHT that stops answering, for the daemon of ``test_a_shard_whose_publication_fails_is_retried_and_its_error_shown``
(which puts this directory on its ``PYTHONPATH``): while the file named by ``FREEZE_DHT_FILE`` exists, every request
the daemon makes of its DHT node waits, as a node frozen under load would make it wait. The node itself keeps
running and answers other peers; only this daemon's own requests hang until they time out.

The daemon's node runs on one of its threads (``garden.net.dht_thread``), so no signal can freeze it alone from
outside, as SIGSTOP once froze the DHT process; and a frozen p2pd is not enough, since a node answers from its own
storage."""

from __future__ import annotations

import asyncio
import os
from typing import Any

FROZEN = os.environ.get("FREEZE_DHT_FILE")

if FROZEN:
    from garden.net import dht_thread

    _original = dht_thread.ThreadDHT.run_coroutine

    def _run_coroutine(self: Any, coro: Any, return_future: bool = False) -> Any:
        async def waits_while_frozen(dht: Any, node: Any) -> Any:
            while os.path.exists(FROZEN):
                await asyncio.sleep(0.05)
            return await coro(dht, node)

        return _original(self, waits_while_frozen, return_future)

    dht_thread.ThreadDHT.run_coroutine = _run_coroutine  # type: ignore[method-assign]
