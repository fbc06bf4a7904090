"""A child process that serves files with garden's content transfer, for tests that measure what serving costs
in memory: its peak RSS is its own, apart from the test's.

    python -m tests.net.file_server <initial maddr> <namespace> <serve_memory> <file>...

It prints one JSON line (its peer id), then answers commands on stdin, one JSON line each:
``reset`` (start measuring: the kernel's peak RSS is reset, the RSS now is the baseline), ``peak`` (the peak
RSS since then, and the transfer's own accounting), ``quit``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path

import hivemind

from garden.net.transfer import ContentTransfer, TransferLimits
from garden.protocol.content import ContentRef


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def main(initial: str, namespace: str, serve_memory: int, files: list[Path]) -> None:
    dht = hivemind.DHT(initial_peers=[initial], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    p2p = await dht.replicate_p2p()
    by_hash = {hashlib.sha256(path.read_bytes()).hexdigest(): path for path in files}

    async def source(ref: ContentRef) -> Path | None:
        return by_hash.get(ref.sha256)

    transfer = ContentTransfer(p2p, limits=TransferLimits(serve_memory=serve_memory), namespace=namespace)
    transfer.register_files("ckpt", source)
    await transfer.start()
    print(json.dumps({"peer_id": transfer.peer_id}), flush=True)
    try:
        while True:
            command = (await asyncio.to_thread(sys.stdin.readline)).strip()
            if command == "reset":
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the RSS now
                print(json.dumps({"rss": _status_kib("VmRSS") * 1024}), flush=True)
            elif command == "peak":
                answer = {"peak": _status_kib("VmHWM") * 1024, "accounted": transfer.memory.peak}
                print(json.dumps({**answer, "served": transfer.stats.served, "busy": transfer.stats.busy}), flush=True)
            else:
                break
    finally:
        await transfer.stop()
        await p2p.shutdown()
        dht.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), [Path(p) for p in sys.argv[4:]]))
