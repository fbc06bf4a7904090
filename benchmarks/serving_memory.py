"""What serving checkpoint files to peers costs a volunteer's machine in memory: streamed from disk (a file
kind, as ``garden`` serves checkpoints now) against read whole for every request (as it did before).

Run: ``.venv/bin/python benchmarks/serving_memory.py [--size-mib 64] [--streams 8]``. Prints ONE JSON object.

A server process (this script with ``--serve``: a hivemind DHT and garden's content transfer, nothing else)
holds one file; the benchmark fetches it ``--streams`` times at once into files, and reads the server's
peak RSS growth from the kernel (``VmHWM`` after resetting it through ``/proc/<pid>/clear_refs``), once
per way of serving. Both ways run in one run, on one machine:

- ``streamed_peak_mib``: peak RSS growth with the file streamed (``register_files``), under the default
  ``--max-serving-memory`` (256 MiB: it is not what holds this one down)
- ``whole_peak_mib``: the same with a source that reads the file whole for each request (the old way;
  its budget set high enough that no fetch is turned away)
- ``memory_ratio``: whole / streamed; ``streamed_mib_s`` / ``whole_mib_s``: what the fetchers received per
  second, all streams together (streaming reads from disk in a thread per chunk: what does it cost?)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hivemind

from garden.net.transfer import ContentTransfer, TransferLimits
from garden.protocol.content import ContentRef


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def serve(initial: str, namespace: str, path: Path, whole: bool) -> None:
    """The server process: answers ``reset`` and ``peak`` on stdin (see the module docstring)."""
    dht = hivemind.DHT(initial_peers=[initial], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    p2p = await dht.replicate_p2p()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    limits = TransferLimits(serve_memory=64 * 1024**3) if whole else TransferLimits()
    transfer = ContentTransfer(p2p, limits=limits, namespace=namespace)

    async def as_file(ref: ContentRef) -> Path | None:
        return path if ref.sha256 == sha else None

    async def as_bytes(ref: ContentRef) -> bytes | None:
        return await asyncio.to_thread(path.read_bytes) if ref.sha256 == sha else None

    if whole:
        transfer.register("ckpt", as_bytes)
    else:
        transfer.register_files("ckpt", as_file)
    await transfer.start()
    print(json.dumps({"peer_id": transfer.peer_id}), flush=True)
    while (command := (await asyncio.to_thread(sys.stdin.readline)).strip()) in ("reset", "peak"):
        if command == "reset":
            Path("/proc/self/clear_refs").write_text("5")
            print(json.dumps({"rss": _status_kib("VmRSS") * 1024}), flush=True)
        else:
            print(json.dumps({"peak": _status_kib("VmHWM") * 1024, "served": transfer.stats.served}), flush=True)
    await transfer.stop()
    await p2p.shutdown()
    dht.shutdown()


def ask(proc: subprocess.Popen[str], command: str | None = None) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    if command:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
    return dict(json.loads(proc.stdout.readline()))


async def measure(
    dht: hivemind.DHT, p2p: Any, path: Path, sha: str, streams: int, whole: bool, scratch: Path
) -> dict[str, float]:
    namespace = f"bench-{secrets.token_hex(4)}"
    argv = [sys.executable, __file__, "--serve", str(dht.get_visible_maddrs()[0]), namespace, str(path)]
    proc = subprocess.Popen([*argv, *(["--whole"] if whole else [])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    client = ContentTransfer(p2p, namespace=namespace)
    await client.start()
    try:
        server = (await asyncio.to_thread(ask, proc))["peer_id"]
        baseline = (await asyncio.to_thread(ask, proc, "reset"))["rss"]
        ref = ContentRef(kind="ckpt", mission_id=secrets.token_hex(32), item="1/model/model.safetensors", sha256=sha)
        began = time.monotonic()
        await asyncio.gather(*(client.fetch_file(server, ref, scratch / f"got-{i}") for i in range(streams)))
        took = time.monotonic() - began
        peak = await asyncio.to_thread(ask, proc, "peak")
        assert peak["served"] == streams, peak
    finally:
        await client.stop()
        if proc.stdin is not None:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
        await asyncio.to_thread(proc.wait, 60)
    size = path.stat().st_size
    return {"peak_mib": round((peak["peak"] - baseline) / 2**20, 1), "mib_s": round(streams * size / 2**20 / took, 1)}


async def both(dht: hivemind.DHT, path: Path, sha: str, streams: int, scratch: Path) -> list[dict[str, float]]:
    p2p = await dht.replicate_p2p()
    try:
        return [await measure(dht, p2p, path, sha, streams, whole, scratch) for whole in (False, True)]
    finally:
        await p2p.shutdown()


def main() -> None:
    if "--serve" in sys.argv:
        i = sys.argv.index("--serve")
        initial, namespace, path = sys.argv[i + 1 : i + 4]
        asyncio.run(serve(initial, namespace, Path(path), "--whole" in sys.argv))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        path = scratch / "model.safetensors"
        data = os.urandom(args.size_mib * 2**20)
        path.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        del data
        dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        try:
            streamed, whole = asyncio.run(both(dht, path, sha, args.streams, scratch))
        finally:
            dht.shutdown()
    print(json.dumps({
        "file_mib": args.size_mib, "streams": args.streams,
        "streamed_peak_mib": streamed["peak_mib"], "whole_peak_mib": whole["peak_mib"],
        "memory_ratio": round(whole["peak_mib"] / max(streamed["peak_mib"], 0.1), 1),
        "streamed_mib_s": streamed["mib_s"], "whole_mib_s": whole["mib_s"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
