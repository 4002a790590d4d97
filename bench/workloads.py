"""Stepline workloads: an embedded engine (Client + Worker on one SqliteLog, one
event loop, as `stepline dev` wires them) driven by a closed-loop load driver.

Each function returns a dict: `ok` (bool), `errors` (list of str), `metrics`.
They never judge timings: `ok` is about correctness only (every run
completed, with the right output).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import sl_tasks

import stepline as sl
from stepline.log.topics import Topics
from stepline.projections.runs import COMPLETED
from stepline.sdk.logs import configure_logging

# As the CLI does for `stepline dev`/`worker` (there at INFO; WARNING here only to keep the
# per-partition "claimed" lines out of the output, none is on a hot path). Without
# this structlog's default prints every debug line (one per attempt).
configure_logging(json_logs=True, level=logging.WARNING)

WORKER_CONCURRENCY = 256  # `stepline dev` default
RESULT_TIMEOUT_S = 120.0


def log_url(directory: str, synchronous: str) -> str:
    path = os.path.join(directory, "bench.db")
    q = "" if synchronous == "full" else "?synchronous=normal"
    return f"sqlite:///{path}{q}"


@contextlib.asynccontextmanager
async def embedded(url: str) -> AsyncIterator[tuple[sl.Client, sl.Worker]]:
    """Client and worker sharing one log, exactly as `stepline dev` wires them."""
    sys.setswitchinterval(0.0005)  # as `stepline dev` / `stepline worker` set it
    async with sl.Client(url, registry=sl_tasks.registry, topics=Topics()) as client:
        async with sl.Worker(sl_tasks.registry, client.log, topics=client.topics,
                             concurrency=WORKER_CONCURRENCY, client=client) as worker:
            yield client, worker


def _writer_counters(client: sl.Client) -> tuple[int, int]:
    w = getattr(client.log, "_writer", None)
    if w is None:
        return 0, 0
    return getattr(w, "commits", 0), getattr(w, "records_written", 0)


@dataclass
class DriveResult:
    completed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, trigger -> result


async def drive(client: sl.Client, task: sl.Task[int, int], expected: Callable[[int], int],
                n: int, cap: int, base: int = 0, record_latency: bool = False) -> DriveResult:
    """Closed loop: `cap` virtual users, each triggers one run and awaits its
    result before triggering the next, so at most `cap` runs are
    triggered-but-not-completed. Completion = `handle.result()` returned."""
    res = DriveResult()
    next_i = 0

    async def user() -> None:
        nonlocal next_i
        while next_i < n:
            i = base + next_i
            next_i += 1
            t0 = time.perf_counter()
            try:
                h = await task.trigger(i, client=client)
                out = await h.result(timeout=RESULT_TIMEOUT_S)
            except Exception as exc:  # a missing or failed run
                if len(res.errors) < 20:
                    res.errors.append(f"run {i}: {type(exc).__name__}: {exc}")
                continue
            if record_latency:
                res.latencies.append(time.perf_counter() - t0)
            if out != expected(i):
                if len(res.errors) < 20:
                    res.errors.append(f"run {i}: output {out!r}, expected {expected(i)!r}")
                continue
            res.completed += 1

    await asyncio.gather(*(user() for _ in range(min(cap, n))))
    return res


def _compacted(worker: sl.Worker) -> int:
    """Runs the worker keeps only the id of (Worker(keep_ended=...)): ended
    for good. Each measurement has a log of its own with one task's runs,
    so they are that task's, and completed (none of them can expire)."""
    return sum(len(p.ended) for p in worker._parts.values())


def _check_worker(worker: sl.Worker, task_id: str, want: int, errors: list[str]) -> None:
    whole = [r for r in worker.runs().values() if r.task_id == task_id]
    compacted = _compacted(worker)
    runs = len(whole) + compacted
    done = sum(1 for r in whole if r.status == COMPLETED) + compacted
    if runs != want or done != want:
        errors.append(f"worker projection: {runs} runs of {task_id} ({compacted} compacted), "
                      f"{done} completed, want {want}")


async def throughput(url: str, cap: int, n: int, warmup: int) -> dict[str, Any]:
    """(a) trigger -> complete throughput of the 3-step task at `cap` in flight."""
    async with embedded(url) as (client, worker):
        w = await drive(client, sl_tasks.noop3, sl_tasks.expected_noop3, warmup, cap, base=10**9)
        commits0, recs0 = _writer_counters(client)
        cpu0, t0 = time.process_time(), time.perf_counter()
        r = await drive(client, sl_tasks.noop3, sl_tasks.expected_noop3, n, cap)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        commits1, recs1 = _writer_counters(client)
        # Give the worker's tail a moment to fold the last RunCompleted.
        await _settle(worker, "noop3", warmup + n)
        errors = w.errors + r.errors
        if r.completed != n or w.completed != warmup:
            errors.append(f"completed {r.completed}/{n} (warm-up {w.completed}/{warmup})")
        _check_worker(worker, "noop3", warmup + n, errors)
    events = recs1 - recs0
    return {
        "ok": not errors,
        "errors": errors,
        "metrics": {
            "runs": n,
            "completed": r.completed,
            "elapsed_s": elapsed,
            "runs_per_s": r.completed / elapsed,
            "events_per_s_nominal": 9 * r.completed / elapsed,
            "events_written": events,
            "events_per_run_measured": events / max(r.completed, 1),
            "events_per_s_measured": events / elapsed,
            "commits": commits1 - commits0,
            "events_per_commit": events / max(commits1 - commits0, 1),
            "cpu_s": cpu,
            "cpu_s_per_1000_runs": 1000 * cpu / max(r.completed, 1),
            "cpu_utilisation": cpu / elapsed,
            "completion_signal": "handle.result()",
        },
    }


async def _settle(worker: sl.Worker, task_id: str, want: int, timeout: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        runs = [r for r in worker.runs().values() if r.task_id == task_id and r.status == COMPLETED]
        if len(runs) + _compacted(worker) >= want:
            return
        await asyncio.sleep(0.01)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def step_latency(url: str, steps: int, n: int, warmup: int) -> dict[str, Any]:
    """(b1) trigger -> completion latency of single runs, one at a time."""
    task = sl_tasks.STEPS_TASKS[steps]
    expected = lambda x: sl_tasks.expected_steps(steps, x)  # noqa: E731
    async with embedded(url) as (client, worker):
        w = await drive(client, task, expected, warmup, 1, base=10**9)
        commits0, recs0 = _writer_counters(client)
        cpu0 = time.process_time()
        r = await drive(client, task, expected, n, 1, record_latency=True)
        cpu = time.process_time() - cpu0
        commits1, recs1 = _writer_counters(client)
        await _settle(worker, task.id, warmup + n)
        errors = w.errors + r.errors
        if r.completed != n:
            errors.append(f"completed {r.completed}/{n}")
        _check_worker(worker, task.id, warmup + n, errors)
    ms = [x * 1000 for x in r.latencies]
    return {
        "ok": not errors,
        "errors": errors,
        "metrics": {
            "steps": steps,
            "runs": n,
            "completed": r.completed,
            "p50_ms": _pct(ms, 0.5),
            "p99_ms": _pct(ms, 0.99),
            "mean_ms": statistics.fmean(ms) if ms else float("nan"),
            "min_ms": min(ms) if ms else float("nan"),
            "max_ms": max(ms) if ms else float("nan"),
            "commits_per_run": (commits1 - commits0) / max(n, 1),
            "events_per_run": (recs1 - recs0) / max(n, 1),
            "cpu_ms_per_run": 1000 * cpu / max(n, 1),
        },
    }


async def amortised_checkpoint(url: str, steps: int, cap: int, n: int, warmup: int) -> dict[str, Any]:
    """(b2) many runs of the `steps`-step task at `cap` in flight: time per step."""
    task = sl_tasks.STEPS_TASKS[steps]
    expected = lambda x: sl_tasks.expected_steps(steps, x)  # noqa: E731
    async with embedded(url) as (client, worker):
        w = await drive(client, task, expected, warmup, cap, base=10**9)
        commits0, recs0 = _writer_counters(client)
        cpu0, t0 = time.process_time(), time.perf_counter()
        r = await drive(client, task, expected, n, cap)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        commits1, recs1 = _writer_counters(client)
        await _settle(worker, task.id, warmup + n)
        errors = w.errors + r.errors
        if r.completed != n:
            errors.append(f"completed {r.completed}/{n}")
        _check_worker(worker, task.id, warmup + n, errors)
    total_steps = r.completed * steps
    return {
        "ok": not errors,
        "errors": errors,
        "metrics": {
            "steps": steps,
            "in_flight": cap,
            "runs": n,
            "completed": r.completed,
            "elapsed_s": elapsed,
            "total_steps": total_steps,
            "ms_per_checkpoint": 1000 * elapsed / max(total_steps, 1),
            "checkpoints_per_s": total_steps / elapsed,
            "cpu_ms_per_checkpoint": 1000 * cpu / max(total_steps, 1),
            "events_per_s_measured": (recs1 - recs0) / elapsed,
            "events_per_commit": (recs1 - recs0) / max(commits1 - commits0, 1),
        },
    }


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x; returns (b, a)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return b, my - b * mx
