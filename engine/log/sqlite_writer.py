"""The writer thread of the sqlite backend: steps 1-5 of the module
docstring of engine/log/sqlite.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import LogCorrupted, LogError, LogWriteFailed
from .sqlite_bell import Ringer
from .sqlite_file import (
    _INSERT,
    _MAX_OFFSET,
    _RESTORE,
    _check_file,
    _connect,
    _corrupt,
    _migrate,
    _unavailable,
    lock_file,
)

Synchronous = Literal["full", "normal"]


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
        self._turn = os.open(lock_file(path, "write-turn.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        self._write = os.open(lock_file(path, "write.lock"), os.O_RDWR | os.O_CREAT, 0o644)

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


@dataclass(slots=True)
class _Poll:
    """Read `PRAGMA data_version` on the write connection, outside any
    transaction. On this connection it changes only when another connection
    (another process) committed: our own commits never wake our readers."""

    future: asyncio.Future[Any]


_Op = _Append | _Call | _Poll
# (future, result, error) per operation of a batch, in queue order.
_Results = list[tuple[asyncio.Future[Any], Any, BaseException | None]]
_Rows = dict[tuple[int, int], list[tuple[int, bytes, bytes, int]]]
_Deliver = Callable[[_Results, _Rows], None]


class _Writer:
    """Owns the write connection; see steps 1-5 in the module docstring."""

    def __init__(self, path: str, synchronous: Synchronous, busy_timeout_ms: int) -> None:
        self.path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._turnstile: _Turnstile | None = None
        self._ringer: Ringer | None = None
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

    async def data_version(self) -> int:
        """The write connection's `PRAGMA data_version` (see `_Poll`)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.put(_Poll(future))
        return await future

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            self._turnstile = _Turnstile(self.path, self._busy_timeout_ms / 1000)
            self._ringer = Ringer(self.path)
            # Opening takes a turn as a write does. Two processes switching a
            # fresh file to WAL at once deadlock inside SQLite, which then
            # fails one at once with "database is locked" instead of calling
            # the busy handler; in turn, the second finds the switch made.
            self._turnstile.enter()
            try:
                _check_file(self.path)
                self._conn = self._open()
            finally:
                self._turnstile.leave()
        except BaseException as exc:
            if self._conn is not None:
                self._conn.close()
            if self._turnstile is not None:
                self._turnstile.close()
            if self._ringer is not None:
                self._ringer.close()
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
            self._ringer.close()

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
        polls = [op for op in batch if isinstance(op, _Poll)]
        if polls:
            batch = [op for op in batch if not isinstance(op, _Poll)]
        results: _Results = []
        touched: _Rows = {}
        if batch:
            results, touched = self._transact(batch)
        for poll in polls:
            results.append(self._poll(poll))
        assert self._loop is not None and self._deliver is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, results, touched)
        except RuntimeError:
            pass  # the loop is closed; nobody is left to tell

    def _poll(self, op: _Poll) -> tuple[asyncio.Future[Any], Any, BaseException | None]:
        assert self._conn is not None
        try:
            return (op.future, int(self._conn.execute("PRAGMA data_version").fetchone()[0]), None)
        except sqlite3.Error as exc:
            return (op.future, None, self._failed([op], exc)[0][2])

    def _transact(self, batch: list[_Op]) -> tuple[_Results, _Rows]:
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
        return results, touched

    def _transaction(self, batch: list[_Op]) -> tuple[_Results, _Rows]:
        conn, turnstile, ringer = self._conn, self._turnstile, self._ringer
        assert conn is not None and turnstile is not None and ringer is not None
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
                assert isinstance(op, _Append), "polls never enter a transaction"
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
            # Visible to every connection now: wake other processes' polls.
            ringer.ring()
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
