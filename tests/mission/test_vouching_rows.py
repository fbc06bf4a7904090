"""What the lead measures a checkpoint on: the rows of the mission's held-out prompts (never trained on), or,
labelled, its other rows when it holds none; and a bar measured on other rows is never used against new ones.
Real signed missions and a real SQLite store; the evaluation itself (``garden eval`` in a child process) runs
in the training swarm tests, here it is stood in for so that the bars' bookkeeping is seen step by step."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from garden.errors import GardenError, PeerFailed
from garden.mission.book import Mission
from garden.mission.vouching import EVAL_ROWS, JUDGED_AT_ONCE, RETRY_AFTER, CheckpointVoucher, MissionVouching
from garden.protocol.mission import MissionDraft, sign_mission
from garden.protocol.mission_spec import MissionSpec
from garden.protocol.rows import HELDOUT_FROM, DorpoRow, PromptRow, held_out, read_preference_jsonl
from garden.store import Store, StoredRowSet
from tests.test_store import _encoded, _rows

SPEC = {
    "name": "held-out",
    "teachers": ["builtin:smollm2-135m"],
    "prompts": "prompts.jsonl",
    "shard_size": 2,
    "student": {"base": "builtin:smollm2-135m"},
}
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def signed(rows: list[DorpoRow], holding_out: bool = True) -> Mission:
    """A mission of ``rows``' prompts; with ``holding_out``, signed again until at least one of its prompts is
    held out (the split is salted by the mission id, which the signing time changes)."""
    prompts = tuple(PromptRow(prompt=r.prompt, reference="a") for r in rows)
    draft = MissionDraft(spec=MissionSpec.model_validate(SPEC), prompts=prompts)
    for attempt in range(100):
        mission = Mission(sign_mission(draft, KEY, now=1_800_000_000.0 + attempt))
        if not holding_out or any(held_out(mission.id, r.prompt) for r in rows):
            return mission
    raise AssertionError("no signing held a prompt out")


def keep(store: Store, mission: Mission, rows: list[DorpoRow], attempt: str) -> None:
    """``rows`` as a winning row set of ``mission`` held here."""
    held = StoredRowSet(
        mission_id=mission.id, attempt=attempt, shard=int(attempt, 16), producer="QmProducer", sha256="ab" * 32,
        rows=len(rows), received_from=None, added_at=1_700_000_000.0,
    )  # fmt: skip
    assert store.add_row_set(held, _encoded(rows))
    store.mark_winners(mission.id, [s.attempt for s in store.row_sets(mission.id)])


def test_checkpoints_are_measured_on_held_out_prompts_or_say_they_are_not(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.sqlite3")
    voucher = CheckpointVoucher(None, None, store.path, tmp_path / "vouching")  # type: ignore[arg-type]
    rows = _rows(96, "question ")
    mission = signed(rows)
    out = [r for r in rows if held_out(mission.id, r.prompt)]
    trained = [r for r in rows if not held_out(mission.id, r.prompt)]

    # the lead holds no held-out row yet: measured on the others, and the count of held-out rows says so
    keep(store, mission, trained, "0000000000000001")
    path, count, heldout = voucher._write_rows(mission)
    assert (count, heldout) == (min(len(trained), EVAL_ROWS), 0)
    # once it holds them, only they are measured (the trainers never read them: tests/test_store.py)
    keep(store, mission, out, "0000000000000002")
    path, count, heldout = voucher._write_rows(mission)
    assert count == heldout == len(out) and {r.prompt for r in read_preference_jsonl(path)} == {r.prompt for r in out}

    # a mission of fewer than HELDOUT_FROM prompts holds none out: every row is trained on, and measured on
    few = _rows(HELDOUT_FROM - 1, "small ")
    small = signed(few)
    keep(store, small, few, "0000000000000003")
    path, count, heldout = voucher._write_rows(small)
    assert (count, heldout) == (EVAL_ROWS if len(few) > EVAL_ROWS else len(few), 0)
    assert any(held_out(small.id, r.prompt) for r in few)  # though its hash would have held one out
    store.close()


class Judged(CheckpointVoucher):
    """The voucher with its evaluation stood in for: each model's KL is given by the test, and every measure
    (which model, on how many rows) is recorded."""

    def __init__(self, *args: Any, kls: dict[str, float]) -> None:
        super().__init__(*args)
        self.kls, self.measured, self.runs = kls, [], []

    async def _evaluate(self, students: dict[str, str], rows: Path) -> dict[str, dict[str, float] | GardenError]:
        count = len(read_preference_jsonl(rows))
        names = {name: name.rsplit("-", 1)[0] if name != "base" else name for name in students}  # epoch-N-<sha>
        self.runs.append(list(students))
        self.measured += [(short, count) for short in names.values()]
        kls = {name: self.kls.get(name, self.kls.get(short)) for name, short in names.items()}
        return {name: GardenError(f"{name} is broken") if kl is None else {"kl": kl, "rows": float(count)}
                for name, kl in kls.items()}  # fmt: skip


class Sharing:
    def __init__(self, root: Path) -> None:
        self.root, self.vouches = root, []

    async def pull(self, mission_id: str, epoch: int, unverified: bool, manifest: str, into: Path) -> tuple:
        into.mkdir(parents=True, exist_ok=True)
        return into, None

    async def vouch(self, record: Any, metrics: dict[str, float]) -> None:
        self.vouches.append((record.epoch, metrics))


@pytest.mark.parametrize("restart", [False, True])
def test_a_bar_measured_on_other_rows_is_not_held_against_new_ones(tmp_path: Path, restart: bool) -> None:
    store = Store(tmp_path / "g.sqlite3")
    rows = _rows(12, "q")
    mission = signed(rows, holding_out=False)  # a small mission: measured on every row it holds
    sharing = Sharing(tmp_path)
    kls = {"base": 1.0, "epoch-1": 0.5, "epoch-2": 0.9, "epoch-3": 1.2}
    voucher = Judged(None, sharing, store.path, tmp_path / "vouching", kls=kls)
    state = voucher.missions.setdefault(mission.id, MissionVouching())

    def judge(epoch: int) -> None:
        record = SimpleNamespace(epoch=epoch, manifest_sha256=f"{epoch:064x}", peer_id="QmWriter")
        asyncio.run(voucher._judge(mission, state, [record]))  # type: ignore[list-item]

    keep(store, mission, rows[:6], "0000000000000001")
    judge(1)  # the base and epoch 1 on 6 rows: 0.5 is under 1.0 * 1.1 + 0.02
    assert voucher.measured == [("base", 6), ("epoch-1", 6)] and [e for e, _ in sharing.vouches] == [1]
    assert sharing.vouches[0][1] == {"kl": 0.5, "rows": 6.0, "base_kl": 1.0, "heldout_rows": 0.0}

    # more rows: epoch 2's 0.9 is over the old bar (0.5 * 1.1 + 0.02) but was not measured on the same rows;
    # the base is measured again on them and is the bar
    keep(store, mission, rows[6:], "0000000000000002")
    judge(2)
    assert voucher.measured[-2:] == [("base", 12), ("epoch-2", 12)] and [e for e, _ in sharing.vouches] == [1, 2]
    if restart:  # a new daemon: the last vouched KL comes back from the DHT, the rows' file is read from the disk
        voucher = Judged(None, sharing, store.path, tmp_path / "vouching", kls=kls)
        state = voucher.missions.setdefault(mission.id, MissionVouching())
        state.last_kl, state.last_epoch, state.restored = 0.9, 2, True
    # the same rows: epoch 3 is held against epoch 2's KL, and the base is not measured again
    judge(3)
    assert voucher.measured[-1] == ("epoch-3", 12) and ("base", 12) not in voucher.measured[-1:]
    assert [e for e, _ in sharing.vouches] == [1, 2]
    assert "KL 1.2000" in state.refused[3] and "over 1.0100" in state.refused[3]
    store.close()



class Catalog(Sharing):
    """Sharing whose catalog lists ``records`` and whose pull of a manifest in ``unpullable`` fails, as a pull
    whose files do not match their manifest does."""

    peer_id = "QmLead"

    def __init__(self, root: Path, records: list[Any], unpullable: set[str]) -> None:
        super().__init__(root)
        self.records, self.unpullable, self.pulled, self.unstored = records, unpullable, [], set()

    async def vouch(self, record: Any, metrics: dict[str, float]) -> None:
        if record.manifest_sha256 in self.unstored:
            raise PeerFailed(f"no DHT peer stored the vouch for epoch {record.epoch}")
        await super().vouch(record, metrics)

    async def catalog(self, mission_id: str) -> Any:
        return SimpleNamespace(vouches=[], records=self.records)

    async def pull(self, mission_id: str, epoch: int, unverified: bool, manifest: str, into: Path) -> tuple:
        self.pulled.append(manifest)
        if manifest in self.unpullable:
            raise GardenError(f"{manifest[:8]}: a file's sha256 differs from its manifest")
        return await super().pull(mission_id, epoch, unverified, manifest, into)


def test_the_files_of_an_epoch_are_judged_in_one_evaluation_and_a_bad_one_stops_no_other(tmp_path: Path) -> None:
    """Four holders announce epoch 2 (two the same files): the base and the three distinct manifests pulled are
    measured by one evaluation; one that cannot be evaluated and one that cannot be pulled are tried again
    later, and the good ones are vouched for at once."""
    store = Store(tmp_path / "g.sqlite3")
    rows = _rows(6, "q")
    mission = signed(rows, holding_out=False)
    keep(store, mission, rows, "0000000000000001")

    def record(epoch: int, manifest: str, holder: str) -> Any:
        return SimpleNamespace(epoch=epoch, manifest_sha256=manifest * 64, peer_id=holder)

    records = [record(1, "0", "QmOld"), record(2, "a", "QmA"), record(2, "a", "QmA2"), record(2, "b", "QmB"),
               record(2, "c", "QmBroken"), record(2, "d", "QmUnpullable")]  # fmt: skip
    sharing = Catalog(tmp_path, records, unpullable={"d" * 64})
    name = {m: f"epoch-2-{m * 64}" for m in "abcd"}
    voucher = Judged(None, sharing, store.path, tmp_path / "vouching",
                     kls={"base": 1.0, name["a"]: 0.5, name["b"]: 0.52, name["c"]: None})  # fmt: skip
    asyncio.run(voucher.tend(mission))  # type: ignore[arg-type]
    assert voucher.runs == [["base", name["a"], name["b"], name["c"]]]  # one process, the newest epoch only
    assert sharing.pulled == ["a" * 64, "b" * 64, "c" * 64, "d" * 64]  # the same files once
    assert [(e, m["kl"]) for e, m in sharing.vouches] == [(2, 0.5), (2, 0.52)]  # b held against a: 0.52 <= 0.57
    state = voucher.missions[mission.id]
    assert state.judged == {(2, "a" * 64), (2, "b" * 64)} and set(state.failed) == {(2, "c" * 64), (2, "d" * 64)}
    assert not list((tmp_path / "vouching" / mission.id).glob("epoch-*"))  # the pulled files are gone

    asyncio.run(voucher.tend(mission))  # type: ignore[arg-type]
    assert len(voucher.runs) == 1  # the failed ones wait RETRY_AFTER
    for which in state.failed:
        state.failed[which] -= RETRY_AFTER
    voucher.kls[name["c"]] = 0.55
    sharing.unstored.add("c" * 64)  # and its vouch is stored nowhere: judged again later
    asyncio.run(voucher.tend(mission))  # type: ignore[arg-type]
    assert voucher.runs[1:] == [[name["c"]]]  # the base's KL stands (the same rows); d failed to pull again
    assert len(sharing.vouches) == 2 and (2, "c" * 64) in state.failed and (2, "c" * 64) not in state.judged
    for which in state.failed:
        state.failed[which] -= RETRY_AFTER
    sharing.unstored.clear()
    asyncio.run(voucher.tend(mission))  # type: ignore[arg-type]
    assert voucher.runs[2:] == [[name["c"]]] and [(e, m["kl"]) for e, m in sharing.vouches][2:] == [(2, 0.55)]
    store.close()


def test_an_older_epoch_whose_files_are_gone_is_not_pulled_again_once_a_newer_one_is_vouched(tmp_path: Path) -> None:
    """Holders drop an epoch's files when they move on, and its records stay in the DHT until their TTL: once a
    newer epoch is vouched, an older one that cannot be pulled is given up, while the newest is retried."""
    store = Store(tmp_path / "g.sqlite3")
    rows = _rows(6, "q")
    mission = signed(rows, holding_out=False)
    keep(store, mission, rows, "0000000000000001")
    records = [SimpleNamespace(epoch=e, manifest_sha256=m * 64, peer_id=f"Qm{m}")
               for e, m in ((4, "n"), (3, "x"), (2, "g"), (2, "o"))]  # fmt: skip
    sharing = Catalog(tmp_path, records, unpullable={"x" * 64, "g" * 64})
    voucher = Judged(None, sharing, store.path, tmp_path / "vouching",
                     kls={"base": 1.0, "epoch-4": 0.5, "epoch-2": 0.52})  # fmt: skip
    state = voucher.missions.setdefault(mission.id, MissionVouching())
    for _ in range(3):  # epoch 4, then 3 (gone), then 2 (one gone, one judged)
        asyncio.run(voucher.tend(mission))  # type: ignore[arg-type]
    assert [e for e, _ in sharing.vouches] == [4, 2] and state.last_epoch == 4
    assert {(3, "x" * 64), (2, "g" * 64)} <= state.judged and not state.failed
    pulled = list(sharing.pulled)
    assert pulled == ["n" * 64, "x" * 64, "g" * 64, "o" * 64]
    asyncio.run(voucher.tend(mission))  # type: ignore[arg-type]
    assert sharing.pulled == pulled  # never pulled again

    sharing.records.append(SimpleNamespace(epoch=5, manifest_sha256="z" * 64, peer_id="QmZ"))
    sharing.unpullable.add("z" * 64)  # the newest epoch: retried after RETRY_AFTER
    asyncio.run(voucher.tend(mission))  # type: ignore[arg-type]
    assert (5, "z" * 64) in state.failed and (5, "z" * 64) not in state.judged
    store.close()


def test_files_announced_for_one_epoch_are_judged_a_bounded_number_at_a_time(tmp_path: Path) -> None:
    """Any key may announce files for an epoch: one round of judging takes :data:`JUDGED_AT_ONCE` of them, the
    next round the rest."""
    store = Store(tmp_path / "g.sqlite3")
    rows = _rows(4, "q")
    mission = signed(rows, holding_out=False)
    keep(store, mission, rows, "0000000000000001")
    manifests = [f"{i:064x}" for i in range(JUDGED_AT_ONCE + 2)]
    records = [SimpleNamespace(epoch=1, manifest_sha256=m, peer_id=f"Qm{i}") for i, m in enumerate(manifests)]
    sharing = Catalog(tmp_path, records, unpullable=set())
    voucher = Judged(None, sharing, store.path, tmp_path / "vouching", kls={"base": 1.0, "epoch-1": 0.5})
    asyncio.run(voucher.tend(mission))  # type: ignore[arg-type]
    asyncio.run(voucher.tend(mission))  # type: ignore[arg-type]
    assert [len(run) for run in voucher.runs] == [JUDGED_AT_ONCE + 1, 2]  # the base in the first
    assert sharing.pulled == manifests and len(sharing.vouches) == JUDGED_AT_ONCE + 2
    store.close()


class Crashing(CheckpointVoucher):
    """A voucher whose evaluation process dies whenever it is given more than one model (as a checkpoint whose
    files crash ``garden eval`` would make it), and measures each model alone otherwise."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.runs: list[list[str]] = []

    async def _run_eval(self, students: dict[str, str], rows: Path) -> dict[str, dict[str, float] | GardenError]:
        self.runs.append(list(students))
        if len(students) > 1:
            raise GardenError("garden eval of them all failed: Killed")
        ((name, student),) = students.items()
        if student == "poisoned":
            raise GardenError(f"garden eval of {name} failed: Killed")
        return {name: {"kl": 1.0}}


def test_when_one_evaluation_of_several_fails_as_a_whole_each_is_evaluated_alone(tmp_path: Path) -> None:
    voucher = Crashing(None, None, tmp_path / "g.sqlite3", tmp_path / "vouching")
    results = asyncio.run(voucher._evaluate({"base": "base", "x": "poisoned", "y": "good"}, tmp_path / "rows.jsonl"))
    assert voucher.runs == [["base", "x", "y"], ["base"], ["x"], ["y"]]
    assert results["base"] == results["y"] == {"kl": 1.0} and isinstance(results["x"], GardenError)


@pytest.mark.slow
def test_one_garden_eval_measures_several_models_and_names_the_one_it_could_not(
    tmp_path: Path, model_cache: Path
) -> None:
    """The real child process: the base student and a broken checkpoint directory, in one ``garden eval``."""
    from garden.data import demo_prompts
    from garden.distill.evaluate import rows_from_prompts
    from garden.models.loading import load_model
    from garden.protocol.rows import write_preference_jsonl

    rows = tmp_path / "rows.jsonl"
    write_preference_jsonl(rows_from_prompts(load_model("builtin:smollm2-135m"), demo_prompts("heldout")[:2], 4), rows)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": -1}')
    voucher = CheckpointVoucher(None, None, tmp_path / "g.sqlite3", tmp_path / "vouching")  # type: ignore[arg-type]
    base = "prune:builtin:smollm2-135m:layers=2"
    results = asyncio.run(voucher._run_eval({"base": base, "epoch-1-x": str(broken)}, rows))
    base_figures, failed = results["base"], results["epoch-1-x"]
    assert isinstance(base_figures, dict) and set(base_figures) == {"kl", "nll", "top1", "rows"}
    assert base_figures["rows"] == 2.0 and base_figures["kl"] > 0.1  # 2 of 30 layers: far from the teacher
    assert isinstance(failed, GardenError) and "garden eval of epoch-1-x failed" in str(failed)
