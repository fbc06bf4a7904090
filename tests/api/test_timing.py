"""Every answer says how long the peer itself took (:mod:`garden.api.timing`): the tests that bound a route's
time under load read it, so that another process on the machine does not fail them."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from garden.api.timing import ServerTiming
from harness.processes import spinning_process

SCHEDSTAT = "/proc/thread-self/schedstat"


def _timings_s(header: str) -> dict[str, float]:
    found = {}
    for metric in header.split(","):
        name, _, dur = metric.strip().partition(";dur=")
        found[name] = float(dur) / 1000
    assert list(found) == ["app", "wait"] and all(v >= 0 for v in found.values()), header
    return found


def _duration_s(header: str) -> float:
    return _timings_s(header)["app"]


def _client() -> TestClient:
    app = FastAPI()

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(0.2)
        return {"ok": True}

    @app.get("/busy")
    async def busy() -> dict[str, bool]:
        began = time.thread_time()
        while time.thread_time() - began < 0.2:  # 0.2 s of this thread's CPU, however long the clock takes
            pass
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


@pytest.mark.skipif(not Path(SCHEDSTAT).exists(), reason="Linux's schedstat counts a thread's wait for a CPU")
def test_the_time_the_loop_waited_for_a_cpu_is_not_the_peers_own() -> None:
    """Pinned to one CPU beside a process that spins on it, a route that computes for 0.2 s of its thread's CPU
    takes about twice that on the clock: ``app`` is about its own 0.2 s, ``wait`` the time the other one had the
    CPU."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    hog = spinning_process(cpu)
    try:
        os.sched_setaffinity(0, {cpu})  # this thread, and the client's server thread it starts (they inherit it)
        with _client() as client:
            began = time.monotonic()
            answer = client.get("/busy")
            seen = time.monotonic() - began
    finally:
        os.sched_setaffinity(0, before)
        hog.kill()
        hog.wait()
    timings = _timings_s(answer.headers["server-timing"])
    assert timings["wait"] >= 0.1, (timings, seen)  # the spinning process had the CPU about half the time
    assert 0.19 <= timings["app"] <= 0.35 and timings["app"] + timings["wait"] <= seen, (timings, seen)
