"""Every answer says how long the peer itself took (:mod:`garden.api.timing`): the tests that bound a route's
time under load read it, so that another process on the machine does not fail them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from garden.api.timing import ServerTiming


def _duration_s(header: str) -> float:
    name, _, dur = header.partition(";dur=")
    assert name == "app", header
    return float(dur) / 1000


def _client() -> TestClient:
    app = FastAPI()

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(0.2)
        return {"ok": True}

    @app.get("/quick")
    async def quick() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            yield b"a"
            await asyncio.sleep(0.3)  # after the headers: not in the header's time
            yield b"b"

        return StreamingResponse(parts())

    app.add_middleware(ServerTiming)
    return TestClient(app, base_url="http://127.0.0.1:8765")


def test_the_header_is_the_routes_own_time() -> None:
    client = _client()
    slow = _duration_s(client.get("/slow").headers["server-timing"])
    quick = _duration_s(client.get("/quick").headers["server-timing"])
    assert 0.2 <= slow < 2.0
    assert 0 <= quick < slow


def test_a_streamed_answer_is_timed_to_its_headers() -> None:
    answer = _client().get("/stream")
    assert answer.content == b"ab"
    assert _duration_s(answer.headers["server-timing"]) < 0.3
