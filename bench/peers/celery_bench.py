"""Celery with Redis (broker and result backend) under the peer workloads
(see common.py): the plain job-queue baseline. A "task of n steps" is a
chain of n Celery tasks (`inc`, x -> x + 1; n = 0 is one `noop` task); the
3-step task is `chain(inc.s(x), inc.s(), inc.s())`.

One process per (workload letter, repetition); it starts its own Celery
worker on the Redis the orchestrator started, and stops it at the end:
`--pool threads --concurrency 8`, chosen because on this 2-core machine it
completed these no-op chains 1.7-1.9x faster than Celery's default pool
(prefork, one child per core) at 1, 16 and 256 in flight; the rest is
Celery's defaults (prefetch multiplier 4, early ack, JSON). Rows go to stdout
as `ROW {json}` lines:

    .bench-venv/bin/python bench/peers/celery_bench.py --url redis://127.0.0.1:PORT/0 \
        --workload a [--quick] [--appendfsync everysec|always]

Completion = the chain's LAST task's result is in the result backend with
the right value. (a) and (c) see results pushed: the Redis backend PUBLISHes each
one, and the driver, one thread, PSUBSCRIBEs to them all; (b) waits with
`AsyncResult.get()`, which Redis pub/sub wakes; (c) has the chain's first
task write CLOCK_MONOTONIC at its first line to a Redis hash.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as c  # noqa: E402
import kill9  # noqa: E402
import redis  # noqa: E402
from celery import Celery, chain  # noqa: E402

QUEUE = "bench"
START_KEY = "bench:start"
C_SENDERS = 8
C_WARMUP = 3  # runs before the open loop starts
WORKER_READY_TIMEOUT_S = 60.0


def make_app(url: str) -> Celery:
    app = Celery("stepline_bench", broker=url, backend=url)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_default_queue=QUEUE, worker_send_task_events=False,
        broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
    )
    stamp_client: list[redis.Redis] = []

    @app.task(name="bench.inc")
    def inc(x: int) -> int:
        return x + 1

    @app.task(name="bench.noop")
    def noop(x: int) -> int:
        return x

    @app.task(name="bench.stamp_inc")
    def stamp_inc(x: int) -> int:
        # First line: the trigger-to-start clock stops here.
        t = time.monotonic()
        if not stamp_client:  # one client per worker child, made after the fork
            stamp_client.append(redis.Redis.from_url(url))
        stamp_client[0].hsetnx(START_KEY, str(x), repr(t))
        return x + 1

    @app.task(name="bench.k_one")
    def k_one(x: int) -> int:
        kill9.record(os.environ["BENCH_KILL9_STATE"], "one")
        return x + 1

    @app.task(name="bench.k_two")
    def k_two(x: int) -> int:
        kill9.hold_in_two(os.environ["BENCH_KILL9_STATE"])
        return x + 1

    @app.task(name="bench.k_three")
    def k_three(x: int) -> int:
        kill9.record(os.environ["BENCH_KILL9_STATE"], "three")
        return x + 1

    return app


def sig(app: Celery, name: str, *args: int) -> Any:
    return app.signature(name, args=args)


def chain_of(app: Celery, x: int, n: int, first: str = "bench.inc") -> Any:
    if n == 0:
        return sig(app, "bench.noop", x)
    return chain(sig(app, first, x), *(sig(app, "bench.inc") for _ in range(n - 1)))


# --- the worker -----------------------------------------------------------

def serve_worker(url: str, pool: str, concurrency: int) -> None:
    make_app(url).worker_main([
        "worker", "--pool", pool, "--concurrency", str(concurrency), "--queues", QUEUE,
        "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING",
    ])


class Worker:
    """A Celery worker in its own process group (or, for the kill -9 check, in
    ours, so that killing our group kills it), stopped (warm, then killed) on exit."""

    def __init__(self, url: str, pool: str, concurrency: int, own_group: bool = True) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-worker", "--url", url,
             "--pool", pool, "--concurrency", str(concurrency)],
            start_new_session=own_group, stdout=sys.stderr, stderr=sys.stderr)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()  # the main process: a warm shutdown of its pool
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def wait_ready(app: Celery) -> None:
    res = chain_of(app, -10, 3).apply_async()
    if res.get(timeout=WORKER_READY_TIMEOUT_S) != -7:
        raise RuntimeError("the worker's first chain gave a wrong result")


# --- (a) ------------------------------------------------------------------

META_PREFIX = "celery-task-meta-"


class Finished:
    """Every finished task's result, pushed: Celery's Redis backend PUBLISHes
    each result on a channel named by its key, so one PSUBSCRIBE sees them
    all without polling. An MGET of what is still in flight backs it up when
    nothing has arrived for a while (a pub/sub message is not durable)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.ps = r.pubsub()
        self.ps.psubscribe(META_PREFIX + "*")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the subscription is live once confirmed
            msg = self.ps.get_message(timeout=1.0)
            if msg and msg["type"] == "psubscribe":
                return
        raise RuntimeError("PSUBSCRIBE to the result channels was not confirmed")

    def close(self) -> None:
        self.ps.close()

    def collect(self, inflight: dict[str, int], want: int, errors: list[str], timeout: float) -> int:
        """Waits up to `timeout` for results; removes and checks the in-flight
        chains that finished; returns how many completed correctly."""
        done = 0
        msg = self.ps.get_message(timeout=timeout)
        while msg is not None:
            if msg["type"] == "pmessage":
                tid = msg["channel"].decode()[len(META_PREFIX):]
                if tid in inflight:
                    done += self._check(inflight, tid, json.loads(msg["data"]), want, errors)
            msg = self.ps.get_message(timeout=0)
        return done

    def sweep(self, inflight: dict[str, int], want: int, errors: list[str]) -> int:
        ids = list(inflight)
        done = 0
        for tid, raw in zip(ids, self.r.mget([META_PREFIX + t for t in ids])):
            if raw is not None:
                done += self._check(inflight, tid, json.loads(raw), want, errors)
        return done

    @staticmethod
    def _check(inflight: dict[str, int], tid: str, meta: dict[str, Any], want: int, errors: list[str]) -> int:
        if meta.get("status") not in ("SUCCESS", "FAILURE"):
            return 0
        x = inflight.pop(tid)
        if meta["status"] != "SUCCESS" or meta.get("result") != x + want:
            errors.append(f"run {x}: {meta.get('status')} {meta.get('result')!r}, expected {x + want}")
            return 0
        return 1


def closed_loop(app: Celery, r: redis.Redis, cap: int, base: int, max_runs: int,
                seconds: float | None, timeout: float) -> dict[str, Any]:
    inflight: dict[str, int] = {}
    errors: list[str] = []
    done = i = 0
    fin = Finished(r)
    t0 = last = time.perf_counter()
    deadline = t0 + seconds if seconds is not None else float("inf")
    try:
        while True:
            now = time.perf_counter()
            while len(inflight) < cap and i < max_runs and now < deadline:
                x = base + i
                i += 1
                inflight[chain_of(app, x, 3).apply_async().id] = x
            if not inflight:
                break
            got = fin.collect(inflight, 3, errors, 0.5)
            if not got:  # nothing pushed for 0.5 s: look, in case a message was missed
                got = fin.sweep(inflight, 3, errors)
            if got:
                done += got
                last = time.perf_counter()
            if time.perf_counter() - t0 > timeout:
                errors.append(f"timeout: {len(inflight)} chains unfinished after {timeout:.0f} s")
                break
    finally:
        fin.close()
    return {"completed": done, "triggered": i, "errors": errors, "elapsed": last - t0}


def workload_a(app: Celery, r: redis.Redis, system: str, sz: dict[str, Any],
               extra: dict[str, Any]) -> None:
    for cap in c.CAPS:
        t_wall = time.perf_counter()
        w = closed_loop(app, r, cap, 10**9 + cap * 10**6, sz["a_warmup"][cap], sz["a_warmup_s"],
                        sz["timeout_s"])
        res = closed_loop(app, r, cap, cap * 10**6, sz["a_max_runs"], sz["a_seconds"], sz["timeout_s"])
        errors = w["errors"] + res["errors"]
        if res["completed"] != res["triggered"] or w["completed"] != w["triggered"]:
            errors.append(f"completed {res['completed']}/{res['triggered']} "
                          f"(warm-up {w['completed']}/{w['triggered']})")
        c.emit(c.row(system, "a_throughput", {"in_flight": cap, "steps": 3, **extra}, not errors,
                     errors, c.throughput_metrics(res["completed"], res["triggered"], res["elapsed"]),
                     time.perf_counter() - t_wall))


# --- (b) ------------------------------------------------------------------

def workload_b(app: Celery, system: str, sz: dict[str, Any], extra: dict[str, Any]) -> None:
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
                out = chain_of(app, x, n).apply_async().get(timeout=sz["timeout_s"])
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
    c.emit(c.slope_row(system, p50s, all_ok, {**extra, "step": "one Celery task per step"}))


# --- (c) ------------------------------------------------------------------

def measure_rate(app: Celery, r: redis.Redis, system: str, sz: dict[str, Any],
                 extra: dict[str, Any], rate: int) -> None:
    t_wall = time.perf_counter()
    base = rate * 10**6
    loop = c.OpenLoop(rate, sz["c_seconds"][rate])
    inflight: dict[str, int] = {}
    lags: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    fin = Finished(r)

    def send(i: int) -> None:
        lags.append((time.monotonic() - loop.at(i)) * 1000)
        try:
            tid = chain_of(app, base + i, 3, first="bench.stamp_inc").apply_async().id
        except Exception as exc:
            errors.append(f"send {i}: {type(exc).__name__}: {exc}")
            return
        with lock:
            inflight[tid] = base + i

    with ThreadPoolExecutor(C_SENDERS) as ex:
        for i in range(loop.n):
            delay = loop.at(i) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ex.submit(send, i)
    done = 0
    drain_until = last_progress = time.monotonic()
    drain_until += sz["c_drain_s"]
    while inflight and time.monotonic() < drain_until:
        got = fin.collect(inflight, 3, errors, 0.5) or fin.sweep(inflight, 3, errors)
        done += got
        if got:
            last_progress = time.monotonic()
    fin.close()
    raw = r.hgetall(START_KEY)
    starts = {int(k) - base: float(v) for k, v in raw.items() if base <= int(k) < base + loop.n}
    m = c.start_latency_metrics(loop, starts, done, lags)
    c.drain_verdict(loop, done, last_progress, sz["c_drain_s"], errors, m)
    c.emit(c.row(system, "c_start_latency", {"rate_per_s": rate, "steps": 3, **extra},
                 not errors, errors, m, time.perf_counter() - t_wall))


def workload_c(app: Celery, r: redis.Redis, system: str, sz: dict[str, Any],
               extra: dict[str, Any], rates: list[int]) -> None:
    for k in range(C_WARMUP):  # as for the other systems: a few runs before the clock starts
        out = chain_of(app, -10 - k, 3, first="bench.stamp_inc").apply_async().get(timeout=60)
        assert out == -7 - k, out
    for rate in rates:
        measure_rate(app, r, system, sz, extra, rate)


KILL_IDS = "bench:kill9:ids"


def workload_d(app: Celery, r: redis.Redis, system: str, phase: str, extra: dict[str, Any]) -> None:
    """kill9.py's protocol: the WORKER is killed in task two (phase run starts
    it in this process group). Phase resume starts a fresh worker and waits
    for the chain's last result; the first task's stored result is looked at too."""
    if phase == "run":
        sigs = chain(sig(app, "bench.k_one", kill9.X), sig(app, "bench.k_two"), sig(app, "bench.k_three"))
        res = sigs.apply_async()
        first = res
        while first.parent is not None:
            first = first.parent
        r.hset(KILL_IDS, mapping={"last": res.id, "first": first.id})
        time.sleep(600)  # killed with our group while the worker is in task two
        return
    ids = {k.decode(): v.decode() for k, v in r.hgetall(KILL_IDS).items()}
    out, finished = None, False
    try:
        out = app.AsyncResult(ids["last"]).get(timeout=KILL_RESUME_WAIT_S)
        finished = True
    except Exception:  # not finished within the wait: the finding, not an error
        pass
    first = r.get(META_PREFIX + ids["first"])
    ok, errors, m = kill9.verdict(os.environ["BENCH_KILL9_STATE"], finished, out, {
        "resumed_by": f"a new worker; waited {KILL_RESUME_WAIT_S:.0f} s for the chain's last result",
        "first_task_result_kept": first is not None and json.loads(first).get("status") == "SUCCESS"})
    c.emit(c.row(system, "d_kill9", {"steps": 3, **extra}, ok, errors, m))


KILL_RESUME_WAIT_S = 20.0


def redis_durability(r: redis.Redis, appendfsync: str | None) -> dict[str, str]:
    if appendfsync:
        r.config_set("appendfsync", appendfsync)
    cfg: dict[str, str] = {}
    for key in ("appendonly", "appendfsync", "save"):
        cfg[key] = r.config_get(key).get(key, "?")
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="redis://host:port/db (flushed at start)")
    ap.add_argument("--workload", choices=("a", "b", "c", "d"))
    ap.add_argument("--phase", choices=("run", "resume"), default="run", help="for d (kill9.py)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rates", default=",".join(map(str, c.RATES)), help="for c: sends per second")
    ap.add_argument("--pool", default="threads")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--appendfsync", choices=("everysec", "always"), default=None,
                    help="set Redis's AOF fsync policy for this measurement (restored after)")
    ap.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_worker:
        serve_worker(args.url, args.pool, args.concurrency)
        return 0
    # Stopped by the orchestrator (timeout): still stop our worker and restore Redis.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    system = c.CELERY_ALWAYS if args.appendfsync == "always" else c.CELERY
    sz = c.sizes(args.quick)
    import importlib.metadata as md

    r = redis.Redis.from_url(args.url)
    if not (args.workload == "d" and args.phase == "resume"):
        r.flushdb()
    before = r.config_get("appendfsync").get("appendfsync")
    extra: dict[str, Any] = {"celery": md.version("celery"), "pool": args.pool,
                             "concurrency": args.concurrency,
                             "redis": redis_durability(r, args.appendfsync)}
    app = make_app(args.url)
    worker = Worker(args.url, args.pool, args.concurrency,
                    own_group=not (args.workload == "d" and args.phase == "run"))
    try:
        if args.workload == "d":
            workload_d(app, r, system, args.phase, extra)
            return 0
        wait_ready(app)
        if args.workload == "a":
            workload_a(app, r, system, sz, extra)
        elif args.workload == "b":
            workload_b(app, system, sz, extra)
        else:
            workload_c(app, r, system, sz, extra, [int(x) for x in args.rates.split(",")])
    except Exception as exc:
        c.emit(c.row(system, f"{args.workload}_driver", extra, False,
                     [f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=4)], {}))
        return 1
    finally:
        worker.stop()
        if args.appendfsync and before:
            r.config_set("appendfsync", before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
