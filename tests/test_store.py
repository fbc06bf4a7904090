"""The local SQLite store: WAL, migrations applied once and in order, newer schemas refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

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
    broken = MIGRATIONS + (Migration(2, "broken", "CREATE TABLE ok (x INTEGER);\nCREATE TABLE oops (;\n"),)
    with pytest.raises(sqlite3.OperationalError):
        Store(path, broken)
    store = Store(path)
    assert store.schema_version == 1
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
