"""Named, append-only schema migrations.

Each step is a function that receives a connection already inside a transaction; the runner records the
step's name in ``_migrations`` in the same transaction, so a crash mid-migration leaves the database at the
previous step. Never edit or reorder a released step: append a new one.

The vector table is *not* created here: it depends on which vector backend (sqlite-vec or the numpy
fallback) the database was created with, and that is the store's concern (see ``store._VectorIndex``).
"""
from __future__ import annotations

import sqlite3
import time
from typing import Callable, List, Optional, Tuple

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: List[Tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    """Register ``fn`` as the next migration step, named after the function."""
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_initial(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    # AUTOINCREMENT: an id is never reused after a delete, so an agent holding an old id can't
    # silently get someone else's memory.
    conn.execute(
        """CREATE TABLE memories (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            text TEXT NOT NULL,
            collection TEXT NOT NULL DEFAULT 'default',
            source TEXT,
            session_id TEXT,
            importance REAL NOT NULL DEFAULT 0.5 CHECK (importance >= 0 AND importance <= 1),
            metadata TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            content_hash TEXT NOT NULL
        )"""
    )
    conn.execute("CREATE INDEX memories_dedupe ON memories (collection, content_hash)")
    conn.execute("CREATE INDEX memories_created ON memories (created_at)")
    conn.execute(
        """CREATE TABLE memory_tags (
            tag TEXT NOT NULL,
            memory_id INTEGER NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
            PRIMARY KEY (tag, memory_id)
        ) WITHOUT ROWID"""
    )
    conn.execute("CREATE INDEX memory_tags_by_memory ON memory_tags (memory_id)")
    # External-content FTS5: the text is stored once (in memories), the index references rowids.
    conn.execute(
        """CREATE VIRTUAL TABLE memories_fts USING fts5 (
            text, content='memories', content_rowid='id',
            tokenize='porter unicode61 remove_diacritics 2'
        )"""
    )
    conn.execute(
        """CREATE TRIGGER memories_fts_ai AFTER INSERT ON memories BEGIN
            INSERT INTO memories_fts (rowid, text) VALUES (new.id, new.text);
        END"""
    )
    conn.execute(
        """CREATE TRIGGER memories_fts_ad AFTER DELETE ON memories BEGIN
            INSERT INTO memories_fts (memories_fts, rowid, text) VALUES ('delete', old.id, old.text);
        END"""
    )
    conn.execute(
        """CREATE TRIGGER memories_fts_au AFTER UPDATE OF text ON memories BEGIN
            INSERT INTO memories_fts (memories_fts, rowid, text) VALUES ('delete', old.id, old.text);
            INSERT INTO memories_fts (rowid, text) VALUES (new.id, new.text);
        END"""
    )


@migration
def m002_idempotency(conn: sqlite3.Connection) -> None:
    # Persisted (not in RAM) so a client retrying after the service was restarted still gets the
    # first answer rather than a duplicate.
    conn.execute(
        """CREATE TABLE idempotency (
            key TEXT PRIMARY KEY,
            request_hash TEXT NOT NULL,
            status INTEGER NOT NULL,
            body TEXT NOT NULL,
            created_at REAL NOT NULL
        )"""
    )



@migration
def m003_clock_guard(conn: sqlite3.Connection) -> None:
    # A board without an RTC can run on a wrong clock until NTP answers (see clock.py). Rows written then
    # are flagged and keep a monotonic reference so they can be re-dated once the clock is trusted in the
    # same boot. Existing rows were written before the guard existed: they count as trusted.
    conn.execute("ALTER TABLE memories ADD COLUMN clock_trusted INTEGER NOT NULL DEFAULT 1")
    conn.execute("ALTER TABLE memories ADD COLUMN clock_boot_id TEXT")
    conn.execute("ALTER TABLE memories ADD COLUMN clock_boot_ns INTEGER")
    # Partial: it holds only the (normally zero) untrusted rows, so it costs nothing on a synced board.
    conn.execute("CREATE INDEX memories_untrusted ON memories (clock_boot_id) WHERE clock_trusted = 0")


@migration
def m004_embed_backlog(conn: sqlite3.Connection) -> None:
    # Background embedding (memory.py, backlog.py): a memory is acknowledged once its row, tags and FTS
    # entry are committed; its vector is owed until the worker deletes its row here. In SQLite, not in
    # RAM, so a restart or kill -9 resumes where the worker stopped. ``seq`` orders the work (a text
    # update re-queues with a new seq, so an embedding of the old text can tell it is stale); the cascade
    # drops the debt with the memory. ``attempts`` counts non-transient failures (a poison text is
    # skipped after a few, not retried forever).
    conn.execute(
        """CREATE TABLE embed_backlog (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            memory_id INTEGER NOT NULL UNIQUE REFERENCES memories (id) ON DELETE CASCADE,
            queued_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT
        )"""
    )
    # Embedded count per minute (kept for an hour): the drain rate any process (service, CLI) can read.
    conn.execute("CREATE TABLE embed_log (minute INTEGER PRIMARY KEY, embedded INTEGER NOT NULL)")
    # Merged near-duplicates: the id a client was given points at the memory that was kept.
    conn.execute(
        """CREATE TABLE embed_merged (
            memory_id INTEGER PRIMARY KEY,
            duplicate_of INTEGER NOT NULL,
            merged_at REAL NOT NULL
        )"""
    )


@migration
def m005_session_neighbours(conn: sqlite3.Connection) -> None:
    # Hybrid recall reads the turns before and after a candidate in the same session (dialogue context,
    # fusion.py); partial, so memories without a session_id cost nothing.
    conn.execute("CREATE INDEX memories_session ON memories (session_id, id) WHERE session_id IS NOT NULL")


def applied(conn: sqlite3.Connection) -> List[str]:
    """Names of the migrations already applied to ``conn``'s database, in order."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'"
    ).fetchone()
    if not exists:
        return []
    return [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]


def migrate(conn: sqlite3.Connection, stop_before: Optional[str] = None) -> List[str]:
    """Apply pending migrations in order, each in its own transaction; return the names applied.

    ``stop_before`` (tests) leaves the named step and those after it unapplied.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    done = set(applied(conn))
    ran: List[str] = []
    for name, fn in MIGRATIONS:
        if name == stop_before:
            break
        if name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-check inside the write lock: another process may have migrated meanwhile.
            if conn.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)).fetchone():
                conn.execute("COMMIT")
                continue
            fn(conn)
            conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (name, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        ran.append(name)
    return ran


def latest() -> str:
    """Name of the newest migration known to this version of the code."""
    return MIGRATIONS[-1][0]
