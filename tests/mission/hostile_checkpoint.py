"""A hostile trainer, for tests: it announces a checkpoint of a mission (its own poisoned weights, as a real
run directory holds them) and serves its files, as an honest holder would, until SIGTERM.

Run as ``python tests/mission/hostile_checkpoint.py JOIN ROOT MISSION_ID SWARM``: ROOT holds
``train/<mission>/out`` (a run directory with the poisoned checkpoint) and gets this peer's identity; it
prints ``announced <peer id>`` once the record is stored.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    from garden.mission.checkpoints import CheckpointSharing
    from garden.net.identity import load_or_create_identity
    from garden.net.swarm import Swarm, SwarmConfig
    from garden.net.transfer import ContentTransfer
    from garden.protocol.keys import DHTKeys

    join, root, mission, namespace = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    identity = load_or_create_identity(root / "identity.key")
    config = SwarmConfig(
        initial_peers=[join], host_maddrs=["/ip4/127.0.0.1/tcp/0"], announce_maddrs=[], client_mode=False,
        identity_path=str(root / "identity.key"), dht_timeout=10.0,
    )  # fmt: skip
    swarm = Swarm(config)
    swarm.start()

    async def serve() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        transfer = ContentTransfer(swarm, namespace=namespace)
        sharing = CheckpointSharing(swarm, DHTKeys(namespace), identity.private_key, swarm.peer_id, transfer,
                                    root / "train", root / "checkpoints")  # fmt: skip
        await transfer.start()
        try:
            while not stop.is_set():
                if await sharing.publish(mission):
                    print("announced", swarm.peer_id, flush=True)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=5.0)
                except TimeoutError:
                    pass
        finally:
            await transfer.stop()
            await swarm.close_p2p()

    try:
        asyncio.run(serve())
    finally:
        swarm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
