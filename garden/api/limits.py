"""A cap on HTTP request bodies: a body is read into memory whole (JSON), so without a cap one request could
take all of it. Past ``http_max_body`` bytes the request is answered 413 and nothing of it is used.

A declared ``Content-Length`` over the cap is refused before a byte is read; a body sent without one
(chunked) is counted as it arrives and refused at the first byte past the cap.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException

from garden.api.guard import ASGIApp, Receive, Scope, Send, send_json


def _too_large(limit: int) -> str:
    return f"the request body is over {limit} bytes, this peer's cap (http_max_body)"


class BodyLimit:
    """The ASGI middleware that caps request bodies at ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"), None)
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await send_json(send, 400, {"detail": "the Content-Length header is not a number"})
                return
            if length > self.max_bytes:
                await send_json(send, 413, {"detail": _too_large(self.max_bytes)})
                return
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # raised while the route reads its body: FastAPI answers it as any HTTP error
                    raise HTTPException(413, _too_large(self.max_bytes))
            return message

        await self.app(scope, counted, send)
