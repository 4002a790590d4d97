"""The query projection: how fast it catches up, and how fast the runs list answers.

    python bench/run.py --quick --no-kafka     # with the rest (--no-query leaves it out)
    python bench/query.py [--quick]            # this part alone, same JSONL and summary

Setup, not timed: N runs (100,000; 10,000 with --quick) written straight to
a sqlite log (`synchronous=normal`, 4 partitions) with the codec and
`log.append` in batches of 1,000 runs: each run's RunTriggered (one of
three tasks, two tags, a small JSON payload; created_at 1 ms apart) and,
for 9 runs in 10, RunCompleted with an output; for 1 in 10, RunFailed and
RunDeadLettered. Building them through real workers would take minutes.

query_catchup (system "stepline query projection"):
  raw_events_per_s     every runs-topic record read back with `log.read` and
                       decoded with `codec.decode`, nothing else: the ceiling
  events_per_s         `rebuild()` of a fresh projection over the same log:
                       fold, upsert, offsets, indexes built at the end
  ceiling_over_rebuild raw ÷ rebuild
  cpu_*                the same per CPU second (process time, all threads): on
                       a shared machine the wall-clock rates follow the load
Correctness decides `ok`: the rebuilt store holds N runs, with the
expected number failed, and `rebuild` reports every record applied.

query_list: GET /v1/runs against the real aiohttp app (create_app with the
rebuilt store, served on 127.0.0.1:0, one keep-alive aiohttp session), 200
sequential requests per page kind after 10 warm-up requests; p50/p99 ms of
the whole request as the client sees it:
  first     no filter, limit 50
  filtered  task=<one of 3> & status=failed (1 run in 30), limit 50
  tag       tag=<one of 10>, limit 50
  deep      no filter, a cursor 90% of the way down (keyset: no OFFSET)
  text      q=<one payload's unique email>: a substring scan (LIKE)
Each response is checked (count, order, the matching run) before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

import stepline as sl
from stepline.core import codec
from stepline.core.events import (
    JSON,
    ErrorInfo,
    Event,
    Payload,
    RunCompleted,
    RunDeadLettered,
    RunFailed,
    RunTriggered,
)
from stepline.core.ids import new_event_id, new_run_id
from stepline.log import open_log
from stepline.log.base import partition_for
from stepline.log.topics import Topics
from stepline.projections.query import QueryStore, rebuild
from stepline.projections.query_store import encode_cursor
from stepline.server import ServeConfig, create_app

SYSTEM = "stepline query projection"
TASKS = ("resize-image", "send-email", "sync-crm")
TAGS = 10
PARTITIONS = 4
BATCH_RUNS = 1000
REQUESTS = 200
WARMUP = 10
PAGES = ("first", "filtered", "tag", "deep", "text")


def sizes(quick: bool) -> dict[str, int]:
    return {"runs": 10_000 if quick else 100_000}


def failed(i: int) -> bool:
    return i % 10 == 3


def run_events(i: int, run_id: str, t0: int) -> tuple[list[Event], list[Event]]:
    """Run i's trigger, and the events that end it."""
    t = t0 + i
    task = TASKS[i % len(TASKS)]
    payload = {"n": i, "email": f"user{i}@example.com", "plan": "pro" if i % 4 else "free"}
    trig = RunTriggered(Payload(JSON, json.dumps(payload).encode()), None, None, 0,
                        ("bench", f"tag-{i % TAGS}"), f"task/{task}")
    first = [Event(new_event_id(), trig.TYPE, run_id, task, 1, t, 0, trig)]
    if failed(i):
        f = RunFailed(ErrorInfo("ValueError", f"bad input {i}", "Traceback ...", False), 1)
        end = [Event(new_event_id(), f.TYPE, run_id, task, 2, t + 5, 1, f),
               Event(new_event_id(), RunDeadLettered.TYPE, run_id, task, 3, t + 5, 1, RunDeadLettered("exhausted"))]
    else:
        c = RunCompleted(Payload(JSON, json.dumps({"ok": i}).encode()), 1)
        end = [Event(new_event_id(), c.TYPE, run_id, task, 2, t + 5, 1, c)]
    return first, end


async def write_log(url: str, n: int, t0: int) -> int:
    """N runs' events, appended in batches; the number of records."""
    topics = Topics(partitions=PARTITIONS)
    records = 0
    async with open_log(url) as log:
        await log.ensure_topics(topics.specs())
        for start in range(0, n, BATCH_RUNS):
            parts: dict[int, list[tuple[bytes, bytes]]] = {}
            ends: dict[int, list[tuple[bytes, bytes]]] = {}
            for i in range(start, min(start + BATCH_RUNS, n)):
                run_id = new_run_id(t0 + i)
                key = run_id.encode()
                p = partition_for(key, PARTITIONS)
                first, end = run_events(i, run_id, t0)
                parts.setdefault(p, []).extend((key, codec.encode(e)) for e in first)
                ends.setdefault(p, []).extend((key, codec.encode(e)) for e in end)
            for batch in (parts, ends):
                for p, recs in batch.items():
                    await log.append(topics.runs, p, recs)
                    records += len(recs)
    return records


async def raw_read(url: str) -> tuple[int, float]:
    """Every runs record read and decoded: (records, seconds)."""
    topics = Topics(partitions=PARTITIONS)
    async with open_log(url) as log:
        t = time.perf_counter()
        count = 0
        for p in range(await log.partitions(topics.runs)):
            end, offset = await log.end_offset(topics.runs, p), 0
            while offset < end:
                recs = await log.read(topics.runs, p, offset, 5000)
                for r in recs:
                    codec.decode(r.value)
                count += len(recs)
                offset = recs[-1].offset + 1
        return count, time.perf_counter() - t


async def catchup(d: str, n: int) -> tuple[dict[str, Any], str, str, int]:
    url = f"sqlite:///{os.path.join(d, 'log.db')}?synchronous=normal"
    db = os.path.join(d, "query.db")
    t0 = int(time.time() * 1000) - n - 60_000
    records = await write_log(url, n, t0)
    cpu = time.process_time()
    raw, raw_s = await raw_read(url)
    raw_cpu = time.process_time() - cpu
    t, cpu = time.perf_counter(), time.process_time()
    applied = await rebuild(url, db)
    rebuild_s, rebuild_cpu = time.perf_counter() - t, time.process_time() - cpu
    errors = []
    if raw != records or applied != records:
        errors.append(f"{records} records written, {raw} read raw, {applied} applied by rebuild")
    async with QueryStore(db) as store:
        rows = await store.table("offsets")
        stored = sum(r[2] for r in rows)
        counts = await _counts(store)
    if stored != records:
        errors.append(f"the store's offsets add up to {stored}, want {records}")
    want_failed = sum(failed(i) for i in range(n))
    if counts != {"completed": n - want_failed, "failed": want_failed}:
        errors.append(f"run statuses {counts}, want {n - want_failed} completed and {want_failed} failed")
    result = {"ok": not errors, "errors": errors, "metrics": {
        "runs": n, "records": records, "raw_s": raw_s, "rebuild_s": rebuild_s,
        "raw_events_per_s": raw / raw_s, "events_per_s": applied / rebuild_s,
        "runs_per_s": n / rebuild_s, "ceiling_over_rebuild": (raw / raw_s) / (applied / rebuild_s),
        "raw_cpu_s": raw_cpu, "rebuild_cpu_s": rebuild_cpu,
        "cpu_events_per_s": applied / rebuild_cpu, "raw_cpu_events_per_s": raw / raw_cpu,
        "cpu_ceiling_over_rebuild": rebuild_cpu / raw_cpu,
        "db_mb": os.path.getsize(db) / 1e6,
    }}
    return result, url, db, t0


async def _counts(store: QueryStore) -> dict[str, int]:
    def q(conn: Any) -> dict[str, int]:
        return {s: int(c) for s, c in conn.execute("SELECT status, count(*) FROM runs GROUP BY status")}
    counts: dict[str, int] = await store._read(q)
    return counts


def _page_params(page: str, n: int, t0: int) -> tuple[dict[str, str], Callable[[dict[str, Any]], str | None]]:
    """Query parameters of a page kind, and a check of its answer (None = right)."""
    if page == "first":
        return {"limit": "50"}, lambda b: None if len(b["runs"]) == 50 and b["runs"][0]["created_at"] == t0 + n - 1 \
            else "first page is not the 50 newest"
    if page == "filtered":
        task = TASKS[0]
        return {"task": task, "status": "failed", "limit": "50"}, lambda b: None if len(b["runs"]) == 50 and all(
            r["task_id"] == task and r["status"] == "failed" for r in b["runs"]) else "filtered page is wrong"
    if page == "tag":
        return {"tag": "tag-7", "limit": "50"}, lambda b: None if len(b["runs"]) == 50 and all(
            "tag-7" in r["tags"] for r in b["runs"]) else "tag page is wrong"
    if page == "deep":
        # A cursor at run i (no run id needed to sort after: ids are > "" for the same ms).
        i = n // 10
        cursor = encode_cursor(t0 + i, "~")
        return {"limit": "50", "cursor": cursor}, lambda b: None if len(b["runs"]) == 50 and \
            b["runs"][0]["created_at"] == t0 + i else "deep page is wrong"
    i = n // 2 + 1
    return {"q": f"user{i}@example.com", "limit": "50"}, lambda b: None if len(b["runs"]) == 1 and \
        b["runs"][0]["created_at"] == t0 + i else "text page is wrong"


async def list_latency(url: str, db: str, n: int, t0: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    config = ServeConfig("bench-token", {})
    async with sl.Client(url, topics=Topics(partitions=PARTITIONS)) as client, QueryStore(db) as store:
        runner = web.AppRunner(create_app(client, config, None, query=store), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            base = f"http://{host}:{port}/v1/runs"
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer bench-token"}) as http:
                for page in PAGES:
                    params, check = _page_params(page, n, t0)
                    out[page] = await _time_page(http, base, params, check)
        finally:
            await runner.cleanup()
    return out


async def _time_page(http: aiohttp.ClientSession, url: str, params: dict[str, str],
                     check: Callable[[dict[str, Any]], str | None]) -> dict[str, Any]:
    times = []
    for i in range(WARMUP + REQUESTS):
        t = time.perf_counter()
        async with http.get(url, params=params) as resp:
            body = await resp.json()
        elapsed = time.perf_counter() - t
        if resp.status != 200:
            return {"ok": False, "errors": [f"HTTP {resp.status}: {body}"], "metrics": {}}
        if i == 0 and (problem := check(body)):
            return {"ok": False, "errors": [problem], "metrics": {}}
        if i >= WARMUP:
            times.append(elapsed * 1000)
    times.sort()
    return {"ok": True, "errors": [], "metrics": {
        "requests": len(times), "p50_ms": statistics.median(times),
        "p99_ms": times[int(0.99 * (len(times) - 1))], "max_ms": times[-1],
    }}


RunAsync = Callable[[Callable[[], Coroutine[Any, Any, dict[str, Any]]], float], dict[str, Any]]


def one_rep(rec: Any, rep: int, sz: dict[str, int], tmp_root: str | None, timeout: float,
            run_async: RunAsync) -> None:
    n = sz["runs"]
    with tempfile.TemporaryDirectory(prefix="stepline-bench-", dir=tmp_root) as d:
        found: dict[str, Any] = {}

        async def both() -> dict[str, Any]:
            result, url, db, t0 = await catchup(d, n)
            found["catchup"] = result
            if result["ok"]:
                found["lists"] = await list_latency(url, db, n, t0)
            return result

        t = time.perf_counter()
        result = run_async(both, max(timeout, 600.0))
        wall = time.perf_counter() - t
        rec.add(SYSTEM, "query_catchup", {"runs": n}, rep, found.get("catchup", result), wall)
        for page in PAGES:
            lists = found.get("lists")
            page_result = lists[page] if lists else {"ok": False, "errors": ["no store to list"], "metrics": {}}
            rec.add(SYSTEM, "query_list", {"runs": n, "page": page}, rep, page_result, 0.0)


HEADLINES: dict[str, list[tuple[str, str, str]]] = {
    "query_catchup": [("events_per_s", "events/s rebuilt", "{:,.0f}"),
                      ("raw_events_per_s", "events/s read+decoded (ceiling)", "{:,.0f}"),
                      ("ceiling_over_rebuild", "ceiling ÷ rebuild", "{:.1f}"),
                      ("cpu_events_per_s", "events per CPU s rebuilt", "{:,.0f}"),
                      ("raw_cpu_events_per_s", "events per CPU s read+decoded", "{:,.0f}"),
                      ("cpu_ceiling_over_rebuild", "CPU: ceiling ÷ rebuild", "{:.1f}"),
                      ("rebuild_s", "rebuild s", "{:.1f}")],
    "query_list": [("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}")],
}


def main(argv: list[str] | None = None) -> int:
    import run  # the benchmark's recorder and summary (run.py imports this module, not the reverse)

    ap = argparse.ArgumentParser(description="Stepline bench: the query projection alone")
    ap.add_argument("--quick", action="store_true", help="1 rep, N=10,000")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    path = Path(args.out) / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-query.jsonl"
    rec = run.Recorder(path, {"git": run._git_sha(), "quick": args.quick})
    for rep in range(1, reps + 1):
        one_rep(rec, rep, sizes(args.quick), args.tmpdir, 600.0, run._run_async)
    run.print_summary(rec.rows, path)
    return 0 if all(r["ok"] for r in rec.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
