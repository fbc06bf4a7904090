"""How long this peer took over each answer, in a ``Server-Timing`` header (``app;dur=<ms>, wait;dur=<ms>``).

The time a client sees includes the machine's scheduling: on a busy home PC the owner's other programs, on a
2-core test machine the other daemons. The header tells apart the peer's own slowness (a route that awaits
the DHT, a handler that computes) from the machine's, and browsers' developer tools show it per request. It
is measured from the request's arrival at this middleware, the outermost, to the start of the answer (a
streamed answer: its headers).

``app`` is that time less ``wait``: the time the thread that ran the middleware (the event loop's) was ready to
run but waited for a CPU, held by other processes or by this one's other threads, as Linux counts it
(``host/loop_lag.py``'s ``cpu_wait_s``; ``wait`` is 0 where there is no such count). The loop's time waiting for
the GIL, or running other tasks, stays in ``app``: that is the peer's own. (A wall clock alone counts the machine's
load too: a CI machine at a load of about 10 timed one ``/health`` at 0.29 s, the others of that test at 1-33 ms.)
"""

from __future__ import annotations

import time
from typing import Any

from garden.api.guard import ASGIApp, Receive, Scope, Send
from garden.host.loop_lag import cpu_wait_s

HEADER = b"server-timing"


class ServerTiming:
    """The ASGI middleware that adds ``Server-Timing: app;dur=<ms>, wait;dur=<ms>`` to every HTTP answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, waited = time.perf_counter(), cpu_wait_s()

        async def timed(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                wait = max(0.0, cpu_wait_s() - waited)
                took = max(0.0, time.perf_counter() - began - wait)
                value = f"app;dur={took * 1000:.2f}, wait;dur={wait * 1000:.2f}".encode()
                message = {**message, "headers": [*message.get("headers", ()), (HEADER, value)]}
            await send(message)

        await self.app(scope, receive, timed)
