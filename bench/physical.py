"""The floor under the engine, measured on the same disk in the same run:
a raw write+fsync loop, SQLite WAL single-row commits, the event codec,
the group-commit probe (the CPU a 3-step run's records cost to encode and
commit durably, with no engine) and the interpreter's start."""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import sys
import time
import timeit
from typing import Any

from stepline.core import codec
from stepline.core.events import (
    JSON,
    Event,
    Payload,
    RunCompleted,
    RunStarted,
    RunTriggered,
    StepCompleted,
    StepStarted,
)
from stepline.core.ids import new_event_id, new_run_id

VALUE_200 = os.urandom(100).hex().encode()  # 200 bytes, about one event


def _remove_db(path: str) -> None:
    """A probe's SQLite file and its WAL and index, gone."""
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


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
        _remove_db(path)
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


def run_events() -> list[Event]:
    """The records of one durable 3-step no-op run, as the engine appends them."""
    rid, now = new_run_id(), int(time.time() * 1000)
    bodies = [RunTriggered(Payload(JSON, b"7"), None, None, 0, (), "task/noop3", None, None),
              RunStarted(1, "bench-worker")]
    for i, name in enumerate(("step_a", "step_b", "step_c")):
        bodies += [StepStarted(i, name, 1, Payload(JSON, b"[7]")),
                   StepCompleted(i, name, 1, Payload(JSON, b"8"))]
    bodies.append(RunCompleted(Payload(JSON, b"10"), 1))
    return [Event(new_event_id(), b.TYPE, rid, "noop3", s + 1, now, 0 if s == 0 else 1, b)
            for s, b in enumerate(bodies)]


def group_commit_probe(directory: str, runs: int, events_per_commit: int = 140) -> dict[str, Any]:
    """The physical limit of (a)'s CPU per run: build and encode each run's
    records and commit them to a SQLite WAL file with synchronous=FULL, in
    group commits of `events_per_commit` records (what the sqlite log's
    writer carries per commit at 256 in flight). No event loop, no fold, no
    reads: process CPU per run of what any durable engine must do."""
    path = os.path.join(directory, "group-commit.db")
    conn = sqlite3.connect(path, isolation_level=None)
    errors: list[str] = []
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE r (o INTEGER PRIMARY KEY, k BLOB, v BLOB, ts INTEGER) WITHOUT ROWID")
        c0, t0 = time.process_time(), time.perf_counter()
        offset, pending = 0, []
        for _ in range(runs):
            for ev in run_events():
                pending.append((offset, ev.run_id.encode(), codec.encode(ev), ev.time))
                offset += 1
                if len(pending) >= events_per_commit:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany("INSERT INTO r VALUES (?, ?, ?, ?)", pending)
                    conn.execute("COMMIT")
                    pending = []
        if pending:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO r VALUES (?, ?, ?, ?)", pending)
            conn.execute("COMMIT")
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        rows = conn.execute("SELECT COUNT(*) FROM r").fetchone()[0]
        if rows != offset:
            errors.append(f"{rows} rows, want {offset}")
    finally:
        conn.close()
        _remove_db(path)
    return {"ok": not errors, "errors": errors, "metrics": {
        "runs": runs, "events_per_run": len(run_events()), "events_per_commit": events_per_commit,
        "cpu_us_per_run": cpu / runs * 1e6, "wall_us_per_run": wall / runs * 1e6}}


def interpreter_start(count: int = 5) -> dict[str, float]:
    """Median seconds to start `python -c pass`, and to import the worker's
    CLI: the floor under (d), a restarted worker process's recovery."""
    def median_s(code: str) -> float:
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return {"python_start_s": median_s("pass"),
            "cli_import_s": median_s("import stepline.cli.main")}
