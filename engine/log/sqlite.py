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
never waits for the file (its one statement, the poll's look at `PRAGMA
data_version` below, reads shared memory and never waits for a lock). A
`read` with a timeout wakes at once on appends made through this
`SqliteLog`, and notices other processes' appends by polling `PRAGMA
data_version` while anyone is waiting: at most every `poll_interval`
seconds, and on Linux only after another writer's commit rang since the last
look (`sqlite_bell.py`, inotify), so an idle log with waiting readers sleeps
(one look a second in case a ring was lost). The
poll looks first on a connection of the loop's own: unchanged, nobody
committed, and an idle poll costs no thread switch. Changed, it asks the
writer's connection, on which only other connections' commits change it:
this process's own appends never wake its readers twice (once from
`_deliver`, once more from the poll, with a query each). When it does
change, one trip to a reader thread looks up the end of every partition
someone waits on, and only the readers whose partition grew are woken (the
rest, such as a worker's idle tails of other topics, would each re-run
their query for nothing, a hundred times a second on a busy log).

Groups: `join_group` holds an exclusive `flock` per partition of the group
(`.<db>.locks/group-<group>.p<N>.lock`): one process owns all of them, or
several processes started by `stepline worker --processes N` split them
(`split_groups`, engine/log/sqlite_groups.py). The OS drops a lock when its
holder dies, even by kill -9, and a waiting joiner then takes over with a
new generation.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TypeVar

from ..errors import LogCorrupted, LogError, UnknownTopic
from .base import AssignCallback, Headers, Log, Membership, Record, RevokeCallback, TopicSpec
from .sqlite_bell import Bell, open_bell
from .sqlite_file import (
    _COMMIT,
    _COMMITTED,
    _KEEP_END,
    _MAX_OFFSET,
    _NEXT_GENERATION,
    _SELECT,
    SCHEMA_VERSION,
    _connect,
    _unavailable,
)
from .sqlite_groups import SqliteGroups
from .sqlite_readers import _Readers, _Recent
from .sqlite_writer import Synchronous, _Append, _Call, _Results, _Rows, _Writer

__all__ = ["SCHEMA_VERSION", "SqliteLog"]

T = TypeVar("T")

# With the bell, how long an idle poll sleeps before it looks anyway: a ring
# lost (a writer that does not ring: an older version) costs this, never a wake-up.
_IDLE_LOOK_S = 1.0


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _ends(conn: sqlite3.Connection, wheres: list[tuple[int, int]]) -> dict[tuple[int, int], int | None]:
    """The last offset of each (topic id, partition), None when it holds none."""
    return {w: conn.execute(_MAX_OFFSET, w).fetchone()[0] for w in wheres}


def _keep_end(conn: sqlite3.Connection, tid: int, part: int) -> None:
    """Record the partition's end before records go, so that it never moves back."""
    top = conn.execute(_MAX_OFFSET, (tid, part)).fetchone()[0]
    if top is not None:
        conn.execute(_KEEP_END, (tid, part, int(top) + 1))


class SqliteLog(Log):
    """A `Log` in one SQLite file; see the module docstring for how it works."""

    removes_records = True

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
        self._loop: asyncio.AbstractEventLoop | None = None
        # name -> (topic id, partition count); topics never change once made.
        self._topics: dict[str, tuple[int, int]] = {}
        # In-process wake-ups: parked readers, and a counter per partition
        # bumped on every append so a reader can tell it missed one.
        # Parked readers per partition, with the offset each waits for.
        self._waiters: dict[tuple[int, int], list[tuple[int, asyncio.Future[None]]]] = {}
        self._appended: dict[tuple[int, int], int] = {}
        # What this process committed last, per partition: readers in this
        # process (the worker tailing its own appends, a client awaiting a
        # result) are served from here without a query.
        self._recent: dict[tuple[int, int], _Recent] = {}
        # Out-of-process wake-ups: the poller's last data_version, and a
        # counter bumped each time it changes.
        self._data_version = -1
        self._external = 0
        # A connection of the loop's own, for one cheap look per poll (see `_peek`).
        self._peek_conn: sqlite3.Connection | None = None
        self._peeked: int | None = None
        self._poller: asyncio.Task[None] | None = None
        self._bell: Bell | None = None
        self._groups = SqliteGroups(self.path)

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
        # Opened before the first look at data_version: a commit after that
        # look is queued in the kernel for the poll.
        self._bell = open_bell(self.path)
        self._readers = _Readers(self.path, self._busy_timeout_ms, self._reader_threads)
        try:
            self._data_version = await writer.data_version()
            # Opened off the loop; it never waits for a lock (busy timeout 0).
            self._peek_conn = await asyncio.to_thread(_connect, self.path, 0)
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
        self._groups.close()
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        if self._readers is not None:
            await self._readers.close()
            self._readers = None
        if self._peek_conn is not None:
            self._peek_conn.close()
            self._peek_conn = None

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
            for _, waiter in self._waiters.pop(where, ()):
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

    async def topic_names(self, prefix: str = "") -> list[str]:
        await self._load_topics()  # another process may have made some
        return sorted(name for name in self._topics if name.startswith(prefix))

    # --- records ---

    async def append(
        self,
        topic: str,
        partition: int,
        records: Sequence[tuple[bytes, bytes]],
        headers: Sequence[Headers] | None = None,  # not kept: record_headers is False
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
            entry = (offset, waiter)
            self._waiters.setdefault(where, []).append(entry)
            self._ensure_poller()
            timer = loop.call_later(remaining, _set_if_pending, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                parked = self._waiters.get(where)
                if parked is not None and entry in parked:
                    parked.remove(entry)
                    if not parked:
                        del self._waiters[where]

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(
                self._poll(), name=f"stepline-sqlite-poll:{self.path}"
            )

    async def _poll(self) -> None:
        """Watch for other processes' commits while any reader waits."""
        writer, readers = self._parts()
        while self._waiters:
            await asyncio.sleep(self.poll_interval)
            if self._bell is not None:
                # Returns at once when a commit rang during the sleep.
                await self._bell.wait(_IDLE_LOOK_S)
            peeked = self._peek()
            if peeked is not None and peeked == self._peeked:
                continue  # nobody committed, this process included: no thread hop
            self._peeked = peeked
            version = await writer.data_version()
            if version == self._data_version:
                continue
            self._data_version = version
            # Read after the version: a commit the ends miss changes the
            # version again, and the next poll looks once more.
            wheres = list(self._waiters)
            ends = await readers.run(partial(_ends, wheres=wheres))
            # Bumped only now: a reader that queried before this commit was
            # visible and parks after this point sees the counter moved and
            # queries again (see `read`).
            self._external += 1
            for where in list(self._waiters):
                parked = self._waiters[where]
                if where in ends:
                    top = ends[where]
                    woken = [e for e in parked if top is not None and top >= e[0]]
                else:  # parked while the ends were read: wake it to be sure
                    woken = parked
                for _, waiter in woken:
                    _set_if_pending(waiter)

    def _peek(self) -> int | None:
        """`PRAGMA data_version` on the loop's own connection: it changes on
        every commit but its own (ours included), so an unchanged value means
        nothing was committed at all, and the poll needs no trip to the
        writer thread. An idle worker's poll then costs a few microseconds,
        not two thread switches. It reads only the WAL index (shared memory)
        and never waits: busy, or failing, it says None, "ask the writer"."""
        conn = self._peek_conn
        if conn is None:
            return None
        try:
            return int(conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            return None

    async def end_offset(self, topic: str, partition: int) -> int:
        _, readers = self._parts()
        where = await self._where(topic, partition)
        top = await readers.run(lambda c: c.execute(_MAX_OFFSET, where).fetchone()[0])
        return 0 if top is None else int(top) + 1

    # --- retention ---

    async def remove(self, topic: str, partition: int, records: Mapping[bytes, Sequence[int]],
                     below: int) -> list[bytes]:
        where = await self._where(topic, partition)
        tid, part = where

        def remove(conn: sqlite3.Connection) -> list[bytes]:
            # Inside the writer's transaction (BEGIN IMMEDIATE): no append
            # can land between the check and the delete.
            _keep_end(conn, tid, part)
            since = {bytes(k) for (k,) in conn.execute(
                "SELECT DISTINCT key FROM records WHERE topic_id = ? AND partition = ? AND offset >= ?",
                (tid, part, below))}
            gone = [key for key in records if key not in since]
            conn.executemany(
                "DELETE FROM records WHERE topic_id = ? AND partition = ? AND offset = ? AND key = ?",
                [(tid, part, o, key) for key in gone for o in records[key] if o < below])
            return gone

        removed = await self._write(remove)
        self._recent.pop(where, None)  # it may hold removed records
        return removed

    async def delete_before(self, topic: str, partition: int, offset: int) -> None:
        where = await self._where(topic, partition)
        tid, part = where

        def delete(conn: sqlite3.Connection) -> None:
            _keep_end(conn, tid, part)
            conn.execute("DELETE FROM records WHERE topic_id = ? AND partition = ? AND offset < ?",
                         (tid, part, offset))

        await self._write(delete)
        self._recent.pop(where, None)

    # --- groups ---

    async def commit(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        rows = []
        for partition, offset in offsets.items():
            tid, part = await self._where(topic, partition)
            rows.append((group, tid, part, offset))

        if rows:
            await self._write(lambda c: c.executemany(_COMMIT, rows))

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        _, readers = self._parts()
        tid, _count = await self._topic(topic)
        rows = await readers.run(lambda c: c.execute(_COMMITTED, (group, tid)).fetchall())
        return {int(p): int(o) for p, o in rows}

    def lock_path(self, group: str) -> str:
        """The file every member of the group holds shared (engine/log/sqlite_groups.py)."""
        return self._groups.lock_path(group)

    async def group_alive(self, group: str) -> bool | None:
        return self._groups.held(group)

    def split_groups(self, member: int, members: int) -> None:
        super().split_groups(member, members)
        self._groups.member = (member, members)

    async def join_group(
        self,
        group: str,
        topic: str,
        on_assign: AssignCallback,
        on_revoke: RevokeCallback,
        *,
        instance_id: str | None = None,
    ) -> Membership:
        tid, count = await self._topic(topic)

        async def next_generation() -> int:
            return int(await self._write(lambda c: c.execute(_NEXT_GENERATION, (group, tid)).fetchone()[0]))

        return await self._groups.join(group, topic, count, next_generation, on_assign, on_revoke)
