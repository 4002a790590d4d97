"""The file of the sqlite backend (engine/log/sqlite.py): its layout and
migrations, opening connections, and telling a damaged file from an
unavailable one."""

from __future__ import annotations

import os
import sqlite3
import urllib.parse

from ..errors import LogCorrupted, LogError, LogUnavailable

# Stored in `PRAGMA user_version`. Bump it, and add a migration step in
# `_migrate`, whenever the layout below changes; files outlive the code.
SCHEMA_VERSION = 1

_SCHEMA_V1 = (
    """CREATE TABLE topics (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        partitions INTEGER NOT NULL,
        retention_ms INTEGER
    )""",
    # WITHOUT ROWID: the primary key is the table, so an append is one b-tree
    # insert and a read is one range scan. Rows are events of a few hundred
    # bytes; larger values still work, they just spill to overflow pages.
    """CREATE TABLE records (
        topic_id INTEGER NOT NULL,
        partition INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        key BLOB NOT NULL,
        value BLOB NOT NULL,
        timestamp_ms INTEGER NOT NULL,
        PRIMARY KEY (topic_id, partition, offset)
    ) WITHOUT ROWID""",
    """CREATE TABLE group_offsets (
        grp TEXT NOT NULL,
        topic_id INTEGER NOT NULL,
        partition INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        PRIMARY KEY (grp, topic_id, partition)
    ) WITHOUT ROWID""",
    """CREATE TABLE group_generations (
        grp TEXT NOT NULL,
        topic_id INTEGER NOT NULL,
        generation INTEGER NOT NULL,
        PRIMARY KEY (grp, topic_id)
    ) WITHOUT ROWID""",
)

_INSERT = "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)"
_SELECT = (
    "SELECT offset, key, value, timestamp_ms FROM records"
    " WHERE topic_id = ? AND partition = ? AND offset >= ? ORDER BY offset LIMIT ?"
)
# The group name under which `stepline prune` keeps a partition's end: once
# records are removed (engine/log/sqlite.py, `remove`), the highest offset
# left may be below the end, and the next append must not reuse an offset
# that snapshots or a query projection already recorded. The engine's
# groups are `<namespace>.<name>`: none starts with "!".
END_MARK = "!stepline:end"
# The last offset taken: the highest record, or the end `prune` kept.
_MAX_OFFSET = (
    "SELECT MAX(o) FROM (SELECT MAX(offset) AS o FROM records WHERE topic_id = ?1 AND partition = ?2"
    f" UNION ALL SELECT offset - 1 FROM group_offsets WHERE grp = '{END_MARK}' AND topic_id = ?1"
    " AND partition = ?2)"
)
_KEEP_END = (
    f"INSERT INTO group_offsets VALUES ('{END_MARK}', ?, ?, ?) ON CONFLICT (grp, topic_id, partition)"
    " DO UPDATE SET offset = MAX(offset, excluded.offset)"
)
_COMMIT = (
    "INSERT INTO group_offsets VALUES (?, ?, ?, ?) ON CONFLICT"
    " (grp, topic_id, partition) DO UPDATE SET offset = excluded.offset"
)
_COMMITTED = "SELECT partition, offset FROM group_offsets WHERE grp = ? AND topic_id = ?"
_NEXT_GENERATION = (
    "INSERT INTO group_generations VALUES (?, ?, 1) ON CONFLICT (grp, topic_id)"
    " DO UPDATE SET generation = generation + 1 RETURNING generation"
)


def lock_file(path: str, name: str) -> str:
    """The file behind one of the log's `flock`s (writer turnstile, group
    membership), in one hidden folder beside the database: `.x.db.locks/`.

    The locks are advisory and cross-process, so every process opening the
    log must agree on these names; they live in a folder of their own so a
    log leaves one entry beside its file (besides SQLite's -wal and -shm),
    not one per lock. The folder is made here, race-free, by whoever needs
    it first; a lock file is never deleted (a process holding it open must
    keep meaning the same file).
    """
    folder = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.locks")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def _connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return conn


def _unavailable(path: str, exc: BaseException) -> LogError:
    if isinstance(exc, LogCorrupted):
        return exc
    if _corrupt(exc):
        err: LogError = LogCorrupted(f"the sqlite log at {path} is damaged: {exc}; {_RESTORE}")
    else:
        err = LogUnavailable(f"cannot open the sqlite log at {path}: {exc}")
    err.__cause__ = exc
    return err


# SQLite's own names for a file whose content does not add up.
_CORRUPT = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CORRUPT_INDEX", "SQLITE_CORRUPT_SEQUENCE",
                      "SQLITE_CORRUPT_VTAB", "SQLITE_IOERR_SHORT_READ"})
_RESTORE = "restore it from a copy, or salvage it with `sqlite3 FILE .recover` and check what it kept"


def _corrupt(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and getattr(exc, "sqlite_errorname", "") in _CORRUPT


def _check_file(path: str) -> None:
    """Refuse a database file with a torn tail before anything writes to it.

    SQLite reads a file cut in the middle of a page as if the missing bytes
    were zeros, and a b-tree search that meets such a page can come back
    empty instead of failing: a torn file would read as a shorter log, with
    acknowledged events silently gone. Opening it for writing would also
    make the damage permanent (the first checkpoint rewrites the last page).
    So the size is checked against the page size, and against the page
    count in the header when no write-ahead log holds newer pages (while one
    does, a checkpoint cut off halfway may leave the file short: SQLite
    redoes it). A torn write-ahead log needs nothing from us: SQLite checks
    every frame and drops a transaction whose frames are not all there and
    intact.

    The file is looked at through a read-only SQLite connection and `stat`,
    never a plain open(): closing any descriptor of the file would drop
    every POSIX lock this process's other connections hold on it.
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return
    if size == 0:
        return  # created, never written: SQLite starts it afresh
    conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, isolation_level=None)
    try:
        # Sizes are taken inside one read transaction: while it is open no
        # other process can delete or restart the write-ahead log (a last
        # connection closing checkpoints it away), so a file that a
        # checkpoint is still growing is not mistaken for one cut short.
        conn.execute("BEGIN")
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        size = os.stat(path).st_size
        wal = f"{path}-wal"
        wal_holds_pages = os.path.exists(wal) and os.stat(wal).st_size > 32
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        if _corrupt(exc):
            raise LogCorrupted(f"the sqlite log at {path} is damaged: {exc}; {_RESTORE}") from exc
        raise
    finally:
        conn.close()
    if size % page_size:
        raise LogCorrupted(
            f"the sqlite log at {path} is damaged: it ends in the middle of a page ({size:,} bytes, "
            f"pages of {page_size:,}), as a torn write leaves it; {_RESTORE}")
    if size < pages * page_size and not wal_holds_pages:
        raise LogCorrupted(
            f"the sqlite log at {path} is damaged: its header counts {pages:,} pages but the file "
            f"holds {size // page_size:,} (cut short); {_RESTORE}")


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"file format v{version} is newer than this build's v{SCHEMA_VERSION}; "
                "upgrade stepline"
            )
        if version < 1:
            for statement in _SCHEMA_V1:
                conn.execute(statement)
        if version != SCHEMA_VERSION:  # an open that changes nothing writes nothing
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
