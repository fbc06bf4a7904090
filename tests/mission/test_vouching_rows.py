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

from garden.mission.book import Mission
from garden.mission.vouching import EVAL_ROWS, CheckpointVoucher, MissionVouching
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
        self.kls, self.measured = kls, []

    async def _evaluate(self, student: str, rows: Path, name: str) -> dict[str, float]:
        count = len(read_preference_jsonl(rows))
        self.measured.append((name, count))
        return {"kl": self.kls[name], "rows": float(count)}


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
        asyncio.run(voucher._judge(mission, state, record))  # type: ignore[arg-type]

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

