"""The query projection's storage: runs and domain events in SQLite, for lists.

The log is the truth; this database is a read model of it, so it may be
dropped and rebuilt at any time (`stepline.projections.query.rebuild`).
Every write is one transaction holding the rows a batch of records produced
AND the offset after that batch (the tracking record), so the projection is
exactly-once with respect to the log without any consumer-group commit:

1. the projector reads a batch at offset `o` and folds it;
2. `apply_batch` checks that the stored offset is still `o` (no other
   projector on the same file moved it on), upserts the changed runs and
   events, and sets the offset to the batch's end, all in one transaction;
3. a crash anywhere before the commit leaves the old offset, and the batch
   is read again.

SQLite runs in threads (one writer, two readers; WAL) so the event loop
never blocks. `synchronous=NORMAL` is enough: a power cut may lose the last
transactions, but it loses their offsets with them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from stepline.core.events import PAUSE_QUEUE, PAUSE_TASK, Event, PauseChanged
from stepline.projections.query_feed import FeedSubscription, RunFeed, SubscriptionClosed
from stepline.projections.query_sql import (
    DEFAULT_QUERY_DB,
    INDEXES,
    LIVE_COUNTED,
    MAX_LIMIT,
    SCHEMA_VERSION,
    SUMMARY_SQL,
    TABLES,
    TEXT_CLEAR,
    TEXT_INDEX,
    TEXT_REINDEX,
    TEXT_TRIGGERS,
    UPSERT_RUN,
    InvalidCursor,
    Page,
    QueryProjectionError,
    RunFilter,
    StaleOffsets,
    decode_cursor,
    drop_all,
    encode_cursor,
    event_values,
    list_events,
    list_pauses,
    list_runs,
    paused_scopes,
    run_values,
    summary,
    tag_rows,
    text_index_supported,
)
from stepline.projections.runs import RunState
from stepline.projections.snapshot import run_from_json


class QueryStore:
    """The SQLite read model; an async context manager.

    `bulk=True` (rebuild only): no fsync at all and the secondary indexes
    are built once at `finish_bulk()`, which is much faster than keeping
    them up to date row by row.
    """

    def __init__(self, path: str | Path, *, bulk: bool = False) -> None:
        if str(path) in ("", ":memory:"):
            raise QueryProjectionError("the query projection needs a database file, not :memory:")
        self.path = Path(path)
        self.bulk = bulk
        self.feed = RunFeed()
        self.db_id = ""
        self.text_index = False  # FTS5 trigram available (see query_sql.TEXT_INDEX)
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- threads -------------------------------------------------------------

    async def _write(self, fn: Any, *args: Any) -> Any:
        assert self._writer is not None, "query store not open"
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def _read(self, fn: Any, *args: Any) -> Any:
        assert self._readers is not None, "query store not open"
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._with_reader, fn, args)

    def _with_reader(self, fn: Any, args: tuple[Any, ...]) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only = 1")
            self._local.conn = conn
            with self._lock:
                self._read_conns.append(conn)
        return fn(conn, *args)

    # --- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="stepline-query-write")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="stepline-query-read")
        self.db_id = await self._write(self._open)

    def _open(self) -> str:
        conn = self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                            check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'OFF' if self.bulk else 'NORMAL'}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._meta(conn, "schema_version")
            if version is not None and version != str(SCHEMA_VERSION):
                drop_all(conn)
                version = None
            for sql in TABLES:
                conn.execute(sql)
            self.text_index = text_index_supported(conn)
            if not self.bulk:
                for sql in INDEXES:
                    conn.execute(sql)
                if self.text_index:
                    self._add_text_index(conn)
            if version is None:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db_id = self._meta(conn, "db_id")
            if db_id is None:
                db_id = uuid.uuid4().hex[:16]
                conn.execute("INSERT INTO meta VALUES ('db_id', ?)", (db_id,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return db_id

    @staticmethod
    def _add_text_index(conn: sqlite3.Connection) -> None:
        new = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'run_text'").fetchone() is None
        conn.execute(TEXT_INDEX)
        if new:  # a file written where FTS5 was missing: index what it holds
            conn.execute(TEXT_REINDEX)
        for sql in TEXT_TRIGGERS:
            conn.execute(sql)

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> str | None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # no meta table: a new file
            return None
        return None if row is None else str(row[0])

    async def finish_bulk(self) -> None:
        """Build the indexes a bulk load left out.

        No ANALYZE: statistics of a moment (every run completed, say) would
        steer the planner off the status index for the live runs later.
        """
        def build(conn: sqlite3.Connection) -> None:
            for sql in INDEXES:
                conn.execute(sql)
            if self.text_index:  # one pass over the table, not a trigger per row
                self._add_text_index(conn)
        await self._write(lambda: build(self._conn_or_fail()))

    async def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        with self._lock:
            for c in self._read_conns:
                c.close()
            self._read_conns.clear()
        self._local = threading.local()
        if self._writer is not None:
            def close_writer() -> None:
                if self._conn is not None:
                    if self.bulk:  # leave one self-contained file behind
                        self._conn.execute("PRAGMA journal_mode = DELETE")
                    self._conn.close()
                    self._conn = None
            await self._write(close_writer)
            self._writer.shutdown(wait=True)
            self._writer = None

    def _conn_or_fail(self) -> sqlite3.Connection:
        if self._conn is None:
            raise QueryProjectionError(f"query store {self.path} is not open")
        return self._conn

    # --- writing ---------------------------------------------------------------

    async def reset(self) -> None:
        """Forget everything: the projection starts again from offset 0."""
        def reset() -> None:
            conn = self._conn_or_fail()
            conn.execute("BEGIN IMMEDIATE")
            for table in ("runs", "run_tags", "domain_events", "offsets", "pauses"):
                conn.execute(f"DELETE FROM {table}")
            if self.text_index:
                conn.execute(TEXT_CLEAR)
            conn.execute("COMMIT")
        await self._write(reset)

    async def apply_batch(
        self, topic: str, partition: int, from_offset: int, next_offset: int, *,
        runs: Iterable[RunState] = (), events: Iterable[tuple[int, Event]] = (), epoch: int = 0,
        pauses: Sequence[Event] = (),
    ) -> None:
        """Upsert changed runs and new events, and move the partition's offset
        from `from_offset` to `next_offset`: one transaction. `pauses` are the
        batch's PauseChanged events, in log order (runs topic only).

        Raises StaleOffsets, writing nothing, when the stored offset is not
        `from_offset`. Then tells the feed's listeners which runs changed.
        """
        run_rows = [run_values(s) for s in runs]
        event_rows = [v for off, ev in events if (v := event_values(off, partition, ev)) is not None]
        pause_rows = [(ev.time, ev.body) for ev in pauses if isinstance(ev.body, PauseChanged)]
        await self._write(self._apply, topic, partition, from_offset, next_offset, epoch, run_rows, event_rows,
                          pause_rows)
        if run_rows and self.feed.listening:
            self.feed.publish([summary(v) for v in run_rows])

    def _apply(
        self, topic: str, partition: int, from_offset: int, next_offset: int, epoch: int,
        run_rows: list[tuple[Any, ...]], event_rows: list[tuple[Any, ...]],
        pause_rows: Sequence[tuple[int, PauseChanged]] = (),
    ) -> None:
        conn = self._conn_or_fail()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT next_offset FROM offsets WHERE topic = ? AND partition = ?",
                               (topic, partition)).fetchone()
            stored = 0 if row is None else int(row[0])
            if stored != from_offset:
                raise StaleOffsets(f"{topic}[{partition}] is at offset {stored} in {self.path}, "
                                   f"not {from_offset}: another projector moved it on")
            conn.execute(
                "INSERT INTO offsets VALUES (?, ?, ?, ?) ON CONFLICT (topic, partition)"
                " DO UPDATE SET next_offset = excluded.next_offset, epoch = excluded.epoch",
                (topic, partition, next_offset, epoch),
            )
            if run_rows:
                conn.executemany(UPSERT_RUN, run_rows)
                tags = tag_rows(run_rows)
                if tags:
                    conn.executemany("INSERT OR IGNORE INTO run_tags VALUES (?, ?, ?)", tags)
            if event_rows:
                conn.executemany("INSERT OR IGNORE INTO domain_events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 event_rows)
            for time, pause in pause_rows:
                if pause.paused:  # a repeated pause keeps the time of the first
                    conn.execute("INSERT OR IGNORE INTO pauses VALUES (?, ?, ?, ?, ?, ?)",
                                 (pause.scope, pause.name, partition, time, pause.reason, pause.requested_by))
                else:
                    conn.execute("DELETE FROM pauses WHERE scope = ? AND name = ? AND partition = ?",
                                 (pause.scope, pause.name, partition))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def delete_runs(self, run_ids: Iterable[str]) -> int:
        """Remove runs from the read model (`stepline prune`); returns how many
        it held. Offsets stay: the log keeps its offsets when runs leave it."""
        ids = sorted(set(run_ids))

        def delete() -> int:
            conn = self._conn_or_fail()
            conn.execute("BEGIN IMMEDIATE")
            try:
                gone = 0
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    marks = ", ".join("?" * len(chunk))
                    if self.text_index:  # an external-content index: told what leaves
                        conn.execute("INSERT INTO run_text (run_text, rowid, search_text) SELECT 'delete', rowid,"
                                     f" search_text FROM runs WHERE run_id IN ({marks})", chunk)
                    conn.execute(f"DELETE FROM run_tags WHERE run_id IN ({marks})", chunk)
                    gone += conn.execute(f"DELETE FROM runs WHERE run_id IN ({marks})", chunk).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return gone

        found: int = await self._write(delete)
        return found

    async def set_meta(self, key: str, value: str) -> None:
        def put() -> None:
            self._conn_or_fail().execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        await self._write(put)

    # --- reading ---------------------------------------------------------------

    async def meta(self, key: str) -> str | None:
        value: str | None = await self._read(self._meta, key)
        return value


    async def offsets(self, topic: str) -> dict[int, tuple[int, int]]:
        """partition -> (next offset, epoch) as stored."""
        def q(conn: sqlite3.Connection) -> dict[int, tuple[int, int]]:
            rows = conn.execute("SELECT partition, next_offset, epoch FROM offsets WHERE topic = ?", (topic,))
            return {int(p): (int(o), int(e)) for p, o, e in rows}
        result: dict[int, tuple[int, int]] = await self._read(q)
        return result

    async def load_runs(self, run_ids: Sequence[str]) -> dict[str, RunState]:
        """The stored states of these runs (those the store has)."""
        def q(conn: sqlite3.Connection) -> dict[str, RunState]:
            out: dict[str, RunState] = {}
            for i in range(0, len(run_ids), 500):
                chunk = run_ids[i : i + 500]
                sql = f"SELECT state_json FROM runs WHERE run_id IN ({', '.join('?' * len(chunk))})"
                for (doc,) in conn.execute(sql, chunk):
                    state = run_from_json(json.loads(doc))
                    out[state.run_id] = state
            return out
        result: dict[str, RunState] = await self._read(q)
        return result

    async def list_runs(self, where: RunFilter, limit: int = 50, cursor: str | None = None) -> Page:
        """Runs matching `where`, newest first, `limit` per page from `cursor` on."""
        after = decode_cursor(cursor) if cursor else None
        page: Page = await self._read(list_runs, where, max(1, min(limit, MAX_LIMIT)), after, self.text_index)
        return page

    async def list_events(self, name: str | None = None, limit: int = 50, cursor: str | None = None) -> Page:
        """Domain events, newest first, each with the summaries of the runs it started."""
        after = decode_cursor(cursor) if cursor else None
        page: Page = await self._read(list_events, name, max(1, min(limit, MAX_LIMIT)), after)
        return page

    async def queue_counts(self) -> dict[str | None, dict[str, int]]:
        """queue -> {status: runs} for the live statuses (LIVE_COUNTED)."""
        def q(conn: sqlite3.Connection) -> dict[str | None, dict[str, int]]:
            marks = ", ".join("?" * len(LIVE_COUNTED))
            out: dict[str | None, dict[str, int]] = {}
            for queue, status, n in conn.execute(
                f"SELECT queue, status, count(*) FROM runs WHERE status IN ({marks}) GROUP BY queue, status",
                LIVE_COUNTED,
            ):
                out.setdefault(queue, dict.fromkeys(LIVE_COUNTED, 0))[status] = int(n)
            return out
        result: dict[str | None, dict[str, int]] = await self._read(q)
        return result

    async def work_counts(self, now_ms: int) -> list[tuple[str, str | None, str, int]]:
        """(task_id, queue, kind, runs) of the live runs, for the backlog metrics.

        kind: "ready" (may start or resume now: pending or retrying and due,
        or suspended with its deadline passed), "running", "delayed" (due
        later), "waiting" (suspended with no deadline), or "paused" (ready,
        but its task or queue is paused). One scan of the live runs.
        """
        def q(conn: sqlite3.Connection) -> list[tuple[str, str | None, str, int]]:
            paused = paused_scopes(conn)
            out: dict[tuple[str, str | None, str], int] = {}
            for task_id, queue, status, due_at, n in conn.execute(
                "SELECT task_id, queue, status, due_at, count(*) FROM ("
                " SELECT task_id, queue, status, CASE"
                "  WHEN status = 'running' THEN NULL"
                "  WHEN due_at IS NULL THEN NULL"
                "  WHEN due_at <= ? THEN 0 ELSE 1 END AS due_at FROM ("
                "   SELECT task_id, queue, status, CASE status"
                "    WHEN 'pending' THEN json_extract(state_json, '$.not_before')"
                "    WHEN 'retrying' THEN json_extract(state_json, '$.retry_at')"
                "    WHEN 'suspended' THEN json_extract(state_json, '$.wake_at') END AS due_at"
                "   FROM runs WHERE status IN ('pending', 'running', 'retrying', 'suspended')))"
                " GROUP BY task_id, queue, status, due_at",
                (now_ms,),
            ):
                if status == "running":
                    kind = "running"
                elif due_at == 1:
                    kind = "delayed"
                elif status == "suspended" and due_at is None:
                    kind = "waiting"
                elif (PAUSE_TASK, task_id) in paused or (queue is not None and (PAUSE_QUEUE, queue) in paused):
                    kind = "paused"
                else:
                    kind = "ready"
                key = (task_id, queue, kind)
                out[key] = out.get(key, 0) + int(n)
            return [(t, queue, kind, n) for (t, queue, kind), n in sorted(out.items(), key=str)]
        result: list[tuple[str, str | None, str, int]] = await self._read(q)
        return result

    async def pauses(self) -> list[dict[str, Any]]:
        """Paused tasks and queues: scope, name, since (ms), reason, requested_by, partitions."""
        result: list[dict[str, Any]] = await self._read(list_pauses)
        return result

    async def last_run(self, task_id: str, key_prefix: str) -> dict[str, Any] | None:
        """The newest run of a task whose idempotency key starts with `key_prefix`."""
        def q(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                f"SELECT {SUMMARY_SQL} FROM runs r WHERE r.task_id = ? AND substr(r.idempotency_key, 1, ?) = ?"
                " ORDER BY r.created_at DESC, r.run_id DESC LIMIT 1",
                (task_id, len(key_prefix), key_prefix),
            ).fetchone()
            return None if row is None else summary(row)
        result: dict[str, Any] | None = await self._read(q)
        return result

    async def table(self, name: str) -> list[tuple[Any, ...]]:
        """Every row of a table, sorted: for comparing two projections."""
        if name not in ("runs", "run_tags", "domain_events", "offsets", "pauses"):
            raise ValueError(f"no table {name!r}")
        rows: list[tuple[Any, ...]] = await self._read(
            lambda conn: sorted(conn.execute(f"SELECT * FROM {name}").fetchall()))
        return rows



__all__ = [
    "DEFAULT_QUERY_DB",
    "FeedSubscription",
    "InvalidCursor",
    "Page",
    "QueryProjectionError",
    "QueryStore",
    "RunFeed",
    "RunFilter",
    "StaleOffsets",
    "SubscriptionClosed",
    "encode_cursor",
]
