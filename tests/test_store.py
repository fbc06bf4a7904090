"""The local SQLite store: WAL, migrations applied once and in order, newer schemas refused."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from garden.protocol.rows import DorpoRow
from garden.store import MIGRATIONS, Migration, Store, StoreError, StoredRowSet


def test_new_store_is_wal_and_migrated(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.sqlite3")
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    assert store.schema_version == MIGRATIONS[-1].version
    store.set_meta("peer_id", "QmA")
    store.set_meta("peer_id", "QmB")
    assert store.get_meta("peer_id") == "QmB"
    assert store.get_meta("missing") is None
    store.close()


def test_migrations_apply_once_and_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    Store(path).close()
    extra = MIGRATIONS + (Migration(MIGRATIONS[-1].version + 1, "things", "CREATE TABLE things (x INTEGER);"),)
    store = Store(path, extra)
    with store.transaction() as tx:
        tx.execute("INSERT INTO things VALUES (1)")
    store.close()
    store = Store(path, extra)  # re-applying would fail: the table exists
    assert [row[0] for row in store.query("SELECT x FROM things")] == [1]
    assert [row["name"] for row in store.query("SELECT name FROM schema_migrations ORDER BY version")] == [
        m.name for m in extra
    ]
    store.close()


def test_store_from_a_newer_garden_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    extra = MIGRATIONS + (Migration(99, "future", "CREATE TABLE future (x INTEGER);"),)
    Store(path, extra).close()
    with pytest.raises(StoreError, match="newer than this garden"):
        Store(path)


def test_failed_migration_leaves_no_trace(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    broken = MIGRATIONS + (
        Migration(MIGRATIONS[-1].version + 1, "broken", "CREATE TABLE ok (x INTEGER);\nCREATE TABLE oops (;\n"),
    )
    with pytest.raises(sqlite3.OperationalError):
        Store(path, broken)
    store = Store(path)
    assert store.schema_version == MIGRATIONS[-1].version
    assert not store.query("SELECT name FROM sqlite_master WHERE name = 'ok'")
    store.close()


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.sqlite3")
    store.set_meta("k", "before")
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.execute("UPDATE meta SET value = 'after' WHERE key = 'k'")
            raise RuntimeError("crash mid-transaction")
    assert store.get_meta("k") == "before"
    store.close()


def test_migration_versions_must_increase(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="increasing"):
        Store(tmp_path / "g.sqlite3", (Migration(2, "a", ""), Migration(1, "b", "")))


# --- DORPO rows (migration 2) ----------------------------------------------------------------------


def _rows(n: int, prompt: str = "p", k: int = 3) -> list[DorpoRow]:
    rows = []
    for i in range(n):
        logps = np.log(np.full((2, k), 0.9 / k))
        rows.append(
            DorpoRow.from_arrays(
                prompt=f"{prompt}{i}",
                chosen=f"answer {i}",
                rejected=None if i % 2 else "bad",
                chosen_ids=[i, i + 1],
                topk_ids=[[j + i for j in range(k)]] * 2,
                topk_logprobs=logps,
                teacher="t",
                judge="reference",
                scores={"chosen": 1.0},
                tokenizer="tok",
                vocab_size=49152,
            )  # fmt: skip
        )
    return rows


def test_rows_are_stored_once_per_content(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    store = Store(path)
    rows_a, rows_b = _rows(5, "a"), _rows(3, "b")
    assert store.add_rows(rows_a, mission_id="m1") == 5
    assert store.add_rows(rows_a, mission_id="m1") == 0  # the same rows again: nothing new
    assert store.add_rows(rows_a[:2] + rows_b + rows_b[:1], mission_id="m2") == 3  # dupes within a batch too
    assert store.add_rows([], mission_id="m2") == 0
    assert store.count_rows() == 8
    assert store.count_rows("m1") == 5 and store.count_rows("m2") == 3 and store.count_rows("nope") == 0
    assert store.add_rows(_rows(1, "c")) == 1 and store.count_rows() == 9  # no mission

    got = store.get_rows("m1")
    assert sorted(r.row_id for r in got) == sorted(r.row_id for r in rows_a)
    assert {r.row_id: r for r in got} == {r.row_id: r for r in rows_a}  # equal rows, arrays included
    assert [r.row_id for r in got] == sorted(r.row_id for r in rows_a)  # one batch: one created_at, then row_id
    assert [r.row_id for r in store.get_rows()][:5] == [r.row_id for r in got]  # older batches first
    assert len(store.get_rows(limit=4)) == 4 and store.get_rows("m2", limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        store.get_rows(limit=-1)
    store.close()

    store = Store(path)  # committed: survives a reopen
    assert store.count_rows() == 9 and store.get_rows("m2")[0].topk_logprobs_array().shape == (2, 3)
    store.close()


def test_add_rows_is_one_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.sqlite3")

    def dies_midway() -> Iterator[DorpoRow]:
        yield from _rows(2)
        raise RuntimeError("shaker died")

    with pytest.raises(RuntimeError):
        store.add_rows(dies_midway(), mission_id="m")
    assert store.count_rows() == 0
    store.close()


def test_unreadable_stored_row_is_a_store_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.sqlite3")
    store.add_rows(_rows(1), mission_id="m")
    with store.transaction() as tx:
        tx.execute("UPDATE rows SET body = ?", (b"\xc1garbage",))
    with pytest.raises(StoreError, match="unreadable"):
        store.get_rows("m")
    store.close()


def test_rows_migration_upgrades_a_v1_database(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    old = Store(path, MIGRATIONS[:1])
    old.set_meta("peer_id", "QmA")
    assert old.schema_version == 1
    assert not old.query("SELECT name FROM sqlite_master WHERE name = 'rows'")
    old.close()

    store = Store(path)
    assert store.schema_version == len(MIGRATIONS) and store.get_meta("peer_id") == "QmA"
    assert store.query("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'rows' AND sql IS NOT NULL")
    assert store.add_rows(_rows(2), mission_id="m") == 2 and store.count_rows("m") == 2
    store.close()


def test_store_module_stays_light() -> None:
    code = "import sys, garden.store; print('torch' in sys.modules, 'garden.protocol.rows' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]


# --- missions and row sets (migration 3) --------------------------------------------------------------


def _held(attempt: str, rows: list[DorpoRow], mission_id: str = "m1", shard: int = 0) -> StoredRowSet:
    return StoredRowSet(
        mission_id=mission_id, attempt=attempt, shard=shard, producer="QmProducer", sha256="ab" * 32,
        rows=len(rows), received_from=None, added_at=1_700_000_000.0,
    )  # fmt: skip


def _encoded(rows: list[DorpoRow]) -> list[tuple[str, bytes, str]]:
    return [(r.row_id, r.to_msgpack(), r.prompt) for r in rows]


def test_row_sets_are_stored_read_back_and_dropped(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.sqlite3")
    rows = _rows(4, "a")
    first = _held("0000000000000001", rows[:3], shard=1)
    assert store.add_row_set(first, _encoded(rows[:3]))
    assert not store.add_row_set(first, _encoded(rows[:3]))  # the same attempt again: left as it is
    assert store.count_rows("m1") == 3
    assert store.row_sets("m1") == [first] and store.row_sets("m2") == []
    members = store.query("SELECT position, row_id FROM row_set_rows WHERE attempt = ? ORDER BY position",
                          (first.attempt,))  # fmt: skip
    assert [(m["position"], m["row_id"]) for m in members] == [(i, r.row_id) for i, r in enumerate(rows[:3])]

    # bodies come back in position order, not in row_id or insertion order of the rows table
    reordered = [rows[3], rows[0], rows[2]]
    second = _held("0000000000000002", reordered, shard=1)
    assert store.add_row_set(second, _encoded(reordered))
    assert store.row_set_bodies("m1", second.attempt) == [r.to_msgpack() for r in reordered]
    assert store.row_set_bodies("m1", first.attempt) == [r.to_msgpack() for r in rows[:3]]
    assert store.row_set_bodies("m1", "ffffffffffffffff") is None
    assert store.row_set_bodies("m2", first.attempt) is None
    assert store.count_rows("m1") == 4  # shared rows are stored once
    empty = _held("0000000000000003", [], shard=2)
    assert store.add_row_set(empty, []) and store.row_set_bodies("m1", empty.attempt) == []
    assert [s.attempt for s in store.row_sets("m1")] == [first.attempt, second.attempt, empty.attempt]
    assert store.count_row_sets("m1") == 3 and store.count_row_sets("m2") == 0

    # a row garden shake stored (no mission) is kept when a row set that references it is dropped
    shaken = _rows(1, "s")
    assert store.add_rows(shaken) == 1
    third = _held("0000000000000004", [rows[1], shaken[0]], shard=3)
    assert store.add_row_set(third, _encoded([rows[1], shaken[0]]))
    assert store.count_rows() == 5 and store.count_rows("m1") == 4  # the shaken row keeps mission_id None

    # dropping the first set keeps rows 0 and 2 (used by the second set) and row 1 (used by the third)
    assert store.drop_row_set("m1", first.attempt)
    assert not store.drop_row_set("m1", first.attempt)  # idempotent
    assert store.row_set_bodies("m1", first.attempt) is None
    assert store.count_rows("m1") == 4
    assert not store.query("SELECT 1 FROM row_set_rows WHERE attempt = ?", (first.attempt,))  # members go too
    # dropping the third drops row 1 (no set uses it now), never the shaken row
    assert store.drop_row_set("m1", third.attempt)
    assert {r.row_id for r in store.get_rows("m1")} == {rows[0].row_id, rows[2].row_id, rows[3].row_id}
    assert [r.row_id for r in store.get_rows(limit=None) if r.prompt.startswith("s")] == [shaken[0].row_id]
    assert store.drop_row_set("m1", second.attempt) and store.count_rows("m1") == 0
    assert store.count_rows() == 1 and store.drop_row_set("m1", empty.attempt)
    assert store.row_sets("m1") == [] and store.count_row_sets("m1") == 0
    store.close()


def test_row_shared_across_missions_survives_a_drop(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.sqlite3")
    rows = _rows(2)
    assert store.add_row_set(_held("000000000000000a", rows, mission_id="m1"), _encoded(rows))
    assert store.add_row_set(_held("000000000000000b", rows[:1], mission_id="m2"), _encoded(rows[:1]))
    assert store.drop_row_set("m1", "000000000000000a")
    assert store.row_set_bodies("m2", "000000000000000b") == [rows[0].to_msgpack()]  # still readable
    assert {r.row_id for r in store.get_rows()} == {rows[0].row_id}
    store.close()


def test_row_set_with_a_wrong_row_count_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.sqlite3")
    rows = _rows(3)
    with pytest.raises(ValueError, match="3 rows, 2 given"):
        store.add_row_set(_held("0000000000000001", rows), _encoded(rows[:2]))
    assert store.row_sets("m1") == [] and store.count_rows() == 0
    store.close()


def test_missions_are_kept_once(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    store = Store(path)
    assert store.get_mission("m1") is None and store.list_missions() == []
    assert store.add_mission("m1", b"record-1", "capitals", "QmLead")
    assert not store.add_mission("m1", b"another record", "other", "QmOther")  # the first one stays
    kept = store.get_mission("m1")
    assert kept is not None
    assert (kept.record, kept.name, kept.lead) == (b"record-1", "capitals", "QmLead")
    assert kept.prompts is None and kept.cancel is None
    store.set_mission_prompts("m1", b"prompts")
    store.set_mission_cancel("m1", b"cancel")
    with pytest.raises(StoreError, match="no mission"):
        store.set_mission_prompts("unknown", b"prompts")
    with pytest.raises(StoreError, match="no mission"):
        store.set_mission_cancel("unknown", b"cancel")
    assert store.add_mission("m2", b"record-2", "second", "QmLead")
    store.close()

    store = Store(path)  # committed: survives a reopen
    kept = store.get_mission("m1")
    assert kept is not None and kept.prompts == b"prompts" and kept.cancel == b"cancel"
    assert [m.mission_id for m in store.list_missions()] == ["m1", "m2"]
    assert store.get_mission("unknown") is None
    store.close()


def test_missions_migration_upgrades_a_v2_database(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    old = Store(path, MIGRATIONS[:2])
    rows = _rows(3)
    assert old.add_rows(rows, mission_id="m") == 3 and old.add_rows(_rows(1, "s")) == 1
    assert old.schema_version == 2
    assert not old.query("SELECT name FROM sqlite_master WHERE name IN ('missions', 'row_sets', 'row_set_rows')")
    old.close()

    store = Store(path)
    assert store.schema_version == MIGRATIONS[-1].version
    assert store.count_rows() == 4 and {r.row_id for r in store.get_rows("m")} == {r.row_id for r in rows}
    assert store.add_mission("m", b"record", "name", "QmLead")
    assert store.add_row_set(_held("0000000000000001", rows, mission_id="m"), _encoded(rows))
    assert store.count_rows() == 4  # the old rows are referenced, not copied
    assert store.row_set_bodies("m", "0000000000000001") == [r.to_msgpack() for r in rows]
    store.close()


def test_a_v4_database_gains_the_won_mark_and_its_row_sets_start_unmarked(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    old = Store(path, MIGRATIONS[:4])
    rows = _rows(2)
    old.add_row_set(_held("0000000000000001", rows, mission_id="m"), _encoded(rows))
    old.close()
    store = Store(path)
    assert store.schema_version == MIGRATIONS[-1].version
    assert [s.won for s in store.row_sets("m")] == [False]
    store.close()


def test_the_row_feed_reads_winning_row_sets_and_the_owners_rows_only(tmp_path: Path) -> None:
    """A row set stored here trains only once the shard's records name it the winner; one that loses its win
    (voided, refuted) is not read again; rows stored outside any row set (``garden shake``) are read at once."""
    from garden.store import RowFeed

    store = Store(tmp_path / "g.sqlite3")
    won, lost, late = _rows(2, "w"), _rows(2, "l"), _rows(2, "z")
    store.add_row_set(_held("0000000000000001", won, mission_id="m", shard=0), _encoded(won))
    store.add_row_set(_held("0000000000000002", lost, mission_id="m", shard=0), _encoded(lost))
    own = _rows(1, "own")
    store.add_rows(own, mission_id="m")
    feed = RowFeed(store.path, "m", split="all")
    assert [r.row_id for r in feed.new_rows()] == [own[0].row_id]  # nothing won yet
    assert store.mark_winners("m", ["0000000000000001"]) == 1
    assert [s.won for s in store.row_sets("m")] == [True, False]
    assert [r.row_id for r in feed.new_rows()] == [r.row_id for r in won] and feed.new_rows() == []
    # a later set that wins while the first loses its mark: only the new rows come, the lost set never does
    store.add_row_set(_held("0000000000000003", late, mission_id="m", shard=1), _encoded(late))
    assert store.mark_winners("m", ["0000000000000003"]) == 2
    assert [r.row_id for r in feed.new_rows()] == [r.row_id for r in late] and feed.new_rows() == []
    assert store.mark_winners("m", ["0000000000000003"]) == 0  # idempotent
    assert store.mark_winners("m", []) == 1 and not any(s.won for s in store.row_sets("m"))
    # a row shared by a winning set and the owner's rows comes once
    again = RowFeed(store.path, "m", split="all")
    store.mark_winners("m", ["0000000000000001"])
    store.add_rows(won[:1], mission_id="m")  # already stored: a no-op, the row stays in its set
    assert sorted(r.row_id for r in again.new_rows()) == sorted([own[0].row_id, *(r.row_id for r in won)])
    feed.close()
    again.close()
    store.close()


def test_the_row_feed_keeps_the_held_out_prompts_rows_from_training(tmp_path: Path) -> None:
    """One prompt in 16, by a hash salted with the mission, is held out: a "train" feed (what trainers read)
    never returns its rows and counts them, a "heldout" feed (what the lead evaluates on) returns only them,
    and every row is in exactly one of the two, from row sets and the owner's rows alike."""
    from garden.protocol.rows import HELDOUT_EVERY, held_out
    from garden.store import RowFeed

    prompts = [f"question {i}" for i in range(1600)]
    out = [p for p in prompts if held_out("m", p)]
    assert abs(len(out) / len(prompts) - 1 / HELDOUT_EVERY) < 0.02  # about one in 16
    assert out == [p for p in prompts if held_out("m", p)]  # the same split on every peer, every time
    assert out != [p for p in prompts if held_out("m2", p)]  # another mission holds out other prompts

    store = Store(tmp_path / "g.sqlite3")
    rows = _rows(64, "q")
    store.add_row_set(_held("0000000000000001", rows[:40], mission_id="m"), _encoded(rows[:40]))
    store.mark_winners("m", ["0000000000000001"])
    store.add_rows(rows[40:], mission_id="m")
    expected = {r.row_id for r in rows if held_out("m", r.prompt)}
    assert 0 < len(expected) < len(rows)
    train, heldout, every = (RowFeed(store.path, "m", split=s) for s in ("train", "heldout", "all"))
    trained = {r.row_id for r in train.new_rows()}
    assert not trained & expected and train.held_back == len(expected)
    assert {r.row_id for r in heldout.new_rows()} == expected and heldout.held_back == 0
    assert trained | expected == {r.row_id for r in every.new_rows()} == {r.row_id for r in rows}
    default = RowFeed(store.path, "m")
    assert default.split == "train"  # the default is what a trainer must read
    for feed in (train, heldout, every, default):
        feed.close()
    store.close()

