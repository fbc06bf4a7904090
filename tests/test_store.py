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
from garden.store import MIGRATIONS, Migration, Store, StoreError


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
