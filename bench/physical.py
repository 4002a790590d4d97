"""The floor under the engine, measured on the same disk in the same run:
a raw write+fsync loop, SQLite WAL single-row commits, and the event codec."""

from __future__ import annotations

import os
import sqlite3
import statistics
import time
import timeit
from typing import Any

from stepline.core import codec
from stepline.core.events import JSON, Event, Payload, StepCompleted
from stepline.core.ids import new_event_id, new_run_id

VALUE_200 = os.urandom(100).hex().encode()  # 200 bytes, about one event


def _summary_us(samples: list[float]) -> dict[str, float]:
    us = sorted(x * 1e6 for x in samples)
    return {
        "mean_us": statistics.fmean(us),
        "p50_us": us[len(us) // 2],
        "p99_us": us[min(len(us) - 1, int(len(us) * 0.99))],
        "min_us": us[0],
    }


def fsync_loop(directory: str, count: int) -> dict[str, Any]:
    path = os.path.join(directory, "fsync.probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    samples = []
    try:
        for _ in range(10):
            os.write(fd, VALUE_200)
            os.fsync(fd)
        for _ in range(count):
            t0 = time.perf_counter()
            os.write(fd, VALUE_200)
            os.fsync(fd)
            samples.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    m = _summary_us(samples)
    m.update(ops=count, ops_per_s=1e6 / m["mean_us"], st_dev=os.stat(directory).st_dev)
    return {"ok": True, "errors": [], "metrics": m}


def sqlite_commits(directory: str, synchronous: str, count: int) -> dict[str, Any]:
    """Single-row INSERT + COMMIT in WAL mode: one commit (and with FULL, one
    fsync of the WAL) per row; what a log append costs without any engine."""
    path = os.path.join(directory, f"commit-{synchronous}.db")
    conn = sqlite3.connect(path, isolation_level=None)
    errors: list[str] = []
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute("CREATE TABLE r (o INTEGER PRIMARY KEY, k BLOB, v BLOB, ts INTEGER) WITHOUT ROWID")
        samples = []
        for i in range(count + 10):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO r VALUES (?, ?, ?, ?)", (i, b"run_x", VALUE_200, i))
            conn.execute("COMMIT")
            if i >= 10:
                samples.append(time.perf_counter() - t0)
        rows = conn.execute("SELECT COUNT(*) FROM r").fetchone()[0]
        if rows != count + 10:
            errors.append(f"{rows} rows, want {count + 10}")
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(path + suffix)
            except FileNotFoundError:
                pass
    m = _summary_us(samples)
    m.update(commits=count, commits_per_s=1e6 / m["mean_us"])
    return {"ok": not errors, "errors": errors, "metrics": m}


def sample_step_completed() -> Event:
    body = StepCompleted(1, "step_b", 1, Payload(JSON, b"42"))
    return Event(new_event_id(), body.TYPE, new_run_id(), "noop3", 5, int(time.time() * 1000), 1, body)


def codec_micro(number: int) -> dict[str, Any]:
    ev = sample_step_completed()
    data = codec.encode(ev)
    errors = []
    if codec.decode(data) != ev:
        errors.append("decode(encode(StepCompleted)) != the event")
    enc = min(timeit.repeat(lambda: codec.encode(ev), number=number, repeat=5)) / number
    dec = min(timeit.repeat(lambda: codec.decode(data), number=number, repeat=5)) / number
    return {
        "ok": not errors,
        "errors": errors,
        "metrics": {"encode_us": enc * 1e6, "decode_us": dec * 1e6, "bytes": len(data),
                    "timing": f"best of 5 x {number}"},
    }
