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
from typing import TYPE_CHECKING, Any
from collections.abc import Iterable, Iterator

if TYPE_CHECKING:  # the row codec (numpy, msgpack, pydantic) is imported when rows are first touched
    from garden.protocol.rows import DorpoRow


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
    Migration(
        2,
        "rows",
        """
        CREATE TABLE rows (
            row_id     TEXT PRIMARY KEY,
            mission_id TEXT,
            body       BLOB NOT NULL,
            prompt     TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE INDEX rows_mission_id ON rows (mission_id);
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

    # --- DORPO rows (migration 2) ---------------------------------------------------------------------
    def add_rows(self, rows: Iterable[DorpoRow], mission_id: str | None = None) -> int:
        """Store rows under ``mission_id`` in one transaction; returns how many were new.

        Rows are keyed by ``row_id`` (their content hash): a row already stored (by this call or an earlier
        one, under any mission) is skipped, so a row belongs to the first mission that stored it. All rows
        of one call share one ``created_at``."""
        encoded = [(row.row_id, row.to_msgpack(), row.prompt) for row in rows]
        now = time.time()
        added = 0
        with self.transaction() as tx:
            for row_id, body, prompt in encoded:
                cursor = tx.execute(
                    "INSERT INTO rows (row_id, mission_id, body, prompt, created_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT(row_id) DO NOTHING",
                    (row_id, mission_id, body, prompt, now),
                )
                added += cursor.rowcount
        return added

    def get_rows(self, mission_id: str | None = None, limit: int | None = None) -> list[DorpoRow]:
        """Rows of ``mission_id`` (all rows when None), oldest first (``created_at``, then ``row_id``)."""
        from garden.protocol.records import RecordError
        from garden.protocol.rows import DorpoRow

        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")
        where, params = self._mission_filter(mission_id)
        found = self.query(
            f"SELECT row_id, body FROM rows{where} ORDER BY created_at, row_id LIMIT ?",
            (*params, -1 if limit is None else limit),
        )
        rows = []
        for record in found:
            try:
                rows.append(DorpoRow.from_msgpack(record["body"], max_bytes=len(record["body"])))
            except RecordError as e:
                raise StoreError(f"{self.path}: stored row {record['row_id']} is unreadable ({e})") from None
        return rows

    def count_rows(self, mission_id: str | None = None) -> int:
        """Number of stored rows of ``mission_id`` (all rows when None)."""
        where, params = self._mission_filter(mission_id)
        return int(self.query(f"SELECT COUNT(*) FROM rows{where}", params)[0][0])

    @staticmethod
    def _mission_filter(mission_id: str | None) -> tuple[str, tuple[Any, ...]]:
        return ("", ()) if mission_id is None else (" WHERE mission_id = ?", (mission_id,))

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
