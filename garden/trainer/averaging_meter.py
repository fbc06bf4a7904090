"""Bytes this trainer sends while averaging with peers: what ``benchmarks/collab_scaling.py`` compares
across modes and compressions, and what ``train.bytes_sent`` shows.

hivemind moves averaged tensors in its averager processes (forked from the trainer), as protobuf
messages of two streams per round: the parts this peer sends to each reducer, and the averaged parts
it sends back as a reducer. Their sizes are added to one counter in shared memory, created here before
the averagers fork so that they all write to it. :func:`install` wraps those two generators once per
process; :func:`bytes_sent` reads the total. Not counted: the state a peer serves to a late joiner
(once per join, not per round; hivemind registers that RPC handler by its exact signature, which a
wrapper would hide), DHT traffic and libp2p framing.
"""

from __future__ import annotations

import functools
import multiprocessing
from collections.abc import AsyncIterator, Callable
from typing import Any

_counter: Any = None


def bytes_sent() -> int:
    return int(_counter.value) if _counter is not None else 0


def _counting(stream: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(stream)
    async def counted(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for message in stream(self, *args, **kwargs):
            with _counter.get_lock():
                _counter.value += message.ByteSize()
            yield message

    return counted


def install() -> None:
    global _counter
    if _counter is not None:
        return
    from hivemind.averaging.allreduce import AllReduceRunner

    _counter = multiprocessing.Value("q", 0)
    for name in ("_generate_input_for_peer", "_accumulate_parts_streaming"):
        setattr(AllReduceRunner, name, _counting(getattr(AllReduceRunner, name)))
