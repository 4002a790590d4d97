"""Stepline under the peer workloads (see common.py), in its own process like
each peer, so the peer run interleaves like with like. Run with the
project's .venv by bench/peers/run_peers.py:

    .venv/bin/python bench/peers/stepline_bench.py --log full|normal|kafka \
        --workload a|b|c [--quick] [--tmpdir DIR] [--bootstrap HOST:PORT]

Embedded, as `stepline dev` runs and as bench/run.py measures it: Client +
Worker on one event loop and one log (bench/workloads.py `embedded`; on
Kafka bench/kafka_bench.py's, a fresh namespace of 6 partitions). The
tasks are bench/sl_tasks.py's; (c) adds `probe3`, the same three steps
after a first line that notes the start time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # bench/: workloads, sl_tasks, kafka_bench

import common as c  # noqa: E402
import kill9  # noqa: E402
import sl_tasks  # noqa: E402
import workloads  # noqa: E402

import stepline as sl  # noqa: E402

SYSTEMS = {"full": c.SL_FULL, "normal": c.SL_NORMAL, "kafka": c.SL_KAFKA}
STARTS: dict[int, float] = {}
C_WARMUP = 3  # runs before the open loop starts


@sl.task(id="probe3", registry=sl_tasks.registry)
async def probe3(x: int) -> int:
    """noop3 with its start noted: the trigger-to-start clock stops here."""
    STARTS.setdefault(x, time.monotonic())
    x = await sl_tasks.step_a(x)
    x = await sl_tasks.step_b(x)
    return await sl_tasks.step_c(x)


KILL_STATE = os.environ.get("BENCH_KILL9_STATE", "")


@sl.step
async def k_one(x: int) -> int:
    kill9.record(KILL_STATE, "one")
    return x + 1


@sl.step
async def k_two(x: int) -> int:
    await asyncio.to_thread(kill9.hold_in_two, KILL_STATE)
    return x + 1


@sl.step
async def k_three(x: int) -> int:
    kill9.record(KILL_STATE, "three")
    return x + 1


@sl.task(id="kill3", registry=sl_tasks.registry)
async def kill3(x: int) -> int:
    return await k_three(await k_two(await k_one(x)))


async def workload_d(system: str, log: str, phase: str, bootstrap: str | None) -> None:
    """kill9.py's protocol on a log in the state dir (sqlite) or a fixed
    namespace (Kafka). The run id comes from an idempotency key, so the
    resume phase asks for the same run and waits for its result."""
    if log == "kafka":
        import kafka_bench

        ns = "peers-kill9-" + os.path.basename(KILL_STATE.rstrip("/"))
        url = kafka_bench.log_url(bootstrap or "", ns)
    else:
        url = workloads.log_url(KILL_STATE, log)
    async with workloads.embedded(url) as (client, _worker):
        h = await kill3.trigger(kill9.X, client=client, idempotency_key="bench-kill9")
        if phase == "run":
            await asyncio.sleep(600)  # killed in step two
            return
        try:
            out, finished = await h.result(timeout=60), True
        except Exception:
            out, finished = None, False
    ok, errors, m = kill9.verdict(KILL_STATE, finished, out,
                                  {"resumed_by": "a new Worker on the same log"})
    c.emit(c.row(system, "d_kill9", {"steps": 3}, ok, errors, m))


@contextlib.asynccontextmanager
async def engine(log: str, tmpdir: str, bootstrap: str | None) -> AsyncIterator[tuple[Any, Any]]:
    if log == "kafka":
        import kafka_bench

        assert bootstrap, "--bootstrap is needed for --log kafka"
        async with kafka_bench.embedded(bootstrap, kafka_bench.fresh_namespace("peers")) as (cl, w, _):
            yield cl, w
    else:
        with tempfile.TemporaryDirectory(prefix="stepline-peers-", dir=tmpdir) as d:
            async with workloads.embedded(workloads.log_url(d, log)) as (cl, w):
                yield cl, w


async def drive_for(client: Any, task: Any, expected: Callable[[int], int], cap: int, base: int,
                    max_runs: int, seconds: float | None) -> dict[str, Any]:
    """Closed loop like workloads.drive, stopping triggers at a deadline."""
    errors: list[str] = []
    state = {"next": 0, "done": 0}
    t0 = time.perf_counter()
    last = t0
    deadline = t0 + seconds if seconds is not None else float("inf")

    async def user() -> None:
        nonlocal last
        while state["next"] < max_runs and time.perf_counter() < deadline:
            x = base + state["next"]
            state["next"] += 1
            try:
                out = await (await task.trigger(x, client=client)).result(timeout=workloads.RESULT_TIMEOUT_S)
            except Exception as exc:  # a missing or failed run
                errors.append(f"run {x}: {type(exc).__name__}: {exc}")
                continue
            if out != expected(x):
                errors.append(f"run {x}: output {out!r}, expected {expected(x)!r}")
                continue
            state["done"] += 1
            last = time.perf_counter()

    await asyncio.gather(*(user() for _ in range(cap)))
    return {"completed": state["done"], "triggered": state["next"], "errors": errors,
            "elapsed": last - t0}


async def workload_a(system: str, log: str, sz: dict[str, Any], tmpdir: str, bootstrap: str | None) -> None:
    for cap in c.CAPS:
        t_wall = time.perf_counter()
        try:
            async with engine(log, tmpdir, bootstrap) as (client, worker):
                w = await drive_for(client, sl_tasks.noop3, sl_tasks.expected_noop3, cap,
                                    10**9, sz["a_warmup"][cap], sz["a_warmup_s"])
                r = await drive_for(client, sl_tasks.noop3, sl_tasks.expected_noop3, cap, 0,
                                    sz["a_max_runs"], sz["a_seconds"])
                errors = w["errors"] + r["errors"]
                if r["completed"] != r["triggered"] or w["completed"] != w["triggered"]:
                    errors.append(f"completed {r['completed']}/{r['triggered']} "
                                  f"(warm-up {w['completed']}/{w['triggered']})")
                want = w["triggered"] + r["triggered"]
                await workloads._settle(worker, "noop3", want)
                workloads._check_worker(worker, "noop3", want, errors)
            m = c.throughput_metrics(r["completed"], r["triggered"], r["elapsed"])
        except Exception as exc:
            errors, m = [f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=3)], {}
        c.emit(c.row(system, "a_throughput", {"in_flight": cap, "steps": 3}, not errors, errors, m,
                     time.perf_counter() - t_wall))


async def workload_b(system: str, log: str, sz: dict[str, Any], tmpdir: str, bootstrap: str | None) -> None:
    p50s: dict[int, float] = {}
    all_ok = True
    for n in c.STEP_COUNTS:
        t_wall = time.perf_counter()
        task = sl_tasks.STEPS_TASKS[n]
        errors: list[str] = []
        ms: list[float] = []
        try:
            async with engine(log, tmpdir, bootstrap) as (client, worker):
                for k in range(sz["b_warmup"] + sz["b_runs"][n]):
                    x = n * 10**6 + k
                    t0 = time.perf_counter()
                    out = await (await task.trigger(x, client=client)).result(timeout=workloads.RESULT_TIMEOUT_S)
                    dt = (time.perf_counter() - t0) * 1000
                    if out != x + n:
                        errors.append(f"run {x}: output {out!r}, expected {x + n}")
                    elif k >= sz["b_warmup"]:
                        ms.append(dt)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        ok = not errors and len(ms) == sz["b_runs"][n]
        all_ok &= ok
        m = {"steps": n, "runs": sz["b_runs"][n], "completed": len(ms), **c.latency_metrics(ms)}
        if ok:
            p50s[n] = m["p50_ms"]
        c.emit(c.row(system, "b_latency", {"steps": n, "in_flight": 1}, ok, errors, m,
                     time.perf_counter() - t_wall))
    c.emit(c.slope_row(system, p50s, all_ok, {}))


async def measure_rate(system: str, log: str, sz: dict[str, Any], tmpdir: str, bootstrap: str | None,
                       rate: int) -> None:
    t_wall = time.perf_counter()
    base = rate * 10**6
    errors: list[str] = []
    lags: list[float] = []
    outs: dict[int, int] = {}
    last_progress = [0.0]
    async with engine(log, tmpdir, bootstrap) as (client, _worker):
        for k in range(C_WARMUP):  # as for the peers: a few runs before the clock starts
            out = await (await probe3.trigger(-10 - k, client=client)).result(timeout=60)
            assert out == -7 - k, out
        loop = c.OpenLoop(rate, sz["c_seconds"][rate])  # after the engine is up

        async def send(i: int) -> None:
            lags.append((time.monotonic() - loop.at(i)) * 1000)
            try:
                h = await probe3.trigger(base + i, client=client)
                outs[i] = await h.result(timeout=workloads.RESULT_TIMEOUT_S)
                last_progress[0] = time.monotonic()
            except Exception as exc:
                errors.append(f"run {base + i}: {type(exc).__name__}: {exc}")

        sends = []
        for i in range(loop.n):
            delay = loop.at(i) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sends.append(asyncio.create_task(send(i)))
        last_progress[0] = time.monotonic()
        done, pending = await asyncio.wait(sends, timeout=sz["c_drain_s"])
        for t in pending:
            t.cancel()
    wrong = [i for i, out in outs.items() if out != base + i + 3]
    errors += [f"run {base + i}: output {outs[i]!r}, expected {base + i + 3}" for i in wrong[:5]]
    starts = {i: STARTS[base + i] for i in range(loop.n) if base + i in STARTS}
    m = c.start_latency_metrics(loop, starts, len(outs) - len(wrong), lags)
    c.drain_verdict(loop, len(outs), last_progress[0], sz["c_drain_s"], errors, m)
    c.emit(c.row(system, "c_start_latency", {"rate_per_s": rate, "steps": 3}, not errors, errors, m,
                 time.perf_counter() - t_wall))


async def workload_c(system: str, log: str, sz: dict[str, Any], tmpdir: str, bootstrap: str | None,
                     rates: list[int]) -> None:
    for rate in rates:
        await measure_rate(system, log, sz, tmpdir, bootstrap, rate)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", choices=tuple(SYSTEMS), required=True)
    ap.add_argument("--workload", choices=("a", "b", "c", "d"), required=True)
    ap.add_argument("--phase", choices=("run", "resume"), default="run", help="for d (kill9.py)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--rates", default=",".join(map(str, c.RATES)), help="for c: sends per second")
    ap.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers, for --log kafka")
    args = ap.parse_args()
    system = SYSTEMS[args.log]
    sz = c.sizes(args.quick)
    rates = [int(x) for x in args.rates.split(",")]
    fns = {"a": workload_a, "b": workload_b,
           "c": lambda *a: workload_c(*a, rates),  # type: ignore[misc]
           "d": lambda sy, lg, _sz, _tmp, bs: workload_d(sy, lg, args.phase, bs)}
    try:
        asyncio.run(asyncio.wait_for(fns[args.workload](system, args.log, sz, args.tmpdir, args.bootstrap),
                                     sz["timeout_s"] * 3))
    except Exception as exc:
        c.emit(c.row(system, f"{args.workload}_driver", {}, False,
                     [f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=4)], {}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
