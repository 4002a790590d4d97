"""The embedded log: one SQLite file in WAL mode, the default backend.

Writes: one writer thread owns the only write connection. `append` (and every
other write) puts an operation on a queue and awaits a future. The thread

1. takes everything pending off the queue,
2. takes its turn among processes (see `_Turnstile`) and opens ONE
   transaction with BEGIN IMMEDIATE (the file's write lock, so no other
   process can append until we commit),
3. checks `PRAGMA data_version`: if another process committed since our last
   batch, the cached next-offsets are dropped and re-read with MAX(offset),
4. inserts the whole batch and commits: one fsync for all of it,
5. resolves every future of the batch with one `call_soon_threadsafe`.

A failed commit (disk full, I/O error, lock timeout) fails the whole batch
with `LogWriteFailed`; nothing of it was written, and the thread carries on.

Reads: a small thread pool with its own read connections, so the event loop
never touches the file. A `read` with a timeout wakes at once on appends made
through this `SqliteLog`, and notices other processes' appends by polling
`PRAGMA data_version` every `poll_interval` seconds while anyone is waiting.

Groups: one worker process per group. `join_group` holds an exclusive
`flock` on `<db>.<group>.lock`; the OS drops it when the holder dies, even
by kill -9, and a waiting joiner then takes over with a new generation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from ..errors import LogCorrupted, LogError, LogUnavailable, LogWriteFailed, UnknownTopic
from .base import (
    AssignCallback,
    Assignment,
    Log,
    Membership,
    Record,
    RevokeCallback,
    TopicSpec,
)

__all__ = ["SCHEMA_VERSION", "SqliteLog"]

T = TypeVar("T")
Synchronous = Literal["full", "normal"]

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
_MAX_OFFSET = "SELECT MAX(offset) FROM records WHERE topic_id = ? AND partition = ?"
# How often a waiting joiner retries the group lock.
_LOCK_POLL_S = 0.05


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
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
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
    wal = f"{path}-wal"
    wal_holds_pages = os.path.exists(wal) and os.stat(wal).st_size > 32
    if size < pages * page_size and not wal_holds_pages:
        raise LogCorrupted(
            f"the sqlite log at {path} is damaged: its header counts {pages:,} pages but the file "
            f"holds {size // page_size:,} (cut short); {_RESTORE}")


# --- the writer thread -------------------------------------------------------


class _Turnstile:
    """Makes busy writers in several processes take turns.

    SQLite's own busy handler retries the write lock at 1, 2, 5 ... 100 ms,
    and a worker committing back to back frees it for microseconds between
    batches, so a CLI appending at the same time could starve until
    busy_timeout. Two flocks fix that: a writer passes the turnstile, takes
    the write lock, then lets the turnstile go. A writer waiting for the
    write lock holds the turnstile, so the current holder, coming back for
    its next batch, queues behind it. Uncontended it costs four syscalls.
    """

    def __init__(self, path: str, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._turn = os.open(f"{path}-write-turn.lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._write = os.open(f"{path}-write.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def enter(self) -> None:
        deadline = time.monotonic() + self._timeout_s
        self._take(self._turn, deadline)
        try:
            self._take(self._write, deadline)
        finally:
            fcntl.flock(self._turn, fcntl.LOCK_UN)

    def leave(self) -> None:
        fcntl.flock(self._write, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._turn)
        os.close(self._write)

    @staticmethod
    def _take(fd: int, deadline: float) -> None:
        pause = 0.00005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    # An sqlite3.Error, so the batch fails like any lock timeout.
                    raise sqlite3.OperationalError(
                        "another process held the log's write lock past busy_timeout"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.001)


@dataclass(slots=True)
class _Append:
    topic_id: int
    partition: int
    records: Sequence[tuple[bytes, bytes]]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Call:
    """Any other write (topics, offsets, generations), run inside a batch."""

    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


_Op = _Append | _Call
# (future, result, error) per operation of a batch, in queue order.
_Results = list[tuple[asyncio.Future[Any], Any, BaseException | None]]
_Rows = dict[tuple[int, int], list[tuple[int, bytes, bytes, int]]]
_Deliver = Callable[[_Results, _Rows], None]


class _Recent:
    """A contiguous run of offsets this process committed last in a partition.

    Only committed (durable) records enter it. When another process appended
    in between, the run restarts at our batch, so it never has holes: any
    offset inside [start, end) is exactly what the table holds.
    """

    KEEP = 20_000

    __slots__ = ("start", "rows", "mark")

    def __init__(self) -> None:
        self.start = 0
        self.rows: list[tuple[int, bytes, bytes, int]] = []
        # The external-commit counter when we last added: if it moved since,
        # someone else may have appended past `end`.
        self.mark = -1

    @property
    def end(self) -> int:
        return self.start + len(self.rows)

    def add(self, rows: list[tuple[int, bytes, bytes, int]], mark: int) -> None:
        if not rows:
            return
        self.mark = mark
        if not self.rows or rows[0][0] != self.end:
            self.start, self.rows = rows[0][0], list(rows)
        else:
            self.rows.extend(rows)
        if len(self.rows) > 2 * self.KEEP:
            drop = len(self.rows) - self.KEEP
            del self.rows[:drop]
            self.start += drop

    def slice(self, offset: int, max_records: int) -> list[tuple[int, bytes, bytes, int]]:
        i = offset - self.start
        return self.rows[i : i + max_records]


class _Writer:
    """Owns the write connection; see steps 1-5 in the module docstring."""

    def __init__(self, path: str, synchronous: Synchronous, busy_timeout_ms: int) -> None:
        self.path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._turnstile: _Turnstile | None = None
        # (topic_id, partition) -> next offset, valid while data_version holds.
        self._next: dict[tuple[int, int], int] = {}
        self._data_version = -1
        # Counters for benchmarks: committed transactions and records in them.
        self.commits = 0
        self.records_written = 0
        self._thread: threading.Thread | None = None
        self._deliver: _Deliver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, deliver: _Deliver) -> None:
        self._loop = asyncio.get_running_loop()
        self._deliver = deliver
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"stepline-sqlite-writer:{self.path}", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(ready)

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)  # after everything already queued
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def submit(self, op: _Op) -> None:
        self._queue.put(op)

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            _check_file(self.path)
            self._conn = self._open()
            self._turnstile = _Turnstile(self.path, self._busy_timeout_ms / 1000)
        except BaseException as exc:
            if self._conn is not None:
                self._conn.close()
            ready.set_exception(_unavailable(self.path, exc))
            return
        ready.set_result(None)
        try:
            while True:
                op = self._queue.get()
                batch: list[_Op] = []
                stop = op is None
                if op is not None:
                    batch.append(op)
                while not stop:
                    try:
                        op = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if op is None:
                        stop = True
                    else:
                        batch.append(op)
                if batch:
                    self._write(batch)
                if stop:
                    return
        finally:
            self._conn.close()
            self._turnstile.close()

    def _open(self) -> sqlite3.Connection:
        conn = _connect(self.path, self._busy_timeout_ms)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"WAL mode refused (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous.upper()}")
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _write(self, batch: list[_Op]) -> None:
        try:
            results, touched = self._transaction(batch)
        except sqlite3.IntegrityError:
            # A cached offset was stale after all; re-read and try once more.
            self._next.clear()
            try:
                results, touched = self._transaction(batch)
            except sqlite3.Error as exc:
                results, touched = self._failed(batch, exc), {}
        except sqlite3.Error as exc:
            results, touched = self._failed(batch, exc), {}
        assert self._loop is not None and self._deliver is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, results, touched)
        except RuntimeError:
            pass  # the loop is closed; nobody is left to tell

    def _transaction(self, batch: list[_Op]) -> tuple[_Results, _Rows]:
        conn, turnstile = self._conn, self._turnstile
        assert conn is not None and turnstile is not None
        turnstile.enter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                # Another connection (a CLI, another worker) committed: our
                # next-offsets may be behind. The write lock we now hold keeps
                # them right until COMMIT.
                self._next.clear()
                self._data_version = version
            now_ms = time.time_ns() // 1_000_000
            nexts: dict[tuple[int, int], int] = {}
            rows: list[tuple[int, int, int, bytes, bytes, int]] = []
            written: _Rows = {}
            results: _Results = []
            for op in batch:
                if isinstance(op, _Call):
                    results.append(self._call(conn, op))
                    continue
                where = (op.topic_id, op.partition)
                start = nexts.get(where)
                if start is None:
                    start = self._next.get(where)
                if start is None:
                    top = conn.execute(_MAX_OFFSET, where).fetchone()[0]
                    start = 0 if top is None else top + 1
                tid, part = where
                mine = written.setdefault(where, [])
                for i, (key, value) in enumerate(op.records):
                    rows.append((tid, part, start + i, key, value, now_ms))
                    mine.append((start + i, key, value, now_ms))
                nexts[where] = start + len(op.records)
                results.append((op.future, list(range(start, nexts[where])), None))
            # One executemany for the whole batch; ops' relative order is kept.
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            self._next.clear()
            if conn.in_transaction:  # SQLite may have rolled back already
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original error is the one worth reporting
            raise
        finally:
            turnstile.leave()
        self._next.update(nexts)
        self.commits += 1
        self.records_written += len(rows)
        return results, written

    @staticmethod
    def _call(
        conn: sqlite3.Connection, op: _Call
    ) -> tuple[asyncio.Future[Any], Any, BaseException | None]:
        try:
            return (op.future, op.fn(conn), None)
        except sqlite3.Error:
            raise  # the database is in trouble: fail the whole batch
        except Exception as exc:
            return (op.future, None, exc)

    def _failed(self, batch: list[_Op], exc: sqlite3.Error) -> _Results:
        name = getattr(exc, "sqlite_errorname", type(exc).__name__)
        out: _Results = []
        for op in batch:
            err: LogError
            if _corrupt(exc):
                err = LogCorrupted(f"could not write to the sqlite log at {self.path}: it is damaged "
                                   f"({name}: {exc}); nothing of this batch was written; {_RESTORE}")
            else:
                err = LogWriteFailed(
                    f"could not write to the sqlite log at {self.path}: {name}: {exc}; "
                    "nothing of this batch was written, retry once the cause is fixed"
                )
            err.__cause__ = exc
            out.append((op.future, None, err))
        return out


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


# --- readers -----------------------------------------------------------------


class _Readers:
    """A few threads, each with its own read connection."""

    def __init__(self, path: str, busy_timeout_ms: int, threads: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="stepline-sqlite-reader"
        )
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self._path, self._busy_timeout_ms)
            conn.execute("PRAGMA query_only = 1")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(self._conn()))
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc

    async def run_on(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, conn)
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: sqlite3.Error) -> LogError:
        name = getattr(exc, "sqlite_errorname", type(exc).__name__)
        if _corrupt(exc):
            return LogCorrupted(f"could not read the sqlite log at {self._path}: it is damaged "
                                f"({name}: {exc}); {_RESTORE}")
        return LogUnavailable(f"could not read the sqlite log at {self._path}: {name}: {exc}")

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, True)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# --- groups ------------------------------------------------------------------


class _SqliteMembership(Membership):
    def __init__(self, log: SqliteLog, key: tuple[str, str], assignment: Assignment,
                 on_revoke: RevokeCallback) -> None:
        self._log = log
        self._key = key
        self._assignment = assignment
        self._on_revoke = on_revoke
        self.left = False

    @property
    def assignment(self) -> Assignment:
        return self._assignment

    async def leave(self) -> None:
        if self.left:
            return
        self.left = True
        try:
            await self._on_revoke(self._assignment.partitions)
        finally:
            self._log._release_seat(self._key)


@dataclass
class _GroupLock:
    fd: int
    holders: int = 0


class SqliteLog(Log):
    """A `Log` in one SQLite file; see the module docstring for how it works."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "full",
        poll_interval: float = 0.010,
        busy_timeout_ms: int = 10_000,
        reader_threads: int = 2,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, not {poll_interval!r}")
        self.path = os.path.abspath(os.fspath(path))
        query = "" if synchronous == "full" else "?synchronous=normal"
        self.url = f"sqlite:///{self.path}{query}"
        self.synchronous: Synchronous = synchronous
        self.poll_interval = poll_interval
        self._busy_timeout_ms = busy_timeout_ms
        self._reader_threads = reader_threads
        self._writer: _Writer | None = None
        self._readers: _Readers | None = None
        self._poll_conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # name -> (topic id, partition count); topics never change once made.
        self._topics: dict[str, tuple[int, int]] = {}
        # In-process wake-ups: parked readers, and a counter per partition
        # bumped on every append so a reader can tell it missed one.
        self._waiters: dict[tuple[int, int], list[asyncio.Future[None]]] = {}
        self._appended: dict[tuple[int, int], int] = {}
        # What this process committed last, per partition: readers in this
        # process (the worker tailing its own appends, a client awaiting a
        # result) are served from here without a query.
        self._recent: dict[tuple[int, int], _Recent] = {}
        # Out-of-process wake-ups: the poller's last data_version, and a
        # counter bumped each time it changes.
        self._data_version = -1
        self._external = 0
        self._poller: asyncio.Task[None] | None = None
        # Groups: the seat per (group, topic) inside this process, and the
        # flock per group that keeps other processes out.
        self._seats: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._group_locks: dict[str, _GroupLock] = {}
        self._group_gates: dict[str, asyncio.Lock] = {}
        self._members: list[_SqliteMembership] = []

    # --- lifecycle ---

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as exc:
            raise _unavailable(self.path, exc) from exc
        writer = _Writer(self.path, self.synchronous, self._busy_timeout_ms)
        await writer.start(self._deliver)
        self._writer = writer
        self._readers = _Readers(self.path, self._busy_timeout_ms, self._reader_threads)
        try:
            self._poll_conn = _connect(self.path, self._busy_timeout_ms)
            self._data_version = await self._readers.run_on(self._poll_conn, _data_version)
            await self._load_topics()
        except LogCorrupted:
            await self.close()
            raise
        except (sqlite3.Error, LogError) as exc:
            await self.close()
            raise _unavailable(self.path, exc) from exc

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        for member in self._members:
            member.left = True
        self._members.clear()
        for lock in self._group_locks.values():
            os.close(lock.fd)  # releases the flock
        self._group_locks.clear()
        self._seats.clear()
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        if self._readers is not None:
            await self._readers.close()
            self._readers = None
        if self._poll_conn is not None:
            self._poll_conn.close()
            self._poll_conn = None

    def _parts(self) -> tuple[_Writer, _Readers]:
        if self._writer is None or self._readers is None:
            raise RuntimeError(f"{self.url} is not started; use `async with` or start()")
        return self._writer, self._readers

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        writer, _ = self._parts()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        writer.submit(_Call(fn, future))
        return await future

    def _deliver(self, results: _Results, written: _Rows) -> None:
        """Runs on the loop, once per written batch (writer step 5)."""
        for future, value, exc in results:
            if future.done():
                continue  # the caller was cancelled; the records are written anyway
            if exc is None:
                future.set_result(value)
            else:
                future.set_exception(exc)
        for where, rows in written.items():
            self._recent.setdefault(where, _Recent()).add(rows, self._external)
            self._appended[where] = self._appended.get(where, 0) + 1
            for waiter in self._waiters.pop(where, ()):
                _set_if_pending(waiter)

    # --- topics ---

    async def _load_topics(self) -> None:
        _, readers = self._parts()
        rows = await readers.run(
            lambda c: c.execute("SELECT name, id, partitions FROM topics").fetchall()
        )
        self._topics = {name: (tid, count) for name, tid, count in rows}

    async def _topic(self, name: str) -> tuple[int, int]:
        found = self._topics.get(name)
        if found is None:
            await self._load_topics()  # another process may have made it
            found = self._topics.get(name)
        if found is None:
            raise UnknownTopic(f"topic {name!r} does not exist in {self.path}; "
                               "create it with ensure_topics()")
        return found

    async def _where(self, topic: str, partition: int) -> tuple[int, int]:
        tid, count = await self._topic(topic)
        if not 0 <= partition < count:
            raise UnknownTopic(
                f"topic {topic!r} has {count} partitions; partition {partition} does not exist"
            )
        return tid, partition

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        for spec in specs:
            if spec.partitions < 1:
                raise ValueError(f"topic {spec.name!r} needs at least one partition")

        def create(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO topics (name, partitions, retention_ms) VALUES (?, ?, ?)",
                [(s.name, s.partitions, s.retention_ms) for s in specs],
            )

        await self._write(create)
        await self._load_topics()

    async def partitions(self, topic: str) -> int:
        return (await self._topic(topic))[1]

    # --- records ---

    async def append(
        self, topic: str, partition: int, records: Sequence[tuple[bytes, bytes]]
    ) -> list[int]:
        writer, _ = self._parts()
        # The hot path: a dict lookup, no extra awaits, for a known topic.
        known = self._topics.get(topic)
        if known is not None and 0 <= partition < known[1]:
            tid, part = known[0], partition
        else:
            tid, part = await self._where(topic, partition)
        if not records:
            return []
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        writer.submit(_Append(tid, part, records, future))
        return await future

    async def _select(self, topic: str, where: tuple[int, int], offset: int,
                      max_records: int, will_wait: bool = False) -> list[Record]:
        tid, part = where
        recent = self._recent.get(where)
        if recent is not None:
            if recent.start <= offset < recent.end:
                return [Record(topic, part, o, k, v, ts) for o, k, v, ts in recent.slice(offset, max_records)]
            if will_wait and offset == recent.end and recent.mark == self._external:
                # Caught up with our own last commit, and the poller has seen
                # no other commit since. The caller is about to wait, and the
                # poller wakes it if another process did append: skip the
                # query. (A caller that will not wait gets the query, or it
                # could spin on a stale answer.)
                return []
        _, readers = self._parts()
        rows = await readers.run(
            lambda c: c.execute(_SELECT, (tid, part, offset, max_records)).fetchall()
        )
        return [Record(topic, part, o, k, v, ts) for o, k, v, ts in rows]

    async def read(
        self,
        topic: str,
        partition: int,
        offset: int,
        max_records: int = 1000,
        timeout: float = 0.0,
    ) -> list[Record]:
        where = await self._where(topic, partition)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # Counters first, then the query: an append committed after the
            # query started bumps one of them, so it is never slept through.
            seen = (self._appended.get(where, 0), self._external)
            found = await self._select(topic, where, offset, max_records, timeout > 0)
            remaining = deadline - loop.time()
            if found or remaining <= 0:
                return found
            if seen != (self._appended.get(where, 0), self._external):
                continue
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(where, []).append(waiter)
            self._ensure_poller()
            timer = loop.call_later(remaining, _set_if_pending, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                parked = self._waiters.get(where)
                if parked is not None and waiter in parked:
                    parked.remove(waiter)
                    if not parked:
                        del self._waiters[where]

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(
                self._poll(), name=f"stepline-sqlite-poll:{self.path}"
            )

    async def _poll(self) -> None:
        """Watch for other processes' commits while any reader waits."""
        _, readers = self._parts()
        assert self._poll_conn is not None
        while self._waiters:
            await asyncio.sleep(self.poll_interval)
            version = await readers.run_on(self._poll_conn, _data_version)
            if version != self._data_version:
                # Our own writer's commits show up here too; waking for them
                # costs one extra query per waiting reader, at most per interval.
                self._data_version = version
                self._external += 1
                waiting, self._waiters = self._waiters, {}
                for parked in waiting.values():
                    for waiter in parked:
                        _set_if_pending(waiter)

    async def end_offset(self, topic: str, partition: int) -> int:
        _, readers = self._parts()
        where = await self._where(topic, partition)
        top = await readers.run(lambda c: c.execute(_MAX_OFFSET, where).fetchone()[0])
        return 0 if top is None else int(top) + 1

    # --- groups ---

    async def commit(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        rows = []
        for partition, offset in offsets.items():
            tid, part = await self._where(topic, partition)
            rows.append((group, tid, part, offset))

        def upsert(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO group_offsets VALUES (?, ?, ?, ?) ON CONFLICT"
                " (grp, topic_id, partition) DO UPDATE SET offset = excluded.offset",
                rows,
            )

        if rows:
            await self._write(upsert)

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        _, readers = self._parts()
        tid, _count = await self._topic(topic)
        rows = await readers.run(
            lambda c: c.execute(
                "SELECT partition, offset FROM group_offsets WHERE grp = ? AND topic_id = ?",
                (group, tid),
            ).fetchall()
        )
        return {int(p): int(o) for p, o in rows}

    def lock_path(self, group: str) -> str:
        """The file whose flock makes this process the group's only member."""
        return f"{self.path}.{urllib.parse.quote(group, safe='')}.lock"

    async def join_group(
        self,
        group: str,
        topic: str,
        on_assign: AssignCallback,
        on_revoke: RevokeCallback,
    ) -> Membership:
        tid, count = await self._topic(topic)
        key = (group, topic)
        await self._take_seat(key)
        try:
            await self._lock_group(group)
        except BaseException:
            self._free_seat(key)
            raise
        try:
            generation = await self._write(
                lambda c: c.execute(
                    "INSERT INTO group_generations VALUES (?, ?, 1) ON CONFLICT (grp, topic_id)"
                    " DO UPDATE SET generation = generation + 1 RETURNING generation",
                    (group, tid),
                ).fetchone()[0]
            )
            assignment = Assignment(frozenset(range(count)), int(generation))
            member = _SqliteMembership(self, key, assignment, on_revoke)
            self._members.append(member)
            await on_assign(assignment)
        except BaseException:
            self._release_seat(key)
            raise
        return member

    async def _take_seat(self, key: tuple[str, str]) -> None:
        """One member per (group, topic) inside this process; others queue."""
        loop = asyncio.get_running_loop()
        while key in self._seats:
            await asyncio.shield(self._seats[key])
        self._seats[key] = loop.create_future()

    def _free_seat(self, key: tuple[str, str]) -> None:
        seat = self._seats.pop(key, None)
        if seat is not None:
            _set_if_pending(seat)

    async def _lock_group(self, group: str) -> None:
        """Hold the group's flock; shared by this process's seats in the group."""
        # The gate stops two seats of one group both opening the lock file:
        # flock on a second descriptor would wait for the first, forever.
        gate = self._group_gates.setdefault(group, asyncio.Lock())
        async with gate:
            held = self._group_locks.get(group)
            if held is None:
                fd = os.open(self.lock_path(group), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    while True:
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            # Another process is the member; the OS frees
                            # the lock when it leaves or dies, even by kill -9.
                            await asyncio.sleep(_LOCK_POLL_S)
                except BaseException:
                    os.close(fd)
                    raise
                held = self._group_locks[group] = _GroupLock(fd)
            held.holders += 1

    def _release_seat(self, key: tuple[str, str]) -> None:
        self._members = [m for m in self._members if m._key != key]
        group = key[0]
        held = self._group_locks.get(group)
        if held is not None:
            held.holders -= 1
            if held.holders <= 0:
                del self._group_locks[group]
                os.close(held.fd)
        self._free_seat(key)


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])
