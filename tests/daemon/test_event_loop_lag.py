"""Nothing blocks a peer's event loop, measured on a real daemon by its own probe
(``garden_event_loop_lag_seconds``) and by a client polling ``/health`` from another process, while the peer
at once:

* loads its teacher (a mission it leads starts shaking at once),
* takes a 56 MiB row set another peer offers it (fetched, decoded, checked against the shard, written),
* serves a 100 MB checkpoint file to another peer.

Each of these used to hold the loop for seconds (read whole, hashed, decoded or loaded on it)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import hivemind
import numpy as np
import pytest

from cryptography.hazmat.primitives.asymmetric import rsa

from garden.mission.leases import LeaseManager
from garden.net.transfer import ContentTransfer
from garden.protocol.content import ContentRef
from garden.protocol.keys import DEFAULT_SWARM, DHTKeys
from garden.protocol.row_sets import pack_encoded_rows
from garden.protocol.rows import DorpoRow
from harness.daemons import Daemon, DaemonFactory, HealthPoller, wait_until
from tests.mission.test_missions_swarm import converted, create, mission_body, start  # noqa: F401

pytestmark = [pytest.mark.swarm, pytest.mark.serial]

LAG_BUDGET = 0.25
"""The issue's target for the loop's p99 lag. Before the teacher loaded and sampled in the sampling process, a
thread of this process held the GIL past it in about one run in eight (a 2 MB tokenizer.json parsed in one
call); measured since: p99 0.025-0.1 s."""
TOKENS, K = 8192, 256  # the most a row may carry: ~8 MiB of top-k per row

def big_row_set(prompts: list[str], tokenizer_name: str) -> bytes:
    ids = np.arange(TOKENS) % 1000
    topk = np.tile(np.arange(K), (TOKENS, 1))
    logprobs = np.full((TOKENS, K), -np.log(2 * K))  # half the mass in the top-k: a valid distribution
    rows = [
        DorpoRow.from_arrays(
            prompt=prompt, chosen="x" * 1000, chosen_ids=ids, topk_ids=topk, topk_logprobs=logprobs,
            teacher="builtin:smollm2-135m", judge="reference", tokenizer=tokenizer_name, vocab_size=49152,
        )  # fmt: skip
        for prompt in prompts
    ]
    return pack_encoded_rows([row.to_msgpack() for row in rows])


def lag_counts(daemon: Daemon) -> dict[str, int]:
    found = re.findall(r'garden_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', daemon.get("/metrics").text)
    return {le: int(float(n)) for le, n in found}


def quantile(before: dict[str, int], after: dict[str, int], q: float) -> float:
    """The bucket bound under which a share ``q`` of the probes between the two readings fell."""
    bounds = sorted(after, key=lambda le: float(le))
    total = after["+Inf"] - before.get("+Inf", 0)
    for le in bounds:
        if after[le] - before.get(le, 0) >= q * total:
            return float(le)
    return float("inf")


@pytest.fixture
def peer(daemons: DaemonFactory, converted: Path) -> Iterator[Daemon]:  # noqa: F811
    yield start(daemons, "--roles", "shaker", cache=converted)


def test_the_loop_stays_responsive_while_the_peer_loads_writes_and_serves(
    peer: Daemon, tmp_path: Path, model_cache: Path
) -> None:
    from garden.distill.checkpoints import RunDir
    from garden.models.loading import load_model
    from harness.trainers import make_tiny_student

    # a 100 MB checkpoint in the peer's data dir, as its trainer writes one
    student = make_tiny_student(tmp_path / "student", hidden_size=512)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    body = mission_body(16, shard_size=8)  # two shards: the peer samples one, this test "finishes" the other
    prompts = [p["prompt"] for p in body["prompts"]]
    tokenizer_name = load_model("builtin:smollm2-135m").tokenizer.name_or_path
    row_sets = [big_row_set(prompts[shard * 8 :][:7], tokenizer_name) for shard in (0, 1)]
    assert all(50 * 2**20 < len(row_set) <= 64 * 2**20 for row_set in row_sets)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    health = HealthPoller(peer, tmp_path)
    dht = hivemind.DHT(initial_peers=[peer.join_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        before = lag_counts(peer)
        mission_id = create(peer, body)  # the peer loads its teacher and starts shaking now
        run = RunDir(peer.data_dir / "train" / mission_id / "out")
        run.create({"student": str(student)})
        model, tokenizer = AutoModelForCausalLM.from_pretrained(student), AutoTokenizer.from_pretrained(student)
        checkpoint = run.save(1, model, tokenizer, {"step": 1}, {"loss": 1.0})
        weights = "model/model.safetensors"
        assert checkpoint.manifest["files"][weights] and (checkpoint.path / weights).stat().st_size > 90e6

        async def load() -> tuple[tuple[bool, str], float]:
            # a producer's done record names the row set first, as an honest peer's does: peers take no other
            leases = LeaseManager(dht, DHTKeys(), key)
            lease = await leases.claim(mission_id, 2)
            assert lease is not None
            row_set = row_sets[lease.shard]
            digest = hashlib.sha256(row_set).hexdigest()
            await leases.mark_done(lease, rows=7, row_set_sha256=digest)
            p2p = await dht.replicate_p2p()
            ref_rows = ContentRef(kind="rows", mission_id=mission_id, sha256=digest,
                                  item=f"{lease.shard}:{lease.attempt}:{leases.peer_id}")  # fmt: skip
            ref_ckpt = ContentRef(kind="ckpt", mission_id=mission_id, item=f"1/{weights}",
                                  sha256=checkpoint.manifest["files"][weights])  # fmt: skip

            async def holder(ref: ContentRef) -> bytes | None:
                return row_set if ref == ref_rows else None

            transfer = ContentTransfer(p2p, holder, namespace=DEFAULT_SWARM)
            await transfer.start()
            began = time.monotonic()
            try:
                offered, *_ = await asyncio.gather(
                    transfer.offer(peer.peer_id, ref_rows),
                    transfer.fetch_file(peer.peer_id, ref_ckpt, tmp_path / "pulled"),
                )
            finally:
                await transfer.stop()
                await p2p.shutdown()
            return offered, time.monotonic() - began

        offered, took = asyncio.run(load())
        assert offered == (True, "stored"), offered
        assert hashlib.sha256((tmp_path / "pulled").read_bytes()).hexdigest() == checkpoint.manifest["files"][weights]
        wait_until(lambda: shaken(peer, mission_id), 180, interval=1.0, message="a shard shaken (the teacher loaded)")
        after = lag_counts(peer)
        latencies = health.stop()
    finally:
        health.close()
        dht.shutdown()
    p99 = quantile(before, after, 0.99)
    probes = after["+Inf"] - before["+Inf"]
    over = {le: probes - (after[le] - before[le]) for le in ("0.05", "0.1", "0.25")}
    print(json.dumps({"load_s": round(took, 1), "probes": probes, "probes_later_than": over, "lag_p99_le": p99,
                      "health_max_s": round(max(latencies), 3), "health_polls": len(latencies)}))
    assert p99 <= LAG_BUDGET, (before, after)
    assert max(latencies) < LAG_BUDGET * 4, sorted(latencies)[-5:]


def shaken(peer: Daemon, mission_id: str) -> bool:
    """The peer has loaded its teacher and sampled a shard with it."""
    return bool(peer.get(f"/missions/{mission_id}").json()["this_peer"]["shards_shaken"] >= 1)
