"""The peer's local SQLite database: a volunteer's work must survive crashes and upgrades.

WAL mode with ``synchronous=NORMAL`` keeps every committed transaction across a process crash (and
all but the last few across a power cut) while writers never block readers. The schema evolves only
through ``MIGRATIONS``: each is applied once, in order, in its own transaction, and recorded in
``schema_migrations``; a store written by a newer garden is refused rather than misread. Later
issues append migrations (missions, shards, rows, checkpoints); never edit an applied one.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterator


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "meta",
        """
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """,
    ),
)


class StoreError(RuntimeError):
    pass


class Store:
    """One connection, shared by the daemon's threads behind a lock (SQLite serialises writes anyway).

    :param path: the database file; created with its parent directory if missing
    :param migrations: the schema history to apply (tests pass longer ones)
    """

    def __init__(self, path: Path, migrations: tuple[Migration, ...] = MIGRATIONS):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise StoreError(
                f"{self.path} is not a readable garden database ({e}); it was left untouched: "
                "move it away (or restore a backup) to start with an empty store"
            ) from None
        self._migrate(migrations)

    # --- schema ------------------------------------------------------------------------------------
    def _migrate(self, migrations: tuple[Migration, ...]) -> None:
        versions = [m.version for m in migrations]
        if versions != sorted(set(versions)):
            raise StoreError(f"migrations must have increasing, unique versions, got {versions}")
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            current = self.schema_version
            latest = versions[-1] if versions else 0
            if current > latest:
                raise StoreError(
                    f"{self.path} has schema version {current}, newer than this garden knows ({latest}); "
                    "upgrade garden rather than risk misreading the data"
                )
            for migration in migrations:
                if migration.version <= current:
                    continue
                with self.transaction() as db:
                    db.executescript_in_tx(migration.sql)
                    db.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                        (migration.version, migration.name, time.time()),
                    )

    @property
    def schema_version(self) -> int:
        row = self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    # --- access ------------------------------------------------------------------------------------
    def transaction(self) -> _Transaction:
        """``with store.transaction() as tx: tx.execute(...)``: all or nothing, under the store lock."""
        return _Transaction(self._db, self._lock)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def get_meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self._db, self._lock = db, lock

    def __enter__(self) -> _Transaction:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executescript_in_tx(self, script: str) -> None:
        """Run each statement of a script inside the open transaction (``executescript`` would commit)."""
        for statement in _split_sql(script):
            self._db.execute(statement)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()


def _split_sql(script: str) -> Iterator[str]:
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer
            buffer = ""
    if buffer.strip():
        raise StoreError(f"incomplete SQL statement in migration: {buffer.strip()[:80]}")
