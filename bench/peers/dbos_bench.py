"""DBOS Transact under the peer workloads (see common.py), one process per
(backend, workload letter, repetition); result rows as `ROW {json}` lines on
stdout. Run by bench/peers/run_peers.py with .bench-venv/bin/python:

    .bench-venv/bin/python bench/peers/dbos_bench.py --backend sqlite \
        --url sqlite:////tmp/x/dbos.sqlite --workload a [--quick]

How DBOS is driven (its fastest documented paths, each in this one process):

* a, b: `DBOS.start_workflow(wf, x)` then `handle.get_result()`. The
  workflow's status row is written before it runs, so a killed process
  recovers it on restart; the result is handed over in memory (a future),
  so no polling interval is involved. Sync workflows on DBOS's thread pool;
  the in-flight cap is that many driver threads.
* c: `queue.enqueue(probe3, x)` on a queue whose worker thread polls the
  system database every `polling_interval_sec`: DBOS's default is 1 s;
  here it is LOWERED to --poll (0.01 s by default) and the row says so.

Durability is DBOS's own (common.DURABILITY): nothing is tuned.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as c  # noqa: E402
import kill9  # noqa: E402
from dbos import DBOS, DBOSConfig, SetWorkflowID  # noqa: E402

DEFAULT_QUEUE_POLL_S = 1.0  # DBOS's own default for queues and get_result
C_SENDERS = 32  # threads issuing the open-loop sends
C_WARMUP = 3  # runs through the queue before the open loop starts
STARTS: dict[int, float] = {}
DONE: dict[int, int] = {}
LAST_DONE = [0.0]


@DBOS.step()
def step_a(x: int) -> int:
    return x + 1


@DBOS.step()
def step_b(x: int) -> int:
    return x + 1


@DBOS.step()
def step_c(x: int) -> int:
    return x + 1


@DBOS.step()
def inc(x: int) -> int:
    return x + 1


@DBOS.workflow()
def noop3(x: int) -> int:
    return step_c(step_b(step_a(x)))


@DBOS.workflow()
def steps_n(x: int, n: int) -> int:
    for _ in range(n):
        x = inc(x)
    return x


@DBOS.workflow()
def probe3(x: int) -> int:
    # First line: the trigger-to-start clock stops here (first attempt only).
    STARTS.setdefault(x, time.monotonic())
    out = step_c(step_b(step_a(x)))
    DONE[x] = out
    LAST_DONE[0] = time.monotonic()
    return out


KILL_STATE = os.environ.get("BENCH_KILL9_STATE", "")  # the d workload's state dir


@DBOS.step()
def k_one(x: int) -> int:
    kill9.record(KILL_STATE, "one")
    return x + 1


@DBOS.step()
def k_two(x: int) -> int:
    kill9.hold_in_two(KILL_STATE)
    return x + 1


@DBOS.step()
def k_three(x: int) -> int:
    kill9.record(KILL_STATE, "three")
    return x + 1


@DBOS.workflow()
def kill3(x: int) -> int:
    return k_three(k_two(k_one(x)))


KILL_WF_ID = "bench-kill9"


def workload_d(system: str, phase: str, extra: dict[str, Any]) -> None:
    """kill9.py's protocol. DBOS recovers this executor's PENDING workflows
    at launch; the result is then read by workflow id."""
    if phase == "run":
        with SetWorkflowID(KILL_WF_ID):
            DBOS.start_workflow(kill3, kill9.X)
        time.sleep(600)  # killed in step two
        return
    box: dict[str, Any] = {}

    def wait() -> None:
        box["out"] = DBOS.retrieve_workflow(KILL_WF_ID).get_result(polling_interval_sec=0.05)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    t.join(60)
    ok, errors, m = kill9.verdict(KILL_STATE, "out" in box, box.get("out"),
                                  {"resumed_by": "DBOS.launch() recovery of PENDING workflows"})
    c.emit(c.row(system, "d_kill9", {"steps": 3, **extra}, ok, errors, m))


# --- (a) ------------------------------------------------------------------

def closed_loop(cap: int, base: int, max_runs: int, seconds: float | None) -> dict[str, Any]:
    """`cap` users, each: start a run, wait for its result, repeat. Stops
    triggering at the deadline; waits for every run it started."""
    counter = itertools.count()
    errors: list[str] = []
    done = [0]
    last = [0.0]
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + seconds if seconds is not None else float("inf")

    def user() -> None:
        while True:
            i = next(counter)
            if i >= max_runs or time.perf_counter() >= deadline:
                return
            x = base + i
            try:
                out = DBOS.start_workflow(noop3, x).get_result()
            except Exception as exc:  # a failed run is a wrong result
                with lock:
                    errors.append(f"run {x}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                if out != x + 3:
                    errors.append(f"run {x}: output {out!r}, expected {x + 3}")
                else:
                    done[0] += 1
                    last[0] = time.perf_counter()

    with ThreadPoolExecutor(cap) as ex:
        for f in [ex.submit(user) for _ in range(cap)]:
            f.result()
    triggered = min(next(counter) - cap, max_runs)
    return {"completed": done[0], "triggered": triggered, "errors": errors,
            "elapsed": (last[0] or time.perf_counter()) - t0}


def workload_a(system: str, sz: dict[str, Any], extra: dict[str, Any]) -> None:
    for cap in c.CAPS:
        t_wall = time.perf_counter()
        w = closed_loop(cap, 10**9 + cap * 10**6, sz["a_warmup"][cap], sz["a_warmup_s"])
        r = closed_loop(cap, cap * 10**6, sz["a_max_runs"], sz["a_seconds"])
        errors = w["errors"] + r["errors"]
        if r["completed"] != r["triggered"] or w["completed"] != w["triggered"]:
            errors.append(f"completed {r['completed']}/{r['triggered']} "
                          f"(warm-up {w['completed']}/{w['triggered']})")
        c.emit(c.row(system, "a_throughput", {"in_flight": cap, "steps": 3, **extra}, not errors,
                     errors, c.throughput_metrics(r["completed"], r["triggered"], r["elapsed"]),
                     time.perf_counter() - t_wall))


# --- (b) ------------------------------------------------------------------

def workload_b(system: str, sz: dict[str, Any], extra: dict[str, Any]) -> None:
    p50s: dict[int, float] = {}
    all_ok = True
    for n in c.STEP_COUNTS:
        t_wall = time.perf_counter()
        errors: list[str] = []
        ms: list[float] = []
        for k in range(sz["b_warmup"] + sz["b_runs"][n]):
            x = n * 10**6 + k
            t0 = time.perf_counter()
            try:
                out = DBOS.start_workflow(steps_n, x, n).get_result()
            except Exception as exc:
                errors.append(f"run {x}: {type(exc).__name__}: {exc}")
                continue
            dt = (time.perf_counter() - t0) * 1000
            if out != x + n:
                errors.append(f"run {x}: output {out!r}, expected {x + n}")
            elif k >= sz["b_warmup"]:
                ms.append(dt)
        ok = not errors and len(ms) == sz["b_runs"][n]
        all_ok &= ok
        m = {"steps": n, "runs": sz["b_runs"][n], "completed": len(ms), **c.latency_metrics(ms)}
        if ok:
            p50s[n] = m["p50_ms"]
        c.emit(c.row(system, "b_latency", {"steps": n, "in_flight": 1, **extra}, ok, errors, m,
                     time.perf_counter() - t_wall))
    c.emit(c.slope_row(system, p50s, all_ok, extra))


# --- (c) ------------------------------------------------------------------

def measure_rate(system: str, sz: dict[str, Any], extra: dict[str, Any], poll: float,
                 queue: Any, rate: int) -> None:
    t_wall = time.perf_counter()
    base = rate * 10**6
    loop = c.OpenLoop(rate, sz["c_seconds"][rate])
    handles: dict[int, Any] = {}
    lags: list[float] = []
    errors: list[str] = []

    def send(i: int) -> None:
        lags.append((time.monotonic() - loop.at(i)) * 1000)
        try:
            handles[i] = queue.enqueue(probe3, base + i)
        except Exception as exc:
            errors.append(f"enqueue {i}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(C_SENDERS) as ex:
        for i in range(loop.n):
            delay = loop.at(i) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ex.submit(send, i)
    drain_until = time.monotonic() + sz["c_drain_s"]
    want = {base + i for i in range(loop.n)}
    LAST_DONE[0] = time.monotonic()
    while not want <= DONE.keys() and time.monotonic() < drain_until:
        time.sleep(0.01)
    done = [i for i in range(loop.n) if base + i in DONE]
    for i in done:  # read each result back as DBOS reports it
        try:
            out = handles[i].get_result(polling_interval_sec=0.01)
        except Exception as exc:
            errors.append(f"run {base + i}: {type(exc).__name__}: {exc}")
            continue
        if out != base + i + 3:
            errors.append(f"run {base + i}: output {out!r}, expected {base + i + 3}")
    starts = {i: STARTS[base + i] for i in range(loop.n) if base + i in STARTS}
    m = c.start_latency_metrics(loop, starts, len(done), lags)
    c.drain_verdict(loop, len(done), LAST_DONE[0], sz["c_drain_s"], errors, m)
    params = {"rate_per_s": rate, "steps": 3, "queue_polling_interval_s": poll,
              "dbos_default_polling_interval_s": DEFAULT_QUEUE_POLL_S, **extra}
    c.emit(c.row(system, "c_start_latency", params, not errors, errors, m,
                 time.perf_counter() - t_wall))


def workload_c(system: str, sz: dict[str, Any], extra: dict[str, Any], poll: float,
               rates: list[int]) -> None:
    queue = DBOS.register_queue("bench_c", polling_interval_sec=poll)
    # Warm-up through the queue: DBOS starts a new queue's worker thread from a
    # monitor that looks once a second, so the first runs would wait for that.
    for k in range(C_WARMUP):
        out = queue.enqueue(probe3, -10 - k).get_result(polling_interval_sec=0.01)
        assert out == -7 - k, out
    for rate in rates:
        measure_rate(system, sz, extra, poll, queue, rate)


def db_settings(backend: str) -> dict[str, str]:
    """The durability settings as DBOS's own connections see them (recorded in
    every row, so the durability table is read, not assumed)."""
    from dbos._dbos import _get_dbos_instance  # the one engine DBOS uses

    queries = ({"journal_mode": "PRAGMA journal_mode", "synchronous": "PRAGMA synchronous"}
               if backend == "sqlite" else
               {"fsync": "SHOW fsync", "synchronous_commit": "SHOW synchronous_commit",
                "wal_sync_method": "SHOW wal_sync_method"})
    out: dict[str, str] = {}
    with _get_dbos_instance()._sys_db.engine.connect() as conn:
        for k, q in queries.items():
            out[k] = str(conn.exec_driver_sql(q).scalar())
    if backend == "sqlite":  # 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA
        out["synchronous"] = {"0": "OFF", "1": "NORMAL", "2": "FULL", "3": "EXTRA"}.get(
            out["synchronous"], out["synchronous"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("sqlite", "postgres"), required=True)
    ap.add_argument("--url", required=True, help="the system database (a fresh one)")
    ap.add_argument("--workload", choices=("a", "b", "c", "d"), required=True)
    ap.add_argument("--phase", choices=("run", "resume"), default="run", help="for d (kill9.py)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rates", default=",".join(map(str, c.RATES)), help="for c: sends per second")
    ap.add_argument("--poll", type=float, default=0.01,
                    help="queue polling interval for workload c, s (DBOS default 1.0)")
    args = ap.parse_args()
    system = c.DBOS_SQLITE if args.backend == "sqlite" else c.DBOS_PG
    sz = c.sizes(args.quick)
    import importlib.metadata as md

    extra = {"dbos": md.version("dbos")}
    config: DBOSConfig = {"name": "stepline-bench", "system_database_url": args.url,
                          "log_level": "WARNING"}
    DBOS(config=config)
    try:
        DBOS.launch()
        extra["db_settings"] = db_settings(args.backend)
        if args.workload == "d":
            workload_d(system, args.phase, extra)
        elif args.workload == "a":
            workload_a(system, sz, extra)
        elif args.workload == "b":
            workload_b(system, sz, extra)
        else:
            workload_c(system, sz, extra, args.poll, [int(x) for x in args.rates.split(",")])
    except Exception as exc:
        c.emit(c.row(system, f"{args.workload}_driver", {**extra}, False,
                     [f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=4)], {}))
        return 1
    finally:
        DBOS.destroy(workflow_completion_timeout_sec=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
