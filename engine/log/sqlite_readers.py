"""The read side of the sqlite backend: reader threads with their own
connections, and the records this process committed last."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
from collections.abc import Callable
from typing import TypeVar

from ..errors import LogCorrupted, LogError, LogUnavailable
from .sqlite_file import _RESTORE, _connect, _corrupt

T = TypeVar("T")


class _Recent:
    """A contiguous run of offsets this process committed last in a partition.

    Only committed (durable) records enter it. When another process appended
    in between, the run restarts at our batch, so it never has holes: any
    offset inside [start, end) is exactly what the table holds.

    It is a cache for readers that keep up (a worker tailing its own events,
    a client awaiting a result), not a store: it keeps the newest
    `KEEP_RECORDS` records and `KEEP_BYTES` of keys and values, whichever is
    less, so what a worker holds for it stays bounded however many runs it
    has seen. A read below `start` is a query, as if nothing were cached.
    """

    # Enough for a worker's tail at 256 runs in flight (it reads back its
    # own group-committed batches within a few of them); each record costs
    # its bytes plus about 150 B of tuple and objects.
    KEEP_RECORDS = 1000
    KEEP_BYTES = 512 * 1024
    _OVERHEAD = 150

    __slots__ = ("start", "rows", "mark", "size")

    def __init__(self) -> None:
        self.start = 0
        self.rows: list[tuple[int, bytes, bytes, int]] = []
        # The external-commit counter when we last added: if it moved since,
        # someone else may have appended past `end`.
        self.mark = -1
        # Bytes the rows hold, by the estimate of _cost.
        self.size = 0

    @property
    def end(self) -> int:
        return self.start + len(self.rows)

    @classmethod
    def _cost(cls, row: tuple[int, bytes, bytes, int]) -> int:
        return len(row[1]) + len(row[2]) + cls._OVERHEAD

    def add(self, rows: list[tuple[int, bytes, bytes, int]], mark: int) -> None:
        if not rows:
            return
        self.mark = mark
        added = sum(self._cost(r) for r in rows)
        if not self.rows or rows[0][0] != self.end:
            self.start, self.rows, self.size = rows[0][0], list(rows), added
        else:
            self.rows.extend(rows)
            self.size += added
        if len(self.rows) > self.KEEP_RECORDS or self.size > self.KEEP_BYTES:
            self._trim()

    def _trim(self) -> None:
        """Drop the oldest rows down to 3/4 of both bounds (so the list is
        not shifted on every add), keeping `end` where it is."""
        keep_records, keep_bytes = self.KEEP_RECORDS * 3 // 4, self.KEEP_BYTES * 3 // 4
        rows, size, drop = self.rows, self.size, 0
        while drop < len(rows) and (len(rows) - drop > keep_records or size > keep_bytes):
            size -= self._cost(rows[drop])
            drop += 1
        del rows[:drop]
        self.start += drop
        self.size = size

    def slice(self, offset: int, max_records: int) -> list[tuple[int, bytes, bytes, int]]:
        i = offset - self.start
        return self.rows[i : i + max_records]


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
