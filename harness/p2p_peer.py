"""One libp2p peer as garden starts its p2p daemon, run inside a network namespace of ``harness.netns``:
``ip netns exec NS python -m harness.p2p_peer NAME RUN_DIR CONFIG_JSON`` (from the checkout's root).

CONFIG_JSON: ``host`` (listen multiaddrs), ``initial`` (peers to connect to), ``reach`` (``public`` or
``private``), ``relays`` (a private peer's relays), ``default_relay_only`` (a public peer relays with libp2p's
default limits alone, 128 KiB a direction per relayed connection: what hivemind's p2pd does when its bare relay
service wins the start-up race, docs/running-a-peer.md), ``serve_bytes`` (N: it serves :func:`blob` of N bytes
through garden's content transfer). The p2p daemon gets what ``garden.net.reach.plan`` gives a peer of that
reachability (options, the flags hivemind has no option for, the announced circuit addresses): what the
daemon's DHT process starts, without the DHT on top.

Writes ``RUN_DIR/NAME.json`` (peer id, pid of its p2pd) once up, and ``RUN_DIR/NAME.state`` (a JSON line each
time the connected peers change: ``{"t": ..., "peers": [[id, [addrs]], ...]}``), p2pd's log lines in
``NAME.log``; takes ``connect <multiaddr ending in /p2p/ID>`` and ``fetch <peer id> <N>`` (the N-byte blob, by
garden's content transfer, hash-checked: a state line says how it went) lines from ``NAME.cmd``; stops when
``NAME.stop`` exists.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

# what the hole-punch test reads: the hole-punch service starting, and each punch (debug lines of go-libp2p)
os.environ.setdefault("GOLOG_LOG_LEVEL", "warn,p2p-holepunch=debug,autorelay=info")


def blob(size: int) -> tuple[bytes, Any]:
    """The same ``size`` bytes in every process, and the content ref that names them."""
    from garden.protocol.content import ContentRef

    data = random.Random(size).randbytes(size)
    return data, ContentRef(kind="rows", mission_id="ab" * 32, item="0:0", sha256=hashlib.sha256(data).hexdigest())


async def serve(name: str, run: Path, config: dict[str, Any]) -> None:
    from hivemind.p2p import P2P, PeerID

    from garden.net import p2pd_patch
    from garden.net.reach import Reach, RelayLimits, plan
    from garden.net.relay_probe import GoMultiaddr
    from garden.net.transfer import ContentTransfer, TransferError

    reach = Reach(reachability=config["reach"], relays=list(config.get("relays", [])))
    chosen = plan(reach, RelayLimits())
    p2pd_patch.install(chosen.flags | ({"relayService": False} if config.get("default_relay_only") else {}))
    log = (run / f"{name}.log").open("a", buffering=1)
    P2P._log_p2pd_message = staticmethod(lambda line: log.write(line + "\n"))  # type: ignore[method-assign]
    p2p = await P2P.create(
        initial_peers=config.get("initial") or None, host_maddrs=config["host"],
        announce_maddrs=chosen.announce or None, nat_port_map=False, startup_timeout=30, **chosen.options,
    )  # fmt: skip
    held = blob(int(config.get("serve_bytes", 0)))

    async def source(ref: Any) -> bytes | None:
        return held[0] if ref == held[1] else None

    transfer = ContentTransfer(p2p, source=source)
    await transfer.start()
    ready = run / f"{name}.json.tmp"
    ready.write_text(json.dumps({"id": p2p.peer_id.to_base58(), "pid": p2p._child.pid}))
    ready.rename(run / f"{name}.json")
    state = (run / f"{name}.state").open("a", buffering=1)
    done, last = 0, None
    try:
        while not (run / f"{name}.stop").exists():
            commands = (run / f"{name}.cmd").read_text().splitlines() if (run / f"{name}.cmd").exists() else []
            for command in commands[done:]:
                verb, target = command.split(" ", 1)
                if verb == "fetch":
                    holder, size = target.split()
                    began = time.time()
                    try:
                        data, _ = await transfer.fetch_any([holder], blob(int(size))[1])
                        got: dict[str, Any] = {"fetched": len(data), "s": round(time.time() - began, 2)}
                    except TransferError as e:
                        got = {"fetch_failed": f"{e.reason}: {e.detail}"}
                    failed = dict(transfer.stats.failed)
                    state.write(json.dumps({"t": time.time(), **got, "failures": failed}) + "\n")
                    continue
                base, peer = target.rsplit("/p2p/", 1)
                try:
                    await p2p._client.connect(PeerID.from_base58(peer), [GoMultiaddr(base)])
                    state.write(json.dumps({"t": time.time(), "connected": target}) + "\n")
                except Exception as e:  # what the test shows when it fails
                    state.write(json.dumps({"t": time.time(), "error": f"{target}: {e!r}"}) + "\n")
            done = len(commands)
            peers = sorted((p.peer_id.to_base58(), sorted(str(a) for a in p.addrs)) for p in await p2p.list_peers())
            if peers != last:
                state.write(json.dumps({"t": time.time(), "peers": peers}) + "\n")
                last = peers
            await asyncio.sleep(0.1)
    finally:
        await transfer.close()
        await p2p.shutdown()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])))
