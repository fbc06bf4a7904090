"""One hostile side against three honest peers, and the same mission without it (real daemons, real hivemind,
the built-in teacher, a tiny student): the attacks of issue 16 at once, and what they change, which must be
nothing the honest peers keep.

The mission is made once, by a lead that is then stopped: each run starts from a copy of that lead's data
directory (its identity, the signed mission and its prompts), so both runs are one mission, with one id and so
one sampling seed per prompt. Three honest peers (the lead A, and B and C, which trust A's missions) shake its 4
shards and train the student for 4 epochs; the lead vouches for the checkpoints. In the attacked run the hostile
side, all under one throwaway key:

- wins shard 0 with a done record (under a lease it signed itself) naming real answers of the teacher with
  forged log-probs, and shard 1 with the teacher's true numbers on an answer the judge rejects, and offers both
  row sets to every honest peer: the rows are checked and refuted, the shards sampled again;
- finishes shard 2 first with a done record naming rows nobody serves: void after ``--void-after``;
- stores a backdated done record (finished at 0) for shard 3 with invented rows, and offers them: the honest
  DHT nodes refuse the record, and with no valid done record naming them the rows are refused;
- trains beside them: one trainer sends its gradients with a weight of 1e30 (refused), one returns a million
  times the average of the parts it reduces (refused: each honest peer keeps its own values for that share),
  another sends gradients a million times an honest norm (left out), a fourth claims epoch 10^7 with parameters
  a thousand times too large (ignored, never loaded);
- announces a poisoned checkpoint at epoch 10^7 (never pulled: it is not vouched for).

Then: the exported rows equal the attack-free run's, the pulled (vouched) student's held-out KL is within 10 %
of the attack-free run's, and the honest peers keep running. The hostile layer server (noise, 1e9 announced)
has its own swarm of honest servers: ``tests/inference/test_hostile_inference.py``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hivemind
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.utils.timed_storage import get_dht_time

from garden.data import demo_prompts
from garden.protocol import signing
from garden.protocol.keys import DHTKeys
from garden.protocol.mission_spec import canonical_msgpack
from garden.protocol.records import seal
from garden.protocol.shards import DoneRecord
from harness.daemons import Daemon, DaemonFactory, wait_until
from harness.rows import remake_row
from tests.mission.test_missions_forged import done_record, metric, offer_row_sets
from tests.mission.test_missions_swarm import export, held_row_sets, settled, wait_done
from tests.mission.test_training_swarm import (  # noqa: F401 (tiny: a fixture)
    TEACHER,
    garden_cli,
    mission_body,
    publish_poisoned,
    start,
    tiny,
    training,
)

pytestmark = [pytest.mark.swarm, pytest.mark.serial]
EPOCHS = 4
SHARDS = 4
CLAIMED_EPOCH = 10**7
VOID_AFTER = 30
"""--void-after: the hostile side offers its row sets once every honest peer runs (a hivemind DHT serves from one
event loop), some 20 s after its done records; the record naming rows nobody serves is void 30 s after it is seen."""
HOSTILE_TRAINER = Path(__file__).resolve().parents[1] / "collab" / "hostile_trainer.py"
HOSTILE_CHECKPOINT = Path(__file__).with_name("hostile_checkpoint.py")


def body(student: Path) -> dict[str, Any]:
    """The training swarm test's mission (8 prompts in 4 shards of 2), for 3 epochs among 3 trainers."""
    mission = mission_body(student, max_epochs=EPOCHS, min_trainers=3)
    assert len(mission["prompts"]) == 2 * SHARDS and mission["spec"]["shard_size"] == 2
    return mission


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, model_cache: Path, tiny: Path) -> tuple[Path, str]:  # noqa: F811
    """The lead's data directory just after it made the mission (the lead stopped), and the mission's id."""
    factory = DaemonFactory(tmp_path_factory.mktemp("made"))
    try:
        lead = start(factory, model_cache, "--roles", "trainer")
        response = lead.request("POST", "/missions", json=body(tiny))
        assert response.status_code == 201, response.text
        mission_id = str(response.json()["id"])
        assert lead.stop() == 0
    finally:
        assert not factory.close()
    return lead.data_dir, mission_id


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """16 held-out prompts with the teacher's top-4 on their references, for ``garden eval``."""
    from garden.distill.evaluate import rows_from_prompts
    from garden.models.loading import load_model
    from garden.protocol.rows import write_preference_jsonl

    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    write_preference_jsonl(rows_from_prompts(load_model(TEACHER), demo_prompts("heldout")[:16], k=4), path)
    return path


def forged_rows() -> tuple[bytes, bytes, bytes]:
    """The hostile shaker's row sets: shard 0, the teacher's answers with every log-prob lowered by 0.3; shard 1,
    an answer the reference judge rejects with the teacher's true top-k on it; shard 3, invented answers."""
    from garden.distill.judges import ReferenceJudge
    from garden.distill.shaker import ShakeConfig, shake, teacher_topk
    from garden.models.chat import answer_ids, chat_prompt_ids
    from garden.models.loading import load_model, tokenizer_fingerprint
    from garden.protocol.row_sets import pack_row_set
    from garden.protocol.rows import DorpoRow, PromptRow

    prompts = [PromptRow.model_validate(p) for p in body(Path("."))["prompts"]]
    teacher = load_model(TEACHER)
    sampling = ShakeConfig(candidates=2, max_new_tokens=6, top_k_logprobs=4, batch_prompts=2, seed=7)
    real = shake(teacher, prompts[0:2], ReferenceJudge(threshold=0.5), sampling).rows
    assert len(real) == 2
    lowered = [remake_row(row, topk_logprobs=row.topk_logprobs_array() - 0.3) for row in real]
    tokenizer = teacher.tokenizer
    wrong = []
    for prompt in prompts[2:4]:
        chosen = "Bananas are purple."
        ids = answer_ids(tokenizer, chosen)
        ((top_ids, top_logprobs),), vocab = teacher_topk(teacher, [(chat_prompt_ids(tokenizer, prompt.prompt), ids)], 4)
        wrong.append(DorpoRow.from_arrays(
            prompt=prompt.prompt, chosen=chosen, rejected=None, chosen_ids=ids, topk_ids=top_ids.numpy(),
            topk_logprobs=top_logprobs.numpy(), teacher=TEACHER, judge="reference", scores={"chosen": 1.0},
            tokenizer=tokenizer_fingerprint(tokenizer), vocab_size=vocab,
        ))  # fmt: skip
    invented = [
        DorpoRow.from_arrays(
            prompt=p.prompt, chosen="POISONED ANSWER", rejected=None, chosen_ids=[1, 2], topk_ids=[[1], [2]],
            topk_logprobs=np.zeros((2, 1)), teacher=TEACHER, judge="reference", scores={},
            tokenizer="tok", vocab_size=49152,
        )  # fmt: skip
        for p in prompts[6:8]
    ]
    return pack_row_set(lowered), pack_row_set(wrong), pack_row_set(invented)


class HostileTrainers:
    """Four trainers from an honest worker's configuration (the attack-free run's lead's): one lies about its
    weight, one returns a million times what it reduces, one sends parts a million times too large, each in every
    gradient round an honest trainer looks for (it asks that trainer's group to take it in, and takes no step:
    stepping, it would end epochs with samples of its own, a claim garden does not check, docs/security.md), and
    one claims epoch 10^7 and offers parameters a thousand times too large. (One trainer that both lied about its
    weight and reduced was banned from an honest peer's round for its weight before its reductions arrived: its
    lie as a reducer was seen in some runs only.) Ready before the swarm starts (:meth:`wait_ready`;
    :meth:`join` gives them its address), they strike once the 3 honest trainers are in the progress record: a
    trainer whose first read of the record shows only a liar follows it (see garden.collab.robust)."""

    ATTACKS = ("weight", "reducer", "huge", "epoch")

    def __init__(self, root: Path, honest_config: Path) -> None:
        self.root, self.peers_file = root, root / "peers"
        root.mkdir(parents=True)
        attacks = {
            "weight": ["--attack", "weight", "--every-round", "--robust", "--after-trainers", "3"],
            "reducer": ["--attack", "reducer", "--every-round", "--robust", "--after-trainers", "3"],
            "huge": ["--attack", "huge", "--every-round", "--robust", "--after-trainers", "3"],
            "epoch": ["--attack", "epoch", "--claim", str(CLAIMED_EPOCH), "--after-trainers", "3"],
        }
        self.procs: list[subprocess.Popen[str]] = []
        for name in self.ATTACKS:
            config = json.loads(honest_config.read_text())
            where = root / f"trainer-{name}"
            where.mkdir()
            config |= {"status_path": str(where / "status.json"), "out_dir": str(where / "out")}
            (where / "config.json").write_text(json.dumps(config))
            argv = [sys.executable, str(HOSTILE_TRAINER), *attacks[name], "--peers-file", str(self.peers_file),
                    str(where / "config.json")]  # fmt: skip
            with open(where / "log", "w") as log:
                self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log, text=True))

    def wait_ready(self) -> None:
        """Until each has imported and built its student: on two cores beside three shaking daemons that took a
        minute, and an attacker that started with the swarm joined after most of the training (CI saw the huge one
        meet no honest round); what is left after :meth:`join` is its DHT node and optimizer."""
        for name in self.ATTACKS:
            wait_until(lambda n=name: self.status(n).get("state") == "waiting for the swarm", 180, 0.5,
                       f"the {name} attacker ready")  # fmt: skip

    def join(self, lead: Daemon) -> None:
        staged = self.peers_file.with_suffix(".tmp")
        staged.write_text(lead.join_addr)
        staged.rename(self.peers_file)  # whole, at once: the trainers read it as soon as it exists

    def status(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self.root / f"trainer-{name}" / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def rounds(self, name: str) -> list[str]:
        """How each gradient round of an ``--every-round`` attacker ended, by its log (``round N: ...``)."""
        log = (self.root / f"trainer-{name}" / "log").read_text(errors="replace")
        return [line for line in log.splitlines() if line.startswith("round ")]

    def close(self) -> None:
        stop_all(self.procs)


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Hostile:
    """The hostile side of the attacked run, all under one key: a DHT node that stores and offers, and a
    checkpoint server (its trainers: :class:`HostileTrainers`)."""

    def __init__(self, lead: Daemon, mission_id: str, root: Path) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.peer_id = signing.peer_id_of(signing.public_key_der(self.key))
        self.mission_id, self.root, self.lead = mission_id, root, lead
        self.dht = hivemind.DHT(initial_peers=[lead.join_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        self.attempts = [f"{0xA0 + shard:016x}" for shard in range(SHARDS)]
        self.procs: list[subprocess.Popen[str]] = []

    def finish_shards(self, row_sets: tuple[bytes, bytes, bytes]) -> None:
        """Done records: shards 0 and 1 naming the forged sets, shard 2 naming rows nobody serves, shard 3
        backdated to 0 (the honest nodes refuse it; the hostile node keeps its own copy)."""
        from garden.protocol.row_sets import row_set_sha256

        key, shards_key = self.key, DHTKeys().mission_shards(self.mission_id)
        digests = [row_set_sha256(row_sets[0]), row_set_sha256(row_sets[1]), "ab" * 32]
        for shard, digest in enumerate(digests):
            done = DoneRecord.model_validate(done_record(key, self.mission_id, shard, self.attempts[shard], digest,
                                                         shard_count=SHARDS))  # fmt: skip
            assert self.dht.store(shards_key, done.to_wire(key), get_dht_time() + 600, subkey=done.subkey)
        backdated = done_record(key, self.mission_id, 3, self.attempts[3], row_set_sha256(row_sets[2]), finished=0.0,
                                check=False, shard_count=SHARDS)  # fmt: skip
        self.dht.store(shards_key, seal(canonical_msgpack(backdated), key), get_dht_time() + 600,
                       subkey=f"done:3:{self.peer_id}:{self.attempts[3]}")  # fmt: skip

    def offer(self, targets: list[Daemon], row_sets: tuple[bytes, bytes, bytes]) -> list[tuple[bool, str]]:
        return asyncio.run(offer_row_sets(self.dht, self.mission_id, [t.peer_id for t in targets], [self.key] * 3,
                                          [self.attempts[0], self.attempts[1], self.attempts[3]], list(row_sets),
                                          shards=[0, 1, 3]))  # fmt: skip

    def announce_checkpoint(self, student: Path) -> None:
        publish_poisoned(self.root / "ckpt", self.mission_id, student, CLAIMED_EPOCH)
        with open(self.root / "ckpt.log", "w") as log:
            self.procs.append(subprocess.Popen(
                [sys.executable, str(HOSTILE_CHECKPOINT), self.lead.join_addr, str(self.root / "ckpt"),
                 self.mission_id, "garden"], stdout=log, stderr=log, text=True,
            ))  # fmt: skip

    def close(self) -> None:
        stop_all(self.procs)
        self.dht.shutdown()


def run(
    factory: DaemonFactory, cache: Path, made: tuple[Path, str], student: Path, heldout: Path, tmp: Path,
    clean_config: Path | None = None,
) -> dict[str, Any]:
    """One run of the mission on three honest peers, attacked when ``clean_config`` (the attack-free run's lead's
    trainer configuration) is given: its export, the held-out KL of the pulled student, what each peer saw."""
    attacked = clean_config is not None
    made_dir, mission_id = made
    lead_dir = tmp / "lead"
    shutil.copytree(made_dir, lead_dir, ignore=shutil.ignore_patterns("train", "daemon.json"))
    sets = forged_rows() if attacked else None  # before the lead starts: the records must beat its first shard
    # the hostile trainers are ready before the lead starts: on two cores their imports and students take 30-60 s,
    # and a trainer that starts after the honest training did is an epoch behind, in rounds of its own (no attack
    # lands)
    trainers = HostileTrainers(tmp / "hostile", clean_config) if clean_config is not None else None
    hostile: Hostile | None = None
    try:
        if trainers is not None:
            trainers.wait_ready()
        a = start(factory, cache, "--void-after", str(VOID_AFTER), "--lease-seconds", "10", data_dir=lead_dir)
        seen: dict[str, Any] = {"offers": []}
        if trainers is not None and sets is not None:
            hostile = Hostile(a, mission_id, tmp / "hostile")
            hostile.finish_shards(sets)  # before the honest peers could finish a shard
            trainers.join(a)
        trusting = ("--trust-lead", a.peer_id, "--allow-local-models", "--void-after", str(VOID_AFTER),
                    "--lease-seconds", "10")  # fmt: skip
        b = start(factory, cache, *trusting, join=a)
        c = start(factory, cache, *trusting, join=a)
        peers = [a, b, c]
        for peer in (b, c):
            wait_until(lambda p=peer: p.get(f"/missions/{mission_id}").status_code == 200, 60, 0.5, "mission known")
        if hostile is not None and sets is not None:
            seen["offers"] = hostile.offer(peers, sets)  # within --void-after of the records, for every peer
        wait_until(lambda: all(training(d, mission_id).get("state") == "done" for d in peers), 420, 1.0,
                   "all three trained")  # fmt: skip
        if hostile is not None:
            hostile.announce_checkpoint(student)
            listed = f"/missions/{mission_id}/checkpoints"
            wait_until(lambda: CLAIMED_EPOCH in {c["epoch"] for c in b.get(listed).json()}, 60, 0.5,
                       "the poisoned checkpoint announced")  # fmt: skip

        def vouched() -> dict[str, Any] | None:
            listed = b.get(f"/missions/{mission_id}/checkpoints").json()
            return next((c for c in listed if c["epoch"] == EPOCHS and c["verified"]), None)

        seen["vouched"] = wait_until(vouched, 240, 1.0, "the lead vouched for the last epoch")
        seen["checkpoints"] = b.get(f"/missions/{mission_id}/checkpoints").json()
        out = tmp / "pulled"
        pulled = garden_cli("mission", "pull", mission_id[:12], "-o", str(out), "--url", b.url)
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        seen["pulled"] = " ".join(pulled.stdout.split())
        evaluated = garden_cli("eval", "--student", str(out), "--data", str(heldout), "--json", "--top-k", "4")
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        seen["kl"] = json.loads(evaluated.stdout)["kl"]
        for peer in peers:
            wait_done(peer, mission_id)
        wait_until(lambda: settled(peers, mission_id, SHARDS), 120, 1.0, "one attempt of each shard, held twice")
        # the lead checks the row sets it holds a few per period, between its own work: all of them, before they
        # are asserted on (a loaded machine finishes the mission before the lead's last check)
        wait_until(lambda: a.get(f"/missions/{mission_id}").json()["verification"]["pending"] == 0, 180, 1.0,
                   "the lead checked every row set it holds")  # fmt: skip
        exports = [sorted(export(peer, mission_id), key=lambda row: row["row_id"]) for peer in peers]
        seen["export"] = exports[0]
        assert all(e == exports[0] for e in exports), "the honest peers export different rows"
        seen["lead"] = a.peer_id
        seen["held"] = [held_row_sets(peer, mission_id) for peer in peers]
        seen["detail"] = [peer.get(f"/missions/{mission_id}").json() for peer in peers]
        seen["train"] = [training(peer, mission_id) for peer in peers]
        seen["voided"] = sum(metric(peer, "garden_done_records_voided") for peer in peers)
        seen["health"] = [peer.get("/health").json() for peer in peers]
        seen["logs"] = [peer.stderr() for peer in peers]
        seen["worker_logs"] = [(peer.data_dir / "train" / mission_id / "worker.log").read_text() for peer in peers]
        if hostile is not None:
            assert trainers is not None
            statuses = {n: trainers.status(n) | {"log": trainers.rounds(n)} for n in HostileTrainers.ATTACKS}
            seen["hostile"] = {"peer_id": hostile.peer_id, "attempts": hostile.attempts, "trainers": statuses}
        return seen
    finally:
        if hostile is not None:
            hostile.close()
        if trainers is not None:
            trainers.close()
        for daemon in list(factory.daemons):
            if daemon.proc.poll() is None:
                daemon.stop()


@pytest.mark.timeout(1500)
def test_one_hostile_peer_against_three_honest_ones_changes_nothing_they_keep(
    model_cache: Path, made: tuple[Path, str], tiny: Path, heldout: Path, tmp_path: Path  # noqa: F811
) -> None:
    results = {}
    clean_config = tmp_path / "clean-run" / "lead" / "train" / made[1] / "config.json"
    for name in ("clean", "attacked"):
        (tmp_path / name).mkdir()
        factory = DaemonFactory(tmp_path / name)
        try:
            started = time.monotonic()
            config = clean_config if name == "attacked" else None
            results[name] = run(factory, model_cache, made, tiny, heldout, tmp_path / f"{name}-run", config)
            print(f"{name} run: {time.monotonic() - started:.0f} s, held-out KL {results[name]['kl']:.4f}")
        finally:
            assert not factory.close()
    clean, attacked = results["clean"], results["attacked"]
    hostile = attacked["hostile"]

    # the rows: equal to the attack-free run's, every row of the mission once, none of the attacker's kept
    assert len(clean["export"]) == 2 * SHARDS
    assert attacked["export"] == clean["export"]
    assert not any("POISONED" in json.dumps(row) or "Bananas" in json.dumps(row) for row in attacked["export"])
    for held in attacked["held"]:
        assert not set().union(*held.values()) & set(hostile["attempts"]), held
    # each row attack refused or caught: the forged and the wrongly judged sets refuted (the producer distrusted),
    # the record naming rows nobody serves voided, the backdated record's invented rows refused
    lead_verification = attacked["detail"][0]["verification"]
    assert hostile["peer_id"] in lead_verification["producers_refuted"], lead_verification
    assert attacked["voided"] >= 1
    offers = attacked["offers"]
    assert [answer for i, answer in enumerate(offers) if i % 3 == 2] == [
        (False, "no done record names this row set")
    ] * 3, offers
    assert any("is refuted" in log for log in attacked["logs"])

    # averaging: the weight of 1e30 refused, the huge parts left out, the epoch claim ignored; every honest peer
    # trained the mission's 4 epochs (not 10^7) to finite parameters
    workers = "\n".join(attacked["worker_logs"])
    trainers = hostile["trainers"]
    heavy, reducer, huge = (trainers[name]["peer_id"] for name in ("weight", "reducer", "huge"))
    assert f"{heavy}: weight 1e+30; it is left out" in workers, (trainers["weight"], workers[-5000:])
    # it reduced them, a million times too large: each keeps its own
    assert f"refused the averaged parts from peer {reducer}" in workers, (trainers["reducer"], workers[-5000:])
    assert f"left out the part from peer {huge}" in workers
    assert f"ignored the epoch {CLAIMED_EPOCH} claimed by trainer" in workers
    # (the probe's second number is the sum of squared parameters: x 10^6 had a peer loaded the liar's state)
    clean_squares = max(train["params_probe"][1] for train in clean["train"])
    for train in attacked["train"]:
        assert train["epoch"] == EPOCHS and train["skipped_steps"] == 0, train
        assert (train.get("last_checkpoint") or {}).get("epoch") == EPOCHS, train  # the hostile ids take nothing
        probe = torch.tensor(train["params_probe"], dtype=torch.float64)
        assert torch.isfinite(probe).all() and float(probe[1]) < 2 * clean_squares, (train, clean_squares)

    # the checkpoint: the forged epoch 10^7 is listed, never verified; the pull takes the lead's vouched one
    forged = [c for c in attacked["checkpoints"] if c["epoch"] == CLAIMED_EPOCH]
    assert forged and not any(c["verified"] for c in forged), attacked["checkpoints"]
    for seen in (clean, attacked):
        assert seen["vouched"]["vouched_by"] == seen["lead"]
        assert f"vouched for by {seen['lead']}" in seen["pulled"], seen["pulled"]

    # the student: held-out KL within 10 % of the attack-free run's, and it learned (the untrained student is
    # within 10 % too: it must do better than that)
    base = garden_cli("eval", "--student", str(tiny), "--data", str(heldout), "--json", "--top-k", "4")
    assert base.returncode == 0, base.stderr[-3000:]
    base_kl = json.loads(base.stdout)["kl"]
    print(f"held-out KL: untrained {base_kl:.4f}, attack-free {clean['kl']:.4f}, attacked {attacked['kl']:.4f}")
    assert attacked["kl"] <= 1.1 * clean["kl"], (attacked["kl"], clean["kl"])
    assert attacked["kl"] < base_kl and clean["kl"] < base_kl, (base_kl, clean["kl"], attacked["kl"])
    for seen in (clean, attacked):
        assert seen["health"] == [{"status": "ok"}] * 3
