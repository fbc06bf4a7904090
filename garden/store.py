"""The peer's local SQLite database: a volunteer's work must survive crashes and upgrades.

WAL mode with ``synchronous=NORMAL`` keeps every committed transaction across a process crash (and
all but the last few across a power cut) while writers never block readers. The schema evolves only
through ``MIGRATIONS``: each is applied once, in order, in its own transaction, and recorded in
``schema_migrations``; a store written by a newer garden is refused rather than misread. Later
issues append migrations (missions, shards, rows, checkpoints); never edit an applied one.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from collections.abc import Iterable, Iterator, Mapping, Sequence

logger = logging.getLogger(__name__)

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
    Migration(
        3,
        "missions",
        """
        CREATE TABLE missions (
            mission_id TEXT PRIMARY KEY,
            record     BLOB NOT NULL,
            name       TEXT NOT NULL,
            lead       TEXT NOT NULL,
            prompts    BLOB,
            cancel     BLOB,
            added_at   REAL NOT NULL
        );
        CREATE TABLE row_sets (
            mission_id    TEXT NOT NULL,
            attempt       TEXT NOT NULL,
            shard         INTEGER NOT NULL,
            producer      TEXT NOT NULL,
            sha256        TEXT NOT NULL,
            rows          INTEGER NOT NULL,
            received_from TEXT,
            added_at      REAL NOT NULL,
            PRIMARY KEY (mission_id, attempt)
        );
        CREATE TABLE row_set_rows (
            mission_id TEXT NOT NULL,
            attempt    TEXT NOT NULL,
            position   INTEGER NOT NULL,
            row_id     TEXT NOT NULL,
            PRIMARY KEY (mission_id, attempt, position),
            FOREIGN KEY (mission_id, attempt) REFERENCES row_sets (mission_id, attempt) ON DELETE CASCADE
        );
        CREATE INDEX row_set_rows_row_id ON row_set_rows (row_id);
        """,
    ),
    Migration(
        4,
        "contribution",
        """
        CREATE TABLE contribution (
            mission_id TEXT NOT NULL,
            metric     TEXT NOT NULL,
            value      REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (mission_id, metric)
        );
        """,
    ),
    Migration(
        5,
        "row set wins",
        """
        ALTER TABLE row_sets ADD COLUMN won INTEGER NOT NULL DEFAULT 0;
        """,
    ),
    Migration(
        6,
        "answers and feedback",
        """
        CREATE TABLE answers (
            answer_id  TEXT PRIMARY KEY,
            model      TEXT NOT NULL,
            kind       TEXT NOT NULL,
            request    TEXT NOT NULL,
            prompt     TEXT NOT NULL,
            text       TEXT NOT NULL,
            redo_of    TEXT,
            created_at REAL NOT NULL
        );
        CREATE INDEX answers_created_at ON answers (created_at);
        CREATE TABLE feedback (
            answer_id  TEXT PRIMARY KEY REFERENCES answers (answer_id) ON DELETE CASCADE,
            verdict    TEXT NOT NULL,
            text       TEXT,
            created_at REAL NOT NULL
        );
        """,
    ),
)


@dataclass(frozen=True)
class StoredAnswer:
    """An answer this peer gave its owner (``/v1``, ``garden generate``), kept so that the owner can rate it.

    :param kind: ``chat`` (``request`` holds the messages) or ``text`` (a plain completion of ``prompt``)
    :param request: what was asked, as JSON (messages or prompt, and the sampling): a redo asks it again
    :param prompt: the last user message (``chat``) or the prompt: the prompt of a preference pair
    :param redo_of: the answer this one replaces (the owner asked for a redo)
    :param verdict: the owner's ``accept``, ``redo`` or ``edit``, None before any
    :param edit: the owner's text for ``edit``
    """

    answer_id: str
    model: str
    kind: str
    request: str
    prompt: str
    text: str
    redo_of: str | None
    created_at: float
    verdict: str | None = None
    edit: str | None = None
    rated_at: float | None = None


MAX_UNRATED_ANSWERS = 2000
"""Answers without a verdict kept for rating; older ones go (rated answers stay until ``clear_feedback``)."""


@dataclass(frozen=True)
class StoredMission:
    """A mission as this peer keeps it: the lead-signed record, and once known its prompts (canonical
    msgpack, hashed against the record) and the lead's signed cancel."""

    mission_id: str
    record: bytes
    name: str
    lead: str
    prompts: bytes | None
    cancel: bytes | None
    added_at: float


@dataclass(frozen=True)
class StoredRowSet:
    """A row set this peer holds; ``received_from`` is None when this peer sampled it."""

    mission_id: str
    attempt: str
    shard: int
    producer: str
    sha256: str
    rows: int
    received_from: str | None
    added_at: float
    won: bool = False
    """Whether the shard's records name this row set the shard's winner (as this peer last read them): only
    winning row sets are trained on and exported; the others are the first to be pruned."""


class StoreError(RuntimeError):
    pass


class Store:
    """Two connections shared by the daemon's threads: one that writes, behind a lock (SQLite serialises
    writes anyway), and one that only reads, behind a lock of its own. In WAL mode a reader never waits for a
    writer, so the reads the event loop makes (``/status``, the missions' loop, the peer's record) never
    stall behind a 64 MiB row set being written in a thread; each read sees what was committed before it.

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
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._reader.row_factory = sqlite3.Row
        self._reader.execute("PRAGMA query_only=ON")

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
        """One read, on the reading connection: it does not wait for a write in progress."""
        with self._read_lock:
            return self._reader.execute(sql, params).fetchall()

    def _reads(self, *queries: tuple[str, tuple[Any, ...]]) -> list[list[sqlite3.Row]]:
        """Several reads that see one state of the database (one read transaction)."""
        with self._read_lock:
            self._reader.execute("BEGIN")
            try:
                return [self._reader.execute(sql, params).fetchall() for sql, params in queries]
            finally:
                self._reader.execute("COMMIT")

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

    # --- missions and row sets (migration 3) ----------------------------------------------------------
    def add_mission(self, mission_id: str, record: bytes, name: str, lead: str) -> bool:
        """Keep a verified mission record; True if it was new (an existing one is left as it is)."""
        with self.transaction() as tx:
            cursor = tx.execute(
                "INSERT INTO missions (mission_id, record, name, lead, added_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(mission_id) DO NOTHING",
                (mission_id, record, name, lead, time.time()),
            )
            return cursor.rowcount == 1

    def set_mission_prompts(self, mission_id: str, prompts: bytes) -> None:
        """The mission's prompt list, already checked against its signed hash by the caller."""
        self._update_mission(mission_id, "prompts", prompts)

    def set_mission_cancel(self, mission_id: str, cancel: bytes) -> None:
        """The lead's signed cancel, already verified by the caller."""
        self._update_mission(mission_id, "cancel", cancel)

    def _update_mission(self, mission_id: str, column: str, value: bytes) -> None:
        with self.transaction() as tx:
            cursor = tx.execute(f"UPDATE missions SET {column} = ? WHERE mission_id = ?", (value, mission_id))
            if cursor.rowcount != 1:
                raise StoreError(f"no mission {mission_id} in {self.path}")

    def get_mission(self, mission_id: str) -> StoredMission | None:
        found = self.query("SELECT * FROM missions WHERE mission_id = ?", (mission_id,))
        return StoredMission(**dict(found[0])) if found else None

    def list_missions(self) -> list[StoredMission]:
        """Every mission kept here, oldest first."""
        return [StoredMission(**dict(r)) for r in self.query("SELECT * FROM missions ORDER BY added_at, mission_id")]

    def add_row_set(
        self,
        held: StoredRowSet,
        rows: Sequence[tuple[str, bytes, str]],
    ) -> bool:
        """Store a row set and its rows (``(row_id, encoded row, prompt)``, in shard order) in one transaction.

        Rows are content-addressed and shared: a row already stored (by another attempt that sampled the
        same answer, or by ``garden shake``) is referenced, not copied. True if the set was new; a set
        already held is left as it is (its rows are identical: the caller checked the hash)."""
        if len(rows) != held.rows:
            raise ValueError(f"row set says {held.rows} rows, {len(rows)} given")
        with self.transaction() as tx:
            cursor = tx.execute(
                "INSERT INTO row_sets (mission_id, attempt, shard, producer, sha256, rows, received_from, added_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(mission_id, attempt) DO NOTHING",
                (held.mission_id, held.attempt, held.shard, held.producer, held.sha256, held.rows,
                 held.received_from, held.added_at),
            )  # fmt: skip
            if cursor.rowcount != 1:
                return False
            for position, (row_id, body, prompt) in enumerate(rows):
                tx.execute(
                    "INSERT INTO rows (row_id, mission_id, body, prompt, created_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT(row_id) DO NOTHING",
                    (row_id, held.mission_id, body, prompt, held.added_at),
                )
                tx.execute(
                    "INSERT INTO row_set_rows (mission_id, attempt, position, row_id) VALUES (?, ?, ?, ?)",
                    (held.mission_id, held.attempt, position, row_id),
                )
        return True

    def row_sets(self, mission_id: str) -> list[StoredRowSet]:
        """Row sets held for a mission, by shard then attempt."""
        found = self.query("SELECT * FROM row_sets WHERE mission_id = ? ORDER BY shard, attempt", (mission_id,))
        return [StoredRowSet(**{**dict(r), "won": bool(r["won"])}) for r in found]

    def mark_winners(self, mission_id: str, attempts: Iterable[str]) -> int:
        """Mark the row sets of ``attempts`` as their shards' winners and every other row set of the mission as
        not (a winner voided or refuted since loses its mark). Returns how many marks changed."""
        won = sorted(set(attempts))
        marks = ",".join("?" * len(won))
        is_won = f"(attempt IN ({marks}))"
        with self.transaction() as tx:
            changed = tx.execute(
                f"UPDATE row_sets SET won = {is_won} WHERE mission_id = ? AND won != {is_won}", (*won, mission_id, *won)
            ).rowcount
        return int(changed)

    def count_row_sets(self, mission_id: str) -> int:
        """Number of row sets held for a mission (``/metrics`` asks at every scrape: no rows are read)."""
        return int(self.query("SELECT COUNT(*) FROM row_sets WHERE mission_id = ?", (mission_id,))[0][0])

    def row_set_bodies(self, mission_id: str, attempt: str) -> list[bytes] | None:
        """The encoded rows of a held row set in shard order, or None when it is not held."""
        held, found = self._reads(
            ("SELECT 1 FROM row_sets WHERE mission_id = ? AND attempt = ?", (mission_id, attempt)),
            (
                "SELECT r.body FROM row_set_rows m JOIN rows r ON r.row_id = m.row_id"
                " WHERE m.mission_id = ? AND m.attempt = ? ORDER BY m.position",
                (mission_id, attempt),
            ),
        )
        return [bytes(r["body"]) for r in found] if held else None

    def drop_row_set(self, mission_id: str, attempt: str) -> bool:
        """Forget a row set (a losing attempt); its rows go too, unless another row set still uses them or
        ``garden shake`` stored them (no mission). Idempotent: True if something was dropped."""
        with self.transaction() as tx:
            members = [
                r[0]
                for r in tx.execute(
                    "SELECT row_id FROM row_set_rows WHERE mission_id = ? AND attempt = ?", (mission_id, attempt)
                ).fetchall()
            ]
            cursor = tx.execute("DELETE FROM row_sets WHERE mission_id = ? AND attempt = ?", (mission_id, attempt))
            if cursor.rowcount != 1:
                return False
            for row_id in members:
                tx.execute(
                    "DELETE FROM rows WHERE row_id = ? AND mission_id IS NOT NULL"
                    " AND NOT EXISTS (SELECT 1 FROM row_set_rows WHERE row_id = ?)",
                    (row_id, row_id),
                )
        return True

    def drop_mission(self, mission_id: str) -> bool:
        """Forget a mission: its record, prompts, cancel, row sets and rows, in one transaction (what this
        peer contributed to it stays in ``contribution``). True if it was kept here."""
        with self.transaction() as tx:
            tx.execute("DELETE FROM row_set_rows WHERE mission_id = ?", (mission_id,))
            tx.execute("DELETE FROM row_sets WHERE mission_id = ?", (mission_id,))
            tx.execute("DELETE FROM rows WHERE mission_id = ?", (mission_id,))
            return tx.execute("DELETE FROM missions WHERE mission_id = ?", (mission_id,)).rowcount == 1

    # --- contribution (migration 4) -------------------------------------------------------------------
    def add_contribution(self, amounts: Mapping[tuple[str, str], float]) -> None:
        """Add to the running totals, keyed by (mission id or "" for the peer as a whole, metric)."""
        now = time.time()
        with self.transaction() as tx:
            for (mission_id, metric), amount in amounts.items():
                if amount:
                    tx.execute(
                        "INSERT INTO contribution (mission_id, metric, value, updated_at) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT(mission_id, metric) DO UPDATE SET value = value + excluded.value,"
                        " updated_at = excluded.updated_at",
                        (mission_id, metric, float(amount), now),
                    )

    def contribution(self) -> dict[str, dict[str, float]]:
        """Totals by mission id ("" for the peer as a whole), then metric."""
        out: dict[str, dict[str, float]] = {}
        for row in self.query("SELECT mission_id, metric, value FROM contribution ORDER BY mission_id, metric"):
            out.setdefault(row["mission_id"], {})[row["metric"]] = row["value"]
        return out

    # --- answers and the owner's feedback (migration 6) --------------------------------------------------
    def add_answer(self, answer: StoredAnswer) -> None:
        """Keep an answer for rating; the oldest unrated ones beyond :data:`MAX_UNRATED_ANSWERS` go."""
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO answers (answer_id, model, kind, request, prompt, text, redo_of, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (answer.answer_id, answer.model, answer.kind, answer.request, answer.prompt, answer.text,
                 answer.redo_of, answer.created_at),
            )  # fmt: skip
            tx.execute(
                "DELETE FROM answers WHERE answer_id IN (SELECT a.answer_id FROM answers a LEFT JOIN feedback f"
                " ON f.answer_id = a.answer_id WHERE f.answer_id IS NULL ORDER BY a.created_at DESC LIMIT -1"
                " OFFSET ?) AND answer_id NOT IN (SELECT redo_of FROM answers WHERE redo_of IS NOT NULL)",
                (MAX_UNRATED_ANSWERS,),
            )

    def answer(self, answer_id: str) -> StoredAnswer | None:
        found = self.query(f"{_ANSWERS} WHERE a.answer_id = ?", (answer_id,))
        return _answer(found[0]) if found else None

    def answers(self, limit: int = 50, rated: bool | None = None, model: str | None = None) -> list[StoredAnswer]:
        """The newest answers first; ``rated`` True: only those with a verdict, False: only those without."""
        where, params = [], []
        if rated is not None:
            where.append("f.verdict IS NOT NULL" if rated else "f.verdict IS NULL")
        if model is not None:
            where.append("a.model = ?")
            params.append(model)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        found = self.query(f"{_ANSWERS}{clause} ORDER BY a.created_at DESC LIMIT ?", (*params, limit))
        return [_answer(row) for row in found]

    def rate(self, answer_id: str, verdict: str, edit: str | None = None) -> None:
        """Record the owner's verdict on an answer (a later one replaces it)."""
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO feedback (answer_id, verdict, text, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(answer_id) DO UPDATE SET verdict = excluded.verdict, text = excluded.text,"
                " created_at = excluded.created_at",
                (answer_id, verdict, edit, time.time()),
            )

    def clear_feedback(self) -> int:
        """Forget every answer and verdict; returns how many answers went."""
        with self.transaction() as tx:
            tx.execute("DELETE FROM feedback")
            return int(tx.execute("DELETE FROM answers").rowcount)

    def vacuum(self) -> None:
        """Give the pages SQLite freed back to the disk (rewrites the file: call it off the event loop)."""
        with self._lock:
            self._db.execute("VACUUM")

    @staticmethod
    def _mission_filter(mission_id: str | None) -> tuple[str, tuple[Any, ...]]:
        return ("", ()) if mission_id is None else (" WHERE mission_id = ?", (mission_id,))

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()


class RowFeed:
    """New rows of one mission, read from a store another process writes (the daemon), read-only.

    The swarm trainer runs in a process of its own while the daemon keeps storing rows (its own shards,
    copies from other peers); each :meth:`new_rows` returns only what was not returned before. Only rows
    the swarm agreed on are read: those of row sets marked as their shard's winner (``won``), and rows this
    peer's owner stored outside any row set (``garden shake``, a test's fixture). A row set a peer offered
    that then lost its shard, or was never won, is never trained on. A stored row that no longer decodes (a
    damaged page, a row written by a newer garden) is skipped and counted in :attr:`skipped`, never raised:
    one bad row must not stop a training run.

    ``split`` picks the rows by :func:`garden.protocol.rows.held_out`: ``"train"`` (what trainers read: the
    held-out prompts' rows are counted in :attr:`held_back`, never returned), ``"heldout"`` (what the lead
    evaluates checkpoints on) or ``"all"``."""

    def __init__(self, path: Path, mission_id: str, split: Literal["train", "heldout", "all"] = "train"):
        self.path, self.mission_id, self.split = Path(path), mission_id, split
        self.skipped = 0
        self.held_back = 0  # held-out rows a "train" feed left out
        self._after = 0  # SQLite rowid of the last row read outside row sets
        self._sets_read: set[str] = set()  # winning row sets (attempts) read
        self._seen: set[str] = set()  # row ids returned (a row may be in two row sets)
        if not self.path.exists():
            raise StoreError(f"{self.path}: no garden database here")
        self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, check_same_thread=False)

    def new_rows(self, limit: int = 10_000) -> list[DorpoRow]:
        found = self._db.execute(
            "SELECT rowid, row_id, body FROM rows r WHERE mission_id = ? AND rowid > ?"
            " AND NOT EXISTS (SELECT 1 FROM row_set_rows m WHERE m.row_id = r.row_id) ORDER BY rowid LIMIT ?",
            (self.mission_id, self._after, limit),
        ).fetchall()
        if found:
            self._after = found[-1][0]
        rows = self._decode((row_id, body) for _, row_id, body in found)
        won = [
            a
            for (a,) in self._db.execute(
                "SELECT attempt FROM row_sets WHERE mission_id = ? AND won = 1 ORDER BY shard, attempt",
                (self.mission_id,),
            ).fetchall()
            if a not in self._sets_read
        ]
        for attempt in won:
            if len(rows) >= limit:
                break
            members = self._db.execute(
                "SELECT r.row_id, r.body FROM row_set_rows m JOIN rows r ON r.row_id = m.row_id"
                " WHERE m.mission_id = ? AND m.attempt = ? ORDER BY m.position",
                (self.mission_id, attempt),
            ).fetchall()
            self._sets_read.add(attempt)
            rows.extend(self._decode(members))
        return rows

    def _decode(self, found: Iterable[tuple[str, bytes]]) -> list[DorpoRow]:
        from garden.protocol.records import RecordError
        from garden.protocol.rows import DorpoRow, held_out

        rows = []
        for row_id, body in found:
            if row_id in self._seen:
                continue
            self._seen.add(row_id)
            try:
                row = DorpoRow.from_msgpack(body, max_bytes=len(body))
            except RecordError as e:
                self.skipped += 1
                logger.warning("skipped stored row %s of mission %s: %s", row_id, self.mission_id[:12], e)
                continue
            if row.row_id != row_id:
                self.skipped += 1
                logger.warning("skipped stored row %s: its content hashes to %s", row_id, row.row_id)
                continue
            if self.split != "all" and held_out(self.mission_id, row.prompt) != (self.split == "heldout"):
                self.held_back += self.split == "train"
                continue
            rows.append(row)
        return rows

    def close(self) -> None:
        self._db.close()


_ANSWERS = (
    "SELECT a.*, f.verdict AS verdict, f.text AS edit, f.created_at AS rated_at FROM answers a"
    " LEFT JOIN feedback f ON f.answer_id = a.answer_id"
)


def _answer(row: sqlite3.Row) -> StoredAnswer:
    return StoredAnswer(**{k: row[k] for k in row.keys()})


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
            try:
                self._db.execute("ROLLBACK" if exc_type else "COMMIT")
            except sqlite3.OperationalError as e:
                if exc_type is None and _is_environmental(e):
                    raise _store_error(e) from e
                if exc_type is None:
                    raise
                # the write failed and SQLite rolled the transaction back itself: its error is the one to tell
        finally:
            self._lock.release()
        if isinstance(exc, sqlite3.OperationalError) and _is_environmental(exc):
            raise _store_error(exc) from exc


_ENVIRONMENTAL = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN")
"""SQLite's errors that say "not now" (a full disk, an I/O error, a lock) rather than "never" (a bug in the SQL):
they become :class:`StoreError`, which the daemon's callers retry and report."""


def _is_environmental(error: sqlite3.OperationalError) -> bool:
    return str(getattr(error, "sqlite_errorname", "")).startswith(_ENVIRONMENTAL)


def _store_error(error: sqlite3.OperationalError) -> StoreError:
    return StoreError(f"could not write to the store ({getattr(error, 'sqlite_errorname', '?')}): {error}")


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
