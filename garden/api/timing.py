"""How long this peer took over each answer, in a ``Server-Timing`` header (``app;dur=<ms>``).

The time a client sees includes the machine's scheduling: on a busy home PC the owner's other programs, on a
2-core test machine the other daemons. The header tells apart the peer's own slowness (a route that awaits
the DHT, a handler that computes) from the machine's, and browsers' developer tools show it per request. It
is measured from the request's arrival at this middleware, the outermost, to the start of the answer (a
streamed answer: its headers).
"""

from __future__ import annotations

import time
from typing import Any

from garden.api.guard import ASGIApp, Receive, Scope, Send

HEADER = b"server-timing"


class ServerTiming:
    """The ASGI middleware that adds ``Server-Timing: app;dur=<milliseconds>`` to every HTTP answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()

        async def timed(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                took = (time.perf_counter() - began) * 1000
                headers = [*message.get("headers", ()), (HEADER, f"app;dur={took:.2f}".encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed)
