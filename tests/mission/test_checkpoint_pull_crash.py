"""A pull killed with SIGKILL half-way never costs the checkpoint pulled before: a real peer publishes a real
training checkpoint (``RunDir.save``) in a real DHT; a child process pulls it with ``CheckpointSharing.pull``;
the trainer then rewrites that epoch with other weights (a resume's rewrite), the child pulls again through a
slow link and is killed mid-file. The first copy is still whole (every sha256) and loads; the next pull
finishes from where the dead one left its staging directory, and loads the new weights."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from garden.distill.checkpoints import RunDir
from garden.mission.checkpoints import PULLED_MANIFEST, CheckpointSharing
from garden.net.identity import load_or_create_identity
from garden.net.rate_limit import RateLimit
from garden.net.swarm import Swarm, SwarmConfig
from garden.net.transfer import ContentTransfer
from garden.protocol.keys import DHTKeys

pytestmark = [pytest.mark.swarm, pytest.mark.heavy(40)]

MISSION = secrets.token_hex(32)
NAMESPACE = f"pull-crash-{secrets.token_hex(4)}"

PULLER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from garden.mission.checkpoints import CheckpointSharing
    from garden.net.swarm import Swarm, SwarmConfig
    from garden.net.transfer import ContentTransfer
    from garden.protocol.keys import DHTKeys
    from garden.errors import Unavailable
    join, root, mission, namespace = sys.argv[1:5]
    room = int(sys.argv[5]) if len(sys.argv) > 5 else None  # bytes this puller may write
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    swarm = Swarm(SwarmConfig(initial_peers=[join], host_maddrs=["/ip4/127.0.0.1/tcp/0"], announce_maddrs=[],
                              client_mode=False, identity_path=str(root / "puller.key"), dht_timeout=10.0))
    swarm.start()

    async def main():
        transfer = ContentTransfer(swarm, namespace=namespace)
        sharing = CheckpointSharing(swarm, DHTKeys(namespace), None, swarm.peer_id, transfer, root / "train",
                                    root / "checkpoints")
        await transfer.start()
        print("pulling", flush=True)
        try:
            fits = None if room is None else lambda n: f"{n} > {room}" if n > room else None
            path, record = await sharing.pull(mission, 1, unverified=True, room=fits)
            print("pulled", path, flush=True)
        except Unavailable as e:
            print("refused:", e, flush=True)
        await transfer.stop()
        await swarm.close_p2p()

    try:
        asyncio.run(main())
    finally:
        swarm.shutdown()
    """
)


def swarm_config(identity: Path, join: list[str] | None = None) -> SwarmConfig:
    return SwarmConfig(
        initial_peers=join or [], host_maddrs=["/ip4/127.0.0.1/tcp/0"], announce_maddrs=[], client_mode=False,
        identity_path=str(identity), dht_timeout=10.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def server_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Swarm, Path]]:
    root = tmp_path_factory.mktemp("server")
    load_or_create_identity(root / "identity.key")
    swarm = Swarm(swarm_config(root / "identity.key"))
    swarm.start()  # before the event loop runs: the DHT forks
    yield swarm, root
    swarm.shutdown()


def save_checkpoint(run: RunDir, student: Path, seed: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(student), AutoTokenizer.from_pretrained(student)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    run.save(1, model, tokenizer, {"step": seed}, {"loss": float(seed)}, keep=2)


def sha256s(directory: Path) -> dict[str, str]:
    record = json.loads((directory / PULLED_MANIFEST).read_text())
    return {f["path"]: f["sha256"] for f in record["files"]}


def assert_whole_and_loads(directory: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    for rel, digest in sha256s(directory).items():
        name = rel.split("/", 1)[1] if rel.startswith("model/") else rel
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, rel
    model = AutoModelForCausalLM.from_pretrained(directory)
    return model.get_input_embeddings().weight.detach().clone()


def start_puller(join: str, root: Path, *room: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PULLER, join, str(root), MISSION, NAMESPACE, *room], stdout=subprocess.PIPE, text=True
    )


@pytest.mark.asyncio
async def test_a_pull_killed_mid_file_leaves_the_previous_copy_whole(
    server_swarm: tuple[Swarm, Path], model_cache: Path, tmp_path: Path
) -> None:
    from harness.trainers import make_tiny_student

    swarm, root = server_swarm
    identity = load_or_create_identity(root / "identity.key")
    transfer = ContentTransfer(swarm, namespace=NAMESPACE)
    sharing = CheckpointSharing(swarm, DHTKeys(NAMESPACE), identity.private_key, swarm.peer_id, transfer,
                                root / "train", root / "checkpoints")  # fmt: skip
    run = RunDir(root / "train" / MISSION / "out")
    run.create({"student": "tiny"})
    student = make_tiny_student(tmp_path / "student")
    save_checkpoint(run, student, seed=1)
    join = swarm.visible_maddrs()[0]
    puller_root = tmp_path / "puller"
    target = puller_root / "checkpoints" / MISSION / "epoch-1"
    await transfer.start()
    try:
        assert await sharing.publish(MISSION) == 1
        # a puller with room for 1000 bytes, far less than the files (their sizes as the manifest says), fetches
        # nothing
        tight = start_puller(join, puller_root, "1000")
        out, _ = await asyncio.to_thread(tight.communicate, timeout=120)
        assert tight.returncode == 0 and "refused: the checkpoint of epoch 1" in out and "> 1000" in out, out
        assert not target.exists() and not target.with_name("epoch-1.partial").exists()
        first = start_puller(join, puller_root)  # a whole pull: the copy to keep
        out, _ = await asyncio.to_thread(first.communicate, timeout=120)
        assert first.returncode == 0 and f"pulled {target}" in out
        before = sha256s(target)
        weights = assert_whole_and_loads(target)

        save_checkpoint(run, student, seed=2)  # the trainer rewrites epoch 1 with other weights
        assert await sharing.publish(MISSION) == 1
        transfer.upload = RateLimit(1_000_000, burst=256 * 1024)  # ~10 s for the files: time to kill it mid-way
        second = start_puller(join, puller_root)
        staging = target.with_name("epoch-1.partial")
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in staging.glob("*") if p.is_file()):
            assert second.poll() is None and time.monotonic() < deadline, "the second pull never started a file"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        os.kill(second.pid, signal.SIGKILL)
        await asyncio.to_thread(second.wait)
        assert staging.is_dir()  # it died half-way
        assert sha256s(target) == before  # the previous copy: untouched, whole, and it loads
        assert torch.equal(assert_whole_and_loads(target), weights)

        transfer.upload = RateLimit(None)
        third = start_puller(join, puller_root)
        out, _ = await asyncio.to_thread(third.communicate, timeout=120)
        assert third.returncode == 0 and f"pulled {target}" in out
        assert sha256s(target) != before and not staging.exists()
        assert not torch.equal(assert_whole_and_loads(target), weights)
    finally:
        await transfer.stop()
        await swarm.close_p2p()


@pytest.fixture
def lead_swarm(tmp_path: Path) -> Iterator[tuple[Swarm, Path]]:
    """A swarm of its own (a p2p replica closed in one test's event loop is not reopened in another's)."""
    root = tmp_path / "lead"
    root.mkdir()
    load_or_create_identity(root / "identity.key")
    swarm = Swarm(swarm_config(root / "identity.key"))
    swarm.start()
    yield swarm, root
    swarm.shutdown()


@pytest.mark.asyncio
async def test_a_forged_checkpoint_is_never_pulled_without_the_leads_vouch(
    lead_swarm: tuple[Swarm, Path], tmp_path: Path
) -> None:
    """The attack: a throwaway key announces a checkpoint of the mission at epoch 10^7 (it would be "latest"
    for every pull) and vouches for it itself. A pull takes only an epoch whose files the lead vouched for;
    even an unverified pull ignores an epoch past the mission's max_epochs."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from garden.errors import NotFound
    from garden.protocol import signing
    from garden.protocol.checkpoints import CHECKPOINT_TTL, CheckpointFile, CheckpointRecord, CheckpointVouch
    from harness.trainers import make_tiny_student
    from hivemind.utils.timed_storage import get_dht_time

    swarm, root = lead_swarm
    mission = secrets.token_hex(32)
    identity = load_or_create_identity(root / "identity.key")  # the lead's
    transfer = ContentTransfer(swarm, namespace=NAMESPACE)
    keys = DHTKeys(NAMESPACE)
    sharing = CheckpointSharing(swarm, keys, identity.private_key, swarm.peer_id, transfer, root / "train",
                                root / "checkpoints")  # fmt: skip
    run = RunDir(root / "train" / mission / "out")
    run.create({"student": "tiny"})
    save_checkpoint(run, make_tiny_student(tmp_path / "student"), seed=3)
    lead = {swarm.peer_id}
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker_id = signing.peer_id_of(signing.public_key_der(attacker))
    poison = CheckpointFile(path="model/model.safetensors", size=9, sha256=hashlib.sha256(b"poisoned!").hexdigest())
    forged = CheckpointRecord(mission_id=mission, epoch=10_000_000, peer_id=attacker_id, files=[poison],
                              created=get_dht_time())  # fmt: skip
    self_vouch = CheckpointVouch(mission_id=mission, epoch=forged.epoch, peer_id=attacker_id,
                                 manifest_sha256=forged.manifest_sha256, metrics={"kl": 0.0},
                                 created=get_dht_time())  # fmt: skip
    await transfer.start()
    try:
        assert await sharing.publish(mission) == 1
        ckpt_key = keys.mission_checkpoints(mission)
        for record in (forged, self_vouch):
            assert await swarm.store(ckpt_key, record.to_wire(attacker), get_dht_time() + CHECKPOINT_TTL,
                                     subkey=record.subkey)  # fmt: skip
        catalog = await sharing.catalog(mission)
        assert [r.epoch for r in catalog.records] == [1, 10_000_000] and len(catalog.vouches) == 1
        assert catalog.vouched(lead) == {} and set(catalog.vouched({attacker_id})) == {10_000_000}
        with pytest.raises(NotFound, match="verified"):  # nobody the puller trusts vouched for anything
            await sharing.pull(mission, trusted=lead)
        path, record = await sharing.pull(mission, unverified=True, max_epoch=20)  # past max_epochs: ignored
        assert record.epoch == 1

        own = next(r for r in catalog.records if r.epoch == 1)
        vouch = await sharing.vouch(own, {"kl": 1.5})
        catalog = await sharing.catalog(mission)
        assert catalog.vouched(lead) == {1: vouch}
        path, record = await sharing.pull(mission, trusted=lead)
        assert record.epoch == 1 and record.manifest_sha256 == vouch.manifest_sha256
        assert (path / "model").is_dir()  # the lead's own checkpoint, served from its run directory
        with pytest.raises(NotFound, match="unverified"):
            await sharing.pull(mission, 10_000_000, trusted=lead)
    finally:
        await transfer.stop()
        await swarm.close_p2p()
