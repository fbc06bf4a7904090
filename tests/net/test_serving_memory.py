"""What a peer spends in memory serving checkpoint files: eight peers pulling a 32 MiB file at once from one
server (a child process, so that its peak RSS is its own) cost it a few MiB, under ``--max-serving-memory``,
not eight copies of the file (256 MiB, what it cost when files were read whole for every request)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import hivemind
import pytest
import pytest_asyncio
from hivemind.p2p import P2P

from garden.net.transfer import ContentTransfer, TransferLimits
from garden.protocol.content import ContentRef

pytestmark = [pytest.mark.swarm, pytest.mark.heavy(20)]

SIZE = 32 * 1024**2
STREAMS = 8
SERVE_MEMORY = 24 * 1024**2
"""The setting under test: 8 streams of 4 chunks of 256 KiB are accounted as 8 MiB; the peak RSS may add what
the allocator and hivemind's buffers keep, and must still stay under it."""


@pytest.fixture(scope="module")
def dht() -> Iterator[hivemind.DHT]:
    node = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    yield node
    node.shutdown()


@pytest_asyncio.fixture(loop_scope="module")
async def p2p(dht: hivemind.DHT) -> AsyncIterator[P2P]:
    replica = await dht.replicate_p2p()
    yield replica
    await replica.shutdown()


class Child:
    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.net.file_server", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip

    def ask(self, command: str | None = None) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the file server exited ({self.process.poll()})"
        return dict(json.loads(line))

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


@pytest.mark.asyncio(loop_scope="module")
async def test_eight_checkpoint_streams_stay_under_the_serving_memory(
    dht: hivemind.DHT, p2p: P2P, tmp_path: Path
) -> None:
    data = os.urandom(SIZE)
    served = tmp_path / "model.safetensors"
    served.write_bytes(data)
    ref = ContentRef(kind="ckpt", mission_id=secrets.token_hex(32), item="3/model/model.safetensors",
                     sha256=hashlib.sha256(data).hexdigest())  # fmt: skip
    del data
    namespace = f"test-{secrets.token_hex(4)}"
    child = Child([str(dht.get_visible_maddrs()[0]), namespace, str(SERVE_MEMORY), str(served)])
    try:
        server_id = (await asyncio.to_thread(child.ask))["peer_id"]
        baseline = (await asyncio.to_thread(child.ask, "reset"))["rss"]
        client = ContentTransfer(p2p, None, TransferLimits(), namespace=namespace)
        await client.start()
        try:
            dests = [tmp_path / f"pulled-{i}" for i in range(STREAMS)]
            await asyncio.gather(*(client.fetch_file(server_id, ref, dest) for dest in dests))
        finally:
            await client.stop()
        peak = await asyncio.to_thread(child.ask, "peak")
    finally:
        await asyncio.to_thread(child.stop)
    for dest in dests:
        assert dest.stat().st_size == SIZE and hashlib.sha256(dest.read_bytes()).hexdigest() == ref.sha256
    assert (peak["served"], peak["busy"]) == (STREAMS, 0)
    assert peak["accounted"] == STREAMS * 4 * 256 * 1024  # all eight streamed at once
    grew = peak["peak"] - baseline
    print(f"serving {STREAMS} x {SIZE >> 20} MiB: peak RSS +{grew / 2**20:.1f} MiB (cap {SERVE_MEMORY >> 20} MiB)")
    assert grew < SERVE_MEMORY, f"the server's RSS grew by {grew / 2**20:.1f} MiB while serving"
