"""A hostile peer (a plain hivemind DHT plus garden's transfer code, serving lies) against real daemons:
forged mission records, a stranger's cancel, forged announcements, a backdated done record, a row set offered
that no done record names, and row sets offered (named by the attacker's own done records) with garbage,
oversized or mismatching content. The daemons refuse and count all of it, store nothing, and keep running.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import hivemind

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.utils.timed_storage import get_dht_time

from garden.data import demo_prompts
from garden.mission.book import row_set_item
from garden.mission.leases import LeaseManager
from garden.net.transfer import ContentTransfer
from garden.protocol.content import ContentRef
from garden.protocol import signing
from garden.protocol.keys import DHTKeys
from garden.protocol.mission import (
    MissionBody,
    MissionDraft,
    MissionSpec,
    cancel_subkey,
    sign_cancel,
    sign_index_head,
    sign_mission,
)
from garden.protocol.mission_spec import canonical_msgpack
from garden.protocol.records import seal
from garden.protocol.row_sets import HeldRowSet, RowsAnnouncement, rows_subkey
from garden.protocol.shards import DoneRecord, LeaseRecord
from harness.daemons import Daemon, DaemonFactory, HealthPoller, wait_until
from harness.rows import remake_row
from tests.mission.test_missions_swarm import (  # noqa: F401 (converted: a fixture)
    converted,
    create,
    export,
    held_row_sets,
    mission_body,
    start,
    wait_done,
)

pytestmark = pytest.mark.swarm

SPEC = {
    "name": "real",
    "teachers": ["builtin:smollm2-135m"],
    "prompts": "prompts.jsonl",
    "shard_size": 2,
    "student": {"base": "builtin:smollm2-135m"},
}


def metric(daemon: Daemon, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in daemon.get("/metrics").text.splitlines() if line.startswith(prefix))


def forged_records(attacker: rsa.RSAPrivateKey, real_id: str, lead_id: str) -> list[tuple[str, object, object]]:
    """(key, subkey, value) of every forgery; the real mission is ``real_id``."""
    keys = DHTKeys()
    prompts = tuple(demo_prompts()[:4])
    theirs = sign_mission(
        MissionDraft(spec=MissionSpec.model_validate(SPEC | {"name": "fake"}), prompts=prompts), attacker
    )
    wire = bytearray(theirs.to_wire())
    wire[-5] ^= 0xFF  # inside the signature

    def signed_body(spec: dict) -> tuple[str, bytes]:
        """A mission record, signed by its lead, whose spec no honest peer could have written."""
        body = MissionBody(
            spec=canonical_msgpack(spec), prompts_sha256="ab" * 32, prompts_count=4, shard_count=2,
            lead=signing.public_key_der(attacker), created=time.time(),
        )  # fmt: skip
        encoded = canonical_msgpack(body.model_dump(mode="python"))
        return hashlib.sha256(encoded).hexdigest(), seal(encoded, attacker)

    # judges that would make every shaker read its own disk, or send requests into its own LAN
    file_ref = {"kind": "json_schema", "schema": {"properties": {"a": {"$ref": "file:///dev/zero"}}}}
    lan_ref = {"kind": "json_schema", "schema": {"$ref": "http://192.168.1.1/schema.json"}}
    backtracking = {"kind": "regex", "pattern": r"^(a+)+\1$"}  # a backreference: RE2 refuses it
    lie = RowsAnnouncement(
        mission_id=real_id,
        peer_id=lead_id,  # claims the lead holds what it does not
        has_prompts=True,
        row_sets=[HeldRowSet(shard=0, attempt="0" * 16, producer=lead_id, sha256="cd" * 32, rows=2)],
        announced_at=get_dht_time(),
    )
    return [
        (keys.missions, theirs.mission_id, bytes(wire)),  # bad signature
        (keys.missions, "ef" * 32, theirs.to_wire()),  # stored under another hash than its own
        (keys.missions, *signed_body(SPEC | {"sampling": {"temperature": 99.0}})),  # invalid spec
        (keys.missions, *signed_body(SPEC | {"judge": file_ref})),
        (keys.missions, *signed_body(SPEC | {"judge": lan_ref})),
        (keys.missions, *signed_body(SPEC | {"judge": backtracking})),
        (keys.missions, theirs.mission_id, b"\xc1garbage"),
        (keys.missions, cancel_subkey(real_id, lead_id), sign_cancel(real_id, attacker)),  # posing as the lead
        (keys.mission_rows(real_id), rows_subkey(lead_id), lie.to_wire(attacker)),  # someone else's announcement
    ]


def test_forged_mission_records_and_lying_senders_are_refused(
    daemons: DaemonFactory, tmp_path: Path, model_cache: Path
) -> None:
    env = {"GARDEN_CACHE_DIR": str(model_cache)}  # the trainers measure the built-in student: converted once
    lead = daemons.start("--roles", "trainer", env=env)  # no shaker: only the forgeries move data in this test
    other = daemons.start("--roles", "trainer", "--join", lead.join_addr, env=env)
    body = {"spec": SPEC, "prompts": [p.model_dump(mode="json") for p in demo_prompts()[:4]]}
    created = lead.request("POST", "/missions", json=body)
    assert created.status_code == 201, created.text
    real_id = created.json()["id"]
    wait_until(lambda: other.get(f"/missions/{real_id}").status_code == 200, 30, 0.5, "the other peer knows it")

    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    hostile = hivemind.DHT(initial_peers=[lead.join_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    health = HealthPoller(other, tmp_path)  # the port stays quick while the forgeries are read and refused
    try:
        records = forged_records(attacker, real_id, lead.peer_id)
        for key, subkey, value in records:
            hostile.store(key, value, get_dht_time() + 600, subkey=subkey)
        # a stranger's cancel under its own subkey passes the DHT but is not obeyed; the stranger's own head (a
        # valid one: its entries changed) makes every reader read the index whole, forgeries and cancel included
        attacker_id = signing.peer_id_of(signing.public_key_der(attacker))
        hostile.store(
            DHTKeys().missions, sign_cancel(real_id, attacker), get_dht_time() + 600,
            subkey=cancel_subkey(real_id, attacker_id),
        )  # fmt: skip
        full_reads = metric(other, 'garden_mission_index_reads_total{kind="full"}')
        hostile.store(DHTKeys().mission_heads, sign_index_head(attacker, [], [real_id], get_dht_time()),
                      get_dht_time() + 600, subkey=attacker_id)  # fmt: skip
        # a done record with no lease, or finished before its lease (backdated to 0, to win every race): the
        # DHT nodes of honest peers refuse to store it (the hostile node keeps its own copy), and readers drop it
        attempts = [f"{i:016x}" for i in range(4)]
        backdated = done_record(attacker, real_id, 0, "e" * 16, "ab" * 32, finished=0.0, check=False)
        no_lease = {k: v for k, v in backdated.items() if k != "lease"}
        for body in (backdated, no_lease):
            sealed = seal(canonical_msgpack(body), attacker)
            hostile.store(DHTKeys().mission_shards(real_id), sealed, get_dht_time() + 600,
                          subkey=f"done:0:{attacker_id}:{'e' * 16}")  # fmt: skip
        board = asyncio.run(LeaseManager(hostile, DHTKeys(), attacker).fetch(real_id, 2))
        assert board.shards[0].winner is None and board.winners() == {}
        answers = asyncio.run(lying_offers(hostile, real_id, lead.peer_id, attacker, attempts))
        time.sleep(3)  # a few refresh rounds (announce period 1 s)

        assert metric(other, 'garden_mission_index_reads_total{kind="full"}') > full_reads  # read after the head
        for daemon in (lead, other):
            missions = daemon.get("/missions").json()
            assert [m["id"] for m in missions] == [real_id], missions
            assert missions[0]["state"] != "cancelled"
            assert daemon.get("/health").json() == {"status": "ok"}
        refused = metric(lead, "garden_invalid_mission_records_total") + metric(
            other, "garden_invalid_mission_records_total"
        )
        assert refused >= len(records), refused

        # every lying offer was answered "no", nothing was stored, and the liars were counted
        assert [ok for ok, _ in answers] == [False] * len(answers), answers
        assert "unknown mission" in answers[-1][1]
        assert answers[3] == (False, "no done record names this row set"), answers[3]
        assert metric(lead, "garden_mission_row_sets_held") == 0
        # the one that hashed right but decoded to nothing, and the one no done record names
        assert metric(lead, "garden_row_sets_refused_total") == 2
        assert metric(lead, 'garden_transfer_refused_total{reason="hash mismatch"}') == 1
        assert "avoided" in answers[2][1], answers[2]  # a sender caught lying is not asked again for 10 min
        detail = lead.get(f"/missions/{real_id}").json()
        assert all(p["row_sets"] == 0 for p in detail["peers"])
        latencies = health.stop()
        served = health.served  # the daemon's own time: the other test worker's daemons do not move it
        print(f"/health through forgeries: {len(latencies)} answers, slowest {max(latencies) * 1000:.0f} ms seen, "
              f"{max(served) * 1000:.0f} ms served")
        assert max(served) < 0.25, sorted(served)[-5:]
    finally:
        health.close()
        hostile.shutdown()


def done_record(
    key: rsa.RSAPrivateKey, mission_id: str, shard: int, attempt: str, digest: str, finished: float | None = None,
    check: bool = True, shard_count: int = 2,
) -> dict[str, object]:
    """A done record of ``key``'s, under a lease it signed itself (what anyone can make), as a dict; checked
    as a DoneRecord unless ``check`` is False (a forgery the model would refuse)."""
    now = get_dht_time()
    producer = signing.peer_id_of(signing.public_key_der(key))
    lease = LeaseRecord(mission_id=mission_id, shard=shard, shard_count=shard_count, peer_id=producer,
                        attempt=attempt, started=now, renewed=now, expires=now + 60)  # fmt: skip
    body: dict[str, object] = {
        "v": 1, "mission_id": mission_id, "shard": shard, "shard_count": shard_count, "peer_id": producer,
        "attempt": attempt,
        "rows": 2, "row_set_sha256": digest, "finished": now if finished is None else finished, "teachers": {},
        "lease": lease.to_wire(key),
    }  # fmt: skip
    if check:
        DoneRecord.model_validate(body)
    return body


async def lying_offers(
    hostile: hivemind.DHT, mission_id: str, target: str, attacker: rsa.RSAPrivateKey, attempts: list[str]
) -> list[tuple[bool, str]]:
    """Offer row sets to ``target`` whose content, fetched back from us, is a lie of each kind. The attacker
    publishes done records naming the first three (a lease it signed itself is all it takes), so that the
    target fetches them and checks the content; the fourth no done record names."""
    served: dict[str, bytes] = {}
    async with serving(hostile, served) as transfer:
        me = transfer.peer_id
        garbage = b"\xc1not a row set"
        lies = [
            (garbage, hashlib.sha256(garbage).hexdigest()),  # hashes right, decodes to nothing: refused
            (b"some bytes", "ab" * 32),  # does not hash to what the ref names: refused, and we are avoided
            (b"\x00" * (64 * 1024 * 1024 + 1), "cd" * 32),  # over the 64 MiB cap: never even asked for
        ]
        producer = signing.peer_id_of(signing.public_key_der(attacker))
        shards_key = DHTKeys().mission_shards(mission_id)
        answers = []
        for i, (content, digest) in enumerate([*lies, (b"unvouched", hashlib.sha256(b"unvouched").hexdigest())]):
            shard, attempt = i % 2, attempts[i]  # the mission has 2 shards
            if i < len(lies):
                done = DoneRecord.model_validate(done_record(attacker, mission_id, shard, attempt, digest))
                stored = await hostile.store(shards_key, done.to_wire(attacker), get_dht_time() + 600,
                                             subkey=done.subkey, return_future=True)  # fmt: skip
                assert stored, "the attacker's own done record is a valid record"
            item = row_set_item(shard, attempt, producer)  # served by us, produced (it says) by the attacker
            served[item] = content
            ref = ContentRef(kind="rows", mission_id=mission_id, item=item, sha256=digest)
            answers.append(await transfer.offer(target, ref))
        unknown = ContentRef(kind="rows", mission_id="ee" * 32, item=row_set_item(0, "f" * 16, me), sha256="ab" * 32)
        answers.append(await transfer.offer(target, unknown))
        return answers


@asynccontextmanager
async def serving(hostile: hivemind.DHT, served: dict[str, bytes]) -> AsyncIterator[ContentTransfer]:
    """A content transfer on the hostile node that serves ``served`` (row-set item -> bytes) as they are put."""

    async def source(ref: ContentRef) -> bytes | None:
        return served.get(ref.item)

    p2p = await hostile.replicate_p2p()
    transfer = ContentTransfer(p2p, source)
    await transfer.start()
    try:
        yield transfer
    finally:
        await transfer.stop()
        await p2p.shutdown()


def test_a_done_record_naming_rows_nobody_serves_is_void_and_the_shard_sampled_again(
    daemons: DaemonFactory,
    converted: Path,  # noqa: F811 (the fixture imported above)
) -> None:
    """The attack: a throwaway key "finishes" every shard first (a lease it signed itself, a row set nobody
    has), which used to mark the mission done with no rows forever. A peer that cannot get the rows within
    --void-after holds those records void, samples the shards itself, and its rows are the mission's."""
    a = start(daemons, "--void-after", "5", "--lease-seconds", "10", cache=converted)
    mission_id = create(a, mission_body(prompts=4))  # 2 shards of 2 prompts
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    hostile = hivemind.DHT(initial_peers=[a.join_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    forged = {f"{shard:016x}" for shard in (0, 1)}
    try:
        for shard, attempt in enumerate(sorted(forged)):
            done = DoneRecord.model_validate(done_record(attacker, mission_id, shard, attempt, "ab" * 32))
            stored = hostile.store(DHTKeys().mission_shards(mission_id), done.to_wire(attacker),
                                   get_dht_time() + 600, subkey=done.subkey)  # fmt: skip
            assert stored, "a done record under a self-signed lease is a valid record"
        wait_until(lambda: metric(a, "garden_done_records_voided") >= 2, 120, 0.5, "both forged records void")
        final = wait_done(a, mission_id)
    finally:
        hostile.shutdown()
    held = held_row_sets(a, mission_id)
    assert sorted(held) == [0, 1] and not set().union(*held.values()) & forged, held
    assert final["rows"] == 4 and len(export(a, mission_id)) == 4
    assert a.get("/health").json() == {"status": "ok"}


def test_a_row_set_with_forged_log_probs_is_refuted_and_an_honest_one_verified(
    daemons: DaemonFactory,
    converted: Path,  # noqa: F811 (the fixture imported above)
) -> None:
    """Two strangers win a shard each with a done record under a lease they signed themselves, and offer the
    rows to both peers: real rows of the built-in teacher, but one stranger's log-probs are made up. Peer A
    (the lead, with the teacher) checks the rows it took (garden.distill.verify): it refutes the forged row set
    (void, dropped, its shard sampled again by itself, its producer's later records ignored), publishes a
    signed refutation, and verifies the honest one. Peer B, which samples nothing and cannot check, obeys A's
    refutation (A leads the mission) and drops the forged rows. A third stranger's refutation of the honest
    row set is only a claim: A checks the named row, it holds, and both peers keep the honest rows."""
    from garden.distill.judges import ReferenceJudge
    from garden.distill.shaker import ShakeConfig, shake
    from garden.models.loading import load_model
    from garden.protocol.mission import shard_prompts
    from garden.protocol.row_sets import pack_row_set, row_set_sha256
    from garden.protocol.rows import PromptRow
    from garden.protocol.shards import RefutationRecord

    body = mission_body(prompts=4)  # 2 shards of 2 prompts; its own rows first, then the mission
    prompts = [PromptRow.model_validate(p) for p in body["prompts"]]
    teacher = load_model("builtin:smollm2-135m")
    sampling = ShakeConfig(candidates=2, max_new_tokens=6, top_k_logprobs=4, batch_prompts=2, seed=7)
    row_sets = []
    for shard, shard_rows in enumerate(shard_prompts(prompts, 2)):
        rows = shake(teacher, shard_rows, ReferenceJudge(threshold=0.5), sampling).rows
        assert len(rows) == 2
        if shard == 0:  # every token's log-probs lowered: the rows still decode, the numbers are not the teacher's
            rows = [remake_row(row, topk_logprobs=row.topk_logprobs_array() - 0.3) for row in rows]
        row_sets.append(pack_row_set(rows))
    liar, honest, slanderer = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3))
    producers = [liar, honest]

    a = start(daemons, "--lease-seconds", "10", cache=converted)
    b = start(daemons, "--roles", "trainer", join=a, cache=converted)  # no teacher checks here
    mission_id = create(a, body)
    wait_until(lambda: b.get(f"/missions/{mission_id}").status_code == 200, 30, 0.5, "B knows the mission")
    hostile = hivemind.DHT(initial_peers=[a.join_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    attempts = [f"{shard + 10:016x}" for shard in (0, 1)]
    shards_key = DHTKeys().mission_shards(mission_id)
    try:
        dones = []
        for shard, (key, packed) in enumerate(zip(producers, row_sets, strict=True)):
            done = DoneRecord.model_validate(done_record(key, mission_id, shard, attempts[shard],
                                                         row_set_sha256(packed)))  # fmt: skip
            assert hostile.store(shards_key, done.to_wire(key), get_dht_time() + 600, subkey=done.subkey)
            dones.append(done)
        targets = [a.peer_id, b.peer_id]
        answers = asyncio.run(offer_row_sets(hostile, mission_id, targets, producers, attempts, row_sets))
        assert answers == [(True, "stored")] * 4, answers
        # the slanderer says row 0 of the honest set fails
        slanderer_id = signing.peer_id_of(signing.public_key_der(slanderer))
        slander = RefutationRecord(
            mission_id=mission_id, shard=1, shard_count=2, peer_id=slanderer_id, attempt=attempts[1],
            producer=dones[1].peer_id, row_set_sha256=dones[1].row_set_sha256, row=0, reason="top-k log-probs off",
            at=get_dht_time(),
        )  # fmt: skip
        assert hostile.store(shards_key, slander.to_wire(slanderer), get_dht_time() + 600, subkey=slander.subkey)

        def checked() -> dict[str, object] | None:
            found = a.get(f"/missions/{mission_id}").json()["verification"]
            done = found["refuted"] == 1 and found["verified"] == 1 and found["unconfirmed"] == 1
            return found if done and "is not confirmed here" in a.stderr() else None

        verification = wait_until(checked, 120, 0.5, "one row set refuted, one verified, the slander not confirmed")
        final = wait_done(a, mission_id)

        def obeyed() -> dict[str, object] | None:
            found = b.get(f"/missions/{mission_id}").json()["verification"]
            gone = attempts[0] not in held_row_sets(b, mission_id).get(0, set())
            return found if found["refuted"] == 1 and gone else None

        on_b = wait_until(obeyed, 60, 0.5, "B obeys the lead's refutation")
    finally:
        hostile.shutdown()
    liar_id = signing.peer_id_of(signing.public_key_der(liar))
    assert verification["producers_refuted"] == [liar_id] and verification["rows_checked"] >= 2
    held = held_row_sets(a, mission_id)
    assert attempts[0] not in held.get(0, set()) and held[0], held  # sampled again, by the peer itself
    assert held[1] == {attempts[1]}  # the honest stranger's rows stand
    assert final["rows"] == 4 and len(export(a, mission_id)) == 4
    assert "is refuted" in a.stderr()
    # B: the forged rows gone on the lead's word, the honest ones kept despite the slander (B trusts only A)
    assert on_b["producers_refuted"] == [liar_id] and on_b["rows_checked"] == 0 and on_b["unconfirmed"] == 1
    assert attempts[1] in held_row_sets(b, mission_id).get(1, set())
    assert "whom this peer trusts" in b.stderr()
    for peer in (a, b):
        assert peer.get("/health").json() == {"status": "ok"}


async def offer_row_sets(
    hostile: hivemind.DHT, mission_id: str, target: str | list[str], producers: list[rsa.RSAPrivateKey],
    attempts: list[str], row_sets: list[bytes], shards: list[int] | None = None,
) -> list[tuple[bool, str]]:
    """Serve each row set (of shard ``shards[i]``, by default ``i``) from the hostile node and offer it to
    ``target`` (each of them, in turn), as its producer would; the answers in order, target by target. One
    serving transfer for all (a hivemind DHT hands out its p2p replica once per event loop)."""
    from garden.protocol.row_sets import row_set_sha256

    served: dict[str, bytes] = {}
    shards = list(range(len(row_sets))) if shards is None else shards
    async with serving(hostile, served) as transfer:
        answers = []
        for peer in [target] if isinstance(target, str) else target:
            for shard, key, attempt, packed in zip(shards, producers, attempts, row_sets, strict=True):
                item = row_set_item(shard, attempt, signing.peer_id_of(signing.public_key_der(key)))
                served[item] = packed
                ref = ContentRef(kind="rows", mission_id=mission_id, item=item, sha256=row_set_sha256(packed))
                answers.append(await transfer.offer(peer, ref))
        return answers



def test_an_offered_row_set_that_did_not_win_is_never_trained_on(
    daemons: DaemonFactory,
    converted: Path,  # noqa: F811 (the fixture imported above)
) -> None:
    """The attack: a stranger finishes shard 0 second (a lease it signed itself, a done record that names its
    row set) and offers invented answers. The peer takes the offer (a done record names it) and keeps it while
    the shard's winner is not safely held anywhere (here the winner's rows are served by nobody), but the set
    lost its shard: the training feed never reads it and the export leaves it out."""
    import numpy as np

    from garden.protocol.row_sets import pack_row_set, row_set_sha256
    from garden.protocol.rows import DorpoRow
    from garden.store import RowFeed

    body = mission_body(prompts=4)  # 2 shards of 2 prompts
    a = start(daemons, "--roles", "trainer", cache=converted)  # samples nothing: only the strangers' rows
    mission_id = create(a, body)
    poisoned = [
        DorpoRow.from_arrays(
            prompt=p["prompt"], chosen="POISONED ANSWER", rejected=None, chosen_ids=[1, 2], topk_ids=[[1], [2]],
            topk_logprobs=np.zeros((2, 1)), teacher="builtin:smollm2-135m", judge="reference", scores={},
            tokenizer="tok", vocab_size=49152,
        )  # fmt: skip
        for p in body["prompts"][:2]
    ]
    packed = pack_row_set(poisoned)
    first, second = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    attempts = ["0e" * 8, "0f" * 8]
    hostile = hivemind.DHT(initial_peers=[a.join_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        for key, attempt, digest in ((first, attempts[0], "ab" * 32), (second, attempts[1], row_set_sha256(packed))):
            # the first wins, and nobody serves its rows; the second finishes a second later: it loses
            time.sleep(1.0)
            done = DoneRecord.model_validate(done_record(key, mission_id, 0, attempt, digest))
            assert hostile.store(DHTKeys().mission_shards(mission_id), done.to_wire(key), get_dht_time() + 600,
                                 subkey=done.subkey)  # fmt: skip
        answers = asyncio.run(offer_row_sets(hostile, mission_id, a.peer_id, [second], [attempts[1]], [packed]))
        assert answers == [(True, "stored")], answers
        time.sleep(3)  # a few looks at the mission: the loser stays (its winner is not held), and is not won
        assert held_row_sets(a, mission_id) == {0: {attempts[1]}}
        feed = RowFeed(a.data_dir / "garden.sqlite3", mission_id)
        try:
            assert feed.new_rows() == []
        finally:
            feed.close()
        response = a.get(f"/missions/{mission_id}/rows", params={"format": "jsonl"})
        assert response.status_code == 200 and "POISONED" not in response.text, response.text[:300]
    finally:
        hostile.shutdown()
    assert a.get("/health").json() == {"status": "ok"}
