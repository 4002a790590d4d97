"""The query projection's tables, rows and queries: SQLite, no I/O of its own.

`QueryStore` (query_store.py) runs these functions in its threads. Every
run list is newest first by (created_at, run_id) and paged by keyset: a
cursor is the last row's (created_at, run_id), so a deep page costs what
the first one does.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stepline.core.events import JSON, DomainEvent, Event, Payload
from stepline.core.ids import fanout_key
from stepline.errors import SteplineError
from stepline.projections.runs import RunState
from stepline.projections.snapshot import run_to_json

DEFAULT_QUERY_DB = ".stepline/query.db"

# Bump when the tables change: an older file is dropped and rebuilt from the
# log (it is derived data), never migrated. 2: `attempt` is the run's count
# over its life, as on its events (it restarted at 1 on a retrigger).
SCHEMA_VERSION = 2

MAX_LIMIT = 500


class QueryProjectionError(SteplineError):
    """The query projection could not be read or written."""


class StaleOffsets(QueryProjectionError):
    """Another projector on the same database moved a partition on first.

    Nothing of the batch was written; reload the partition from the store.
    """


class InvalidCursor(QueryProjectionError, ValueError):
    """A pagination cursor that this store did not hand out."""


TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        status TEXT NOT NULL,
        dead_lettered INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        tags TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        started_at INTEGER,
        ended_at INTEGER,
        attempt INTEGER NOT NULL,
        queue TEXT,
        concurrency_key TEXT,
        parent_run_id TEXT,
        idempotency_key TEXT,
        error_type TEXT,
        error_message TEXT,
        search_text TEXT NOT NULL,
        state_json TEXT NOT NULL
    )""",
    # Tags never change after the trigger, nor does created_at: one row per
    # (tag, run), ordered the way the list pages through it.
    """CREATE TABLE IF NOT EXISTS run_tags (
        tag TEXT NOT NULL, created_at INTEGER NOT NULL, run_id TEXT NOT NULL,
        PRIMARY KEY (tag, created_at, run_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS domain_events (
        event_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        "key" TEXT,
        source TEXT NOT NULL,
        time INTEGER NOT NULL,
        data TEXT,
        partition INTEGER NOT NULL,
        "offset" INTEGER NOT NULL
    )""",
    # Paused tasks and queues (PauseChanged), per runs partition: every
    # partition carries its own copy of a pause, folded in its own order.
    """CREATE TABLE IF NOT EXISTS pauses (
        scope TEXT NOT NULL, name TEXT NOT NULL, partition INTEGER NOT NULL,
        since INTEGER NOT NULL, reason TEXT NOT NULL, requested_by TEXT NOT NULL,
        PRIMARY KEY (scope, name, partition)
    ) WITHOUT ROWID""",
    # The tracking records; `epoch` is the runs partition's fencing epoch,
    # kept so that a resumed fold still drops a zombie owner's events.
    """CREATE TABLE IF NOT EXISTS offsets (
        topic TEXT NOT NULL, partition INTEGER NOT NULL,
        next_offset INTEGER NOT NULL, epoch INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (topic, partition)
    ) WITHOUT ROWID""",
)

# Every list is newest first by (created_at, run_id), paged by keyset; each
# index ends in those two columns so a filtered page is a range scan too.
INDEXES = (
    "CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at, run_id)",
    "CREATE INDEX IF NOT EXISTS runs_by_task ON runs (task_id, created_at, run_id)",
    "CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, created_at, run_id)",
    "CREATE INDEX IF NOT EXISTS runs_by_parent ON runs (parent_run_id, created_at, run_id)"
    " WHERE parent_run_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS runs_dead_letters ON runs (created_at, run_id) WHERE dead_lettered = 1",
    "CREATE INDEX IF NOT EXISTS runs_by_key ON runs (idempotency_key) WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS events_by_time ON domain_events (time, event_id)",
    "CREATE INDEX IF NOT EXISTS events_by_name ON domain_events (name, time, event_id)",
)

# The columns of a run summary, in order; a run row starts with them.
SUMMARY_COLUMNS = (
    "run_id", "task_id", "status", "dead_lettered", "priority", "tags", "created_at", "updated_at",
    "started_at", "ended_at", "attempt", "queue", "concurrency_key", "parent_run_id",
    "idempotency_key", "error_type", "error_message",
)
_RUN_COLUMNS = (*SUMMARY_COLUMNS, "search_text", "state_json")
TAGS_COL, CREATED_COL = _RUN_COLUMNS.index("tags"), _RUN_COLUMNS.index("created_at")
UPSERT_RUN = (
    f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({', '.join('?' * len(_RUN_COLUMNS))})"
    " ON CONFLICT (run_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _RUN_COLUMNS[1:])
)
SUMMARY_SQL = ", ".join(f"r.{c}" for c in SUMMARY_COLUMNS)
_EVENT_COLUMNS = ("event_id", "name", "key", "source", "time", "data", "partition", "offset")
_EVENT_SQL = ", ".join(f'e."{c}"' for c in _EVENT_COLUMNS)

LIVE_COUNTED = ("pending", "running", "retrying", "suspended")

# Text search: an FTS5 trigram index over search_text (substring matches,
# SQLite >= 3.34 with FTS5), kept up to date by triggers. It serves rare
# terms; a term matching many runs is faster to find by scanning newest
# first with LIKE, which stops at the page's last match. Without FTS5 (or
# for a term under 3 characters, which has no trigram) every search scans.
TEXT_INDEX = ("CREATE VIRTUAL TABLE IF NOT EXISTS run_text USING fts5("
              "search_text, content='runs', content_rowid='rowid', tokenize='trigram')")
TEXT_TRIGGERS = (
    """CREATE TRIGGER IF NOT EXISTS runs_text_added AFTER INSERT ON runs BEGIN
        INSERT INTO run_text (rowid, search_text) VALUES (new.rowid, new.search_text);
    END""",
    """CREATE TRIGGER IF NOT EXISTS runs_text_changed AFTER UPDATE OF search_text ON runs
    WHEN old.search_text IS NOT new.search_text BEGIN
        INSERT INTO run_text (run_text, rowid, search_text) VALUES ('delete', old.rowid, old.search_text);
        INSERT INTO run_text (rowid, search_text) VALUES (new.rowid, new.search_text);
    END""",
)
TEXT_REINDEX = "INSERT INTO run_text (run_text) VALUES ('rebuild')"
TEXT_CLEAR = "INSERT INTO run_text (run_text) VALUES ('delete-all')"
# Fewer matches than this: fetch them through the index and sort; more: scan.
RARE_TEXT = 2000


def text_index_supported(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("CREATE VIRTUAL TABLE temp.trigram_probe USING fts5(x, tokenize='trigram')")
    except sqlite3.OperationalError:
        return False
    conn.execute("DROP TABLE temp.trigram_probe")
    return True


# One encoder for every row: json.dumps with options builds a new one per call.
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _payload_text(p: Payload | None) -> str:
    if p is None or p.content_type != JSON:
        return ""
    return p.data.decode("utf-8", "replace")


def run_values(s: RunState) -> tuple[Any, ...]:
    """A run's row, in `_RUN_COLUMNS` order."""
    err = s.error
    return (
        s.run_id, s.task_id, s.status, int(s.dead_lettered), s.priority, _dumps(s.tags),
        s.created_at, s.updated_at, s.started_at, s.ended_at, s.attempt, s.queue,
        s.concurrency_key, s.parent_run_id, s.idempotency_key,
        None if err is None else err.type, None if err is None else err.message,
        f"{_payload_text(s.payload)}\n{_payload_text(s.output)}",
        _dumps(run_to_json(s)),
    )


def tag_rows(run_rows: list[tuple[Any, ...]]) -> list[tuple[str, int, str]]:
    """The run_tags rows of these run rows."""
    return [(tag, r[CREATED_COL], r[0]) for r in run_rows for tag in json.loads(r[TAGS_COL])]


def summary(values: Sequence[Any]) -> dict[str, Any]:
    """The API's run summary from a row that starts with SUMMARY_COLUMNS."""
    d = dict(zip(SUMMARY_COLUMNS, values))
    d["dead_lettered"] = bool(d["dead_lettered"])
    d["tags"] = json.loads(d["tags"])
    return d


def event_values(offset: int, partition: int, ev: Event) -> tuple[Any, ...] | None:
    body = ev.body
    if not isinstance(body, DomainEvent):
        return None
    data = body.data.data.decode("utf-8", "replace") if body.data.content_type == JSON else None
    return (ev.event_id, body.name, body.key, body.source, ev.time, data, partition, offset)


def _event_dict(values: Sequence[Any]) -> dict[str, Any]:
    d = dict(zip(_EVENT_COLUMNS, values))
    d["data"] = None if d["data"] is None else json.loads(d["data"])
    return d


def encode_cursor(time: int, ident: str) -> str:
    return base64.urlsafe_b64encode(f"{time}:{ident}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        time, sep, ident = raw.partition(":")
        if not sep or not ident:
            raise ValueError(raw)
        return int(time), ident
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
        raise InvalidCursor(f"cursor {cursor!r} is not one this API handed out") from None


@dataclass(frozen=True)
class RunFilter:
    """What `GET /v1/runs` narrows by; every given field must match."""

    task: str | None = None
    statuses: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    created_from: int | None = None  # ms, inclusive
    created_to: int | None = None  # ms, exclusive
    text: str | None = None  # substring of the payload or output JSON
    dead_letter: bool | None = None
    parent: str | None = None
    error_type: str | None = None  # the last error's type, e.g. TimeoutError

    @property
    def empty(self) -> bool:
        return self == RunFilter()


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None
    total_estimate: int | None = None


def drop_all(conn: sqlite3.Connection) -> None:
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        if not name.startswith("sqlite_"):
            conn.execute(f'DROP TABLE IF EXISTS "{name}"')


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _text_filter(conn: sqlite3.Connection, text: str, text_index: bool) -> tuple[str, str]:
    """The WHERE term and parameter that find `text` in search_text."""
    if text_index and len(text) >= 3:
        phrase = '"' + text.replace('"', '""') + '"'
        matches = conn.execute("SELECT count(*) FROM (SELECT rowid FROM run_text WHERE run_text MATCH ? LIMIT ?)",
                               (phrase, RARE_TEXT)).fetchone()[0]
        if matches < RARE_TEXT:
            return "r.rowid IN (SELECT rowid FROM run_text WHERE run_text MATCH ?)", phrase
    return "r.search_text LIKE ? ESCAPE '\\'", _like(text)


def list_runs(
    conn: sqlite3.Connection, f: RunFilter, limit: int, after: tuple[int, str] | None, text_index: bool = False,
) -> Page:
    where: list[str] = []
    params: list[Any] = []
    if f.tags:
        # Page through the tag's own index; further tags are point look-ups.
        source, order = "run_tags t JOIN runs r ON r.run_id = t.run_id", ("t.created_at", "t.run_id")
        where.append("t.tag = ?")
        params.append(f.tags[0])
        for tag in f.tags[1:]:
            where.append("EXISTS (SELECT 1 FROM run_tags x WHERE x.tag = ? AND x.created_at = r.created_at"
                         " AND x.run_id = r.run_id)")
            params.append(tag)
    else:
        source, order = "runs r", ("r.created_at", "r.run_id")
    if f.task is not None:
        where.append("r.task_id = ?")
        params.append(f.task)
    if f.statuses:
        where.append(f"r.status IN ({', '.join('?' * len(f.statuses))})")
        params.extend(f.statuses)
    if f.dead_letter is not None:
        # Literal, not a parameter: it is what lets SQLite use the partial index.
        where.append("r.dead_lettered = 1" if f.dead_letter else "r.dead_lettered = 0")
    if f.parent is not None:
        where.append("r.parent_run_id = ?")
        params.append(f.parent)
    if f.error_type is not None:
        where.append("r.error_type = ?")
        params.append(f.error_type)
    if f.created_from is not None:
        where.append(f"{order[0]} >= ?")
        params.append(f.created_from)
    if f.created_to is not None:
        where.append(f"{order[0]} < ?")
        params.append(f.created_to)
    if f.text:
        term, param = _text_filter(conn, f.text, text_index)
        where.append(term)
        params.append(param)
    if after is not None:
        where.append(f"({order[0]}, {order[1]}) < (?, ?)")
        params.extend(after)
    sql = (f"SELECT {SUMMARY_SQL} FROM {source}" + (f" WHERE {' AND '.join(where)}" if where else "")
           + f" ORDER BY {order[0]} DESC, {order[1]} DESC LIMIT ?")
    rows = conn.execute(sql, [*params, limit + 1]).fetchall()
    items = [summary(r) for r in rows[:limit]]
    mark_paused(conn, items)
    more = len(rows) > limit
    next_cursor = encode_cursor(items[-1]["created_at"], items[-1]["run_id"]) if more else None
    estimate = None
    if f.empty and after is None:
        # Runs are never deleted and upserts keep their rowid: max(rowid) is
        # the count, read from the end of the table's b-tree.
        estimate = int(conn.execute("SELECT coalesce(max(rowid), 0) FROM runs").fetchone()[0])
    return Page(items, next_cursor, estimate)


# Statuses a pause holds back: waiting to start an attempt.
HELD_STATUSES = frozenset({"pending", "retrying"})


def paused_scopes(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(scope, name) of every task and queue paused in at least one partition."""
    return {(s, n) for s, n in conn.execute("SELECT DISTINCT scope, name FROM pauses")}


def mark_paused(conn: sqlite3.Connection, items: list[dict[str, Any]]) -> None:
    """Set `paused` on run summaries waiting behind a paused task or queue."""
    paused = paused_scopes(conn) if items else set()
    for item in items:
        item["paused"] = bool(paused) and item["status"] in HELD_STATUSES and (
            ("task", item["task_id"]) in paused or ("queue", item["queue"]) in paused)


def list_pauses(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """One entry per paused task or queue: since its first partition saw it."""
    rows = conn.execute("SELECT scope, name, min(since), max(reason), max(requested_by), count(*) FROM pauses"
                        " GROUP BY scope, name ORDER BY scope, name").fetchall()
    return [{"scope": s, "name": n, "since": since, "reason": reason, "requested_by": by, "partitions": parts}
            for s, n, since, reason, by, parts in rows]


def list_events(conn: sqlite3.Connection, name: str | None, limit: int, after: tuple[int, str] | None) -> Page:
    where: list[str] = []
    params: list[Any] = []
    if name is not None:
        where.append("e.name = ?")
        params.append(name)
    if after is not None:
        where.append("(e.time, e.event_id) < (?, ?)")
        params.extend(after)
    sql = (f"SELECT {_EVENT_SQL} FROM domain_events e" + (f" WHERE {' AND '.join(where)}" if where else "")
           + " ORDER BY e.time DESC, e.event_id DESC LIMIT ?")
    rows = conn.execute(sql, [*params, limit + 1]).fetchall()
    items = [_event_dict(r) for r in rows[:limit]]
    by_key: dict[str, dict[str, Any]] = {}
    for item in items:
        item["runs"] = []
        by_key[fanout_key(item["event_id"])] = item
    if by_key:
        keys = list(by_key)
        sql = (f"SELECT {SUMMARY_SQL} FROM runs r WHERE r.idempotency_key IN ({', '.join('?' * len(keys))})"
               " ORDER BY r.task_id")
        for r in conn.execute(sql, keys):
            s = summary(r)
            by_key[s["idempotency_key"]]["runs"].append(s)
    more = len(rows) > limit
    next_cursor = encode_cursor(items[-1]["time"], items[-1]["event_id"]) if more else None
    return Page(items, next_cursor)


__all__ = [
    "DEFAULT_QUERY_DB",
    "InvalidCursor",
    "LIVE_COUNTED",
    "MAX_LIMIT",
    "Page",
    "QueryProjectionError",
    "RunFilter",
    "SCHEMA_VERSION",
    "SUMMARY_COLUMNS",
    "StaleOffsets",
    "decode_cursor",
    "drop_all",
    "encode_cursor",
    "event_values",
    "list_events",
    "list_pauses",
    "list_runs",
    "mark_paused",
    "run_values",
    "summary",
    "tag_rows",
]
