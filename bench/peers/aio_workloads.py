"""Workloads a, b and c (common.py) for a peer driven from one asyncio event
loop (Temporal's Python SDK, Restate's ingress over HTTP): the driver gives
two coroutines, and this module runs the same closed loop, one-at-a-time
series and open loop as the other drivers do, and emits the rows.

    call(x, n) -> output     start a run of the n-step task on x and wait for
                             its OUTPUT (the right one is x + n)
    probe(x) -> output       the 3-step task whose first line notes
                             CLOCK_MONOTONIC in `starts()` (x -> time)

Standard library only (it runs in .bench-venv).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import common as c

Call = Callable[[int, int], Awaitable[int]]
Probe = Callable[[int], Awaitable[int]]
C_WARMUP = 3  # runs through the probe before the open loop starts, as for the other systems


async def closed_loop(call: Call, cap: int, base: int, max_runs: int, seconds: float | None,
                      timeout: float) -> dict[str, Any]:
    """`cap` users, each: start a run, wait for its output, repeat; triggers
    stop at the deadline and the runs in flight are waited for."""
    errors: list[str] = []
    st = {"next": 0, "done": 0}
    t0 = time.perf_counter()
    last = t0
    deadline = t0 + seconds if seconds is not None else float("inf")

    async def user() -> None:
        nonlocal last
        while st["next"] < max_runs and time.perf_counter() < deadline:
            x = base + st["next"]
            st["next"] += 1
            try:
                out = await asyncio.wait_for(call(x, 3), timeout)
            except Exception as exc:  # a failed or missing run is a wrong result
                errors.append(f"run {x}: {type(exc).__name__}: {exc}")
                continue
            if out != x + 3:
                errors.append(f"run {x}: output {out!r}, expected {x + 3}")
                continue
            st["done"] += 1
            last = time.perf_counter()

    await asyncio.gather(*(user() for _ in range(cap)))
    return {"completed": st["done"], "triggered": st["next"], "errors": errors, "elapsed": last - t0}


async def workload_a(system: str, call: Call, sz: dict[str, Any], extra: dict[str, Any]) -> None:
    for cap in c.CAPS:
        t_wall = time.perf_counter()
        w = await closed_loop(call, cap, 10**9 + cap * 10**6, sz["a_warmup"][cap], sz["a_warmup_s"],
                              sz["timeout_s"])
        r = await closed_loop(call, cap, cap * 10**6, sz["a_max_runs"], sz["a_seconds"], sz["timeout_s"])
        errors = w["errors"] + r["errors"]
        if r["completed"] != r["triggered"] or w["completed"] != w["triggered"]:
            errors.append(f"completed {r['completed']}/{r['triggered']} "
                          f"(warm-up {w['completed']}/{w['triggered']})")
        c.emit(c.row(system, "a_throughput", {"in_flight": cap, "steps": 3, **extra}, not errors, errors,
                     c.throughput_metrics(r["completed"], r["triggered"], r["elapsed"]),
                     time.perf_counter() - t_wall))


async def workload_b(system: str, call: Call, sz: dict[str, Any], extra: dict[str, Any]) -> None:
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
                out = await asyncio.wait_for(call(x, n), sz["timeout_s"])
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


async def measure_rate(system: str, probe: Probe, starts: Callable[[], dict[int, float]],
                       sz: dict[str, Any], extra: dict[str, Any], rate: int) -> None:
    t_wall = time.perf_counter()
    base = rate * 10**6
    errors: list[str] = []
    lags: list[float] = []
    outs: dict[int, int] = {}
    last_progress = [0.0]
    for k in range(C_WARMUP):
        out = await asyncio.wait_for(probe(-10 - k), 60)
        if out != -7 - k:
            raise RuntimeError(f"warm-up run: output {out!r}, expected {-7 - k}")
    loop = c.OpenLoop(rate, sz["c_seconds"][rate])

    async def send(i: int) -> None:
        lags.append((time.monotonic() - loop.at(i)) * 1000)
        try:
            outs[i] = await probe(base + i)
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
    _done, pending = await asyncio.wait(sends, timeout=sz["c_drain_s"])
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wrong = [i for i, out in outs.items() if out != base + i + 3]
    errors += [f"run {base + i}: output {outs[i]!r}, expected {base + i + 3}" for i in wrong[:5]]
    got = starts()
    st = {i: got[base + i] for i in range(loop.n) if base + i in got}
    m = c.start_latency_metrics(loop, st, len(outs) - len(wrong), lags)
    # A run STARTED is progress too: a server interleaving hundreds of
    # started runs step by step completes none of them for a while, which
    # is overload, not a stall.
    progress = max([last_progress[0], *st.values()])
    c.drain_verdict(loop, len(outs), progress, sz["c_drain_s"], errors, m)
    c.emit(c.row(system, "c_start_latency", {"rate_per_s": rate, "steps": 3, **extra}, not errors, errors,
                 m, time.perf_counter() - t_wall))


async def workload_c(system: str, probe: Probe, starts: Callable[[], dict[int, float]],
                     sz: dict[str, Any], extra: dict[str, Any], rates: list[int]) -> None:
    for rate in rates:
        await measure_rate(system, probe, starts, sz, extra, rate)


async def sync_probe(pid: int, call: Call, runs: int) -> dict[str, Any]:
    """fsync-family calls of the server `pid`: per second while idle, and
    per three-step run over `runs` runs one at a time (the idle rate taken
    off), so the power-loss column rests on a count, not only on settings."""
    import procs

    with procs.count_syncs(pid) as idle:
        t0 = time.perf_counter()
        await asyncio.sleep(1.0)
        idle_s = time.perf_counter() - t0
    if "error" in idle:
        return {"error": idle["error"]}
    with procs.count_syncs(pid) as busy:
        t0 = time.perf_counter()
        for k in range(runs):
            out = await call(-1000 - k, 3)
            if out != -997 - k:
                return {"error": f"run {-1000 - k}: output {out!r}"}
        busy_s = time.perf_counter() - t0
    if "error" in busy:
        return {"error": busy["error"]}
    idle_rate = idle["total"] / idle_s
    return {"runs": runs, "sync_calls": busy["calls"], "sync_calls_total": busy["total"],
            "idle_sync_calls_per_s": round(idle_rate, 1),
            "sync_calls_per_run": round((busy["total"] - idle_rate * busy_s) / runs, 1),
            "note": "strace -f -c on the server process; the idle rate is subtracted"}
