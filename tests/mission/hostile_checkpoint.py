"""A hostile trainer, for tests: it announces a checkpoint of a mission (its own poisoned weights, as a real
run directory holds them) and serves its files, as an honest holder would, until SIGTERM.

Run as ``python tests/mission/hostile_checkpoint.py JOIN ROOT MISSION_ID SWARM [student]``: ROOT holds
``train/<mission>/out`` (a run directory with the poisoned checkpoint) and gets this peer's identity; it
prints ``announced <peer id>`` once the record is stored. With ``student`` it also publishes its checkpoint
as the mission's student (``mission:<id>``), which only the mission's lead may, and squats the mission's name:
a mission of its own named ``train-test`` whose student it publishes (``mission:train-test`` must still mean
the lead's).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    from garden.mission.checkpoints import CheckpointSharing
    from garden.net.identity import load_or_create_identity
    from garden.net.swarm import Swarm, SwarmConfig
    from garden.net.transfer import ContentTransfer
    from garden.protocol.keys import DHTKeys

    join, root, mission, namespace = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    as_student = sys.argv[5:] == ["student"]
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
                    if as_student:
                        await publish_student(swarm, DHTKeys(namespace), identity.private_key, sharing, mission)
                        await squat_the_name(swarm, DHTKeys(namespace), identity.private_key, sharing, mission)
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


async def publish_student(swarm: Any, keys: Any, private_key: Any, sharing: Any, mission: str) -> None:
    from hivemind.utils.timed_storage import get_dht_time

    from garden.protocol.checkpoints import StudentRecord

    mine = [r for r in await sharing.records(mission) if r.peer_id == swarm.peer_id]
    if not mine:
        return
    record = StudentRecord(
        mission_id=mission, peer_id=swarm.peer_id, name="train-test", epoch=mine[-1].epoch,
        manifest_sha256=mine[-1].manifest_sha256, size=mine[-1].size, base="poisoned", architecture="LlamaForCausalLM",
        parameters=1, layers=2, tokenizer="0" * 16, metrics={"kl": 0.0}, published=get_dht_time(),
    )  # fmt: skip
    await swarm.store(keys.students, record.to_wire(private_key), get_dht_time() + 3600, subkey=record.subkey)


async def squat_the_name(swarm: Any, keys: Any, private_key: Any, sharing: Any, mission: str) -> None:
    """A mission of its own, signed and stored as any lead's, named like the real one, with a published student
    (naming its poisoned files)."""
    from hivemind.utils.timed_storage import get_dht_time

    from garden.protocol.checkpoints import StudentRecord
    from garden.protocol.mission import MissionDraft, MissionSpec, sign_index_head, sign_mission
    from garden.protocol.rows import PromptRow

    mine = [r for r in await sharing.records(mission) if r.peer_id == swarm.peer_id]
    if not mine:
        return
    spec = MissionSpec.model_validate({"name": "train-test", "teachers": ["builtin:smollm2-135m"],
                                       "prompts": "squat.jsonl", "student": {"base": "builtin:smollm2-135m"}})
    signed = sign_mission(MissionDraft(spec, (PromptRow(prompt="Hi?", reference="Hi."),)), private_key, get_dht_time())
    await swarm.store(keys.missions, signed.to_wire(), get_dht_time() + 3600, subkey=signed.mission_id)
    head = sign_index_head(private_key, [signed.mission_id], [], get_dht_time())  # readers: read the index again
    await swarm.store(keys.mission_heads, head, get_dht_time() + 3600, subkey=swarm.peer_id)
    record = StudentRecord(
        mission_id=signed.mission_id, peer_id=swarm.peer_id, name="train-test", epoch=0,
        manifest_sha256=mine[-1].manifest_sha256, size=mine[-1].size, base="poisoned", architecture="LlamaForCausalLM",
        parameters=1, layers=2, tokenizer="0" * 16, metrics={"kl": 0.0}, published=get_dht_time(),
    )  # fmt: skip
    await swarm.store(keys.students, record.to_wire(private_key), get_dht_time() + 3600, subkey=record.subkey)


if __name__ == "__main__":
    sys.exit(main())
