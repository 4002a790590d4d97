"""What every peer driver shares: the workload definitions, the result-row
shape, percentiles, the open-loop schedule and the durability statements.

Standard library only: it is imported by drivers running in the project's
.venv (Stepline) and in .bench-venv (DBOS, Celery) alike.

The workloads, the same for every system:

  a_throughput      a 3-step no-op durable task, closed loop with 1 / 16 /
                    256 runs in flight; each virtual user triggers a run and
                    waits for its COMPLETION (the right output read back)
                    before triggering the next. Triggering stops after
                    `a_seconds` (or `a_max_runs`), then the runs in flight
                    are waited for; runs/s = completions / (first trigger ->
                    last completion). A warm-up of `a_warmup` runs goes first.
  b_latency         one run at a time of a task of 0, 1, 10, 100 no-op
                    steps: trigger -> completion p50/p99.
  b_slope           least squares over the four p50s: ms per step.
  c_start_latency   open loop at a fixed rate (10, 100, 1000 per second):
                    send i is SCHEDULED at t0 + i/rate and issued then (by a
                    pool of senders, so one slow trigger does not hold the
                    next back); latency = the task body's first line
                    (CLOCK_MONOTONIC, system-wide on Linux) - the scheduled
                    send time, so a sender that falls behind is charged for
                    it (no coordinated omission). The task is the 3-step one;
                    every run must then complete with the right output.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

CAPS = (1, 16, 256)
STEP_COUNTS = (0, 1, 10, 100)
RATES = (10, 100, 1000)

# Names shared with bench/run.py and bench/kafka_bench.py, so rows merge.
SL_FULL = "stepline-sqlite FULL (fsync)"
SL_NORMAL = "stepline-sqlite NORMAL (no fsync)"
SL_KAFKA = "stepline-kafka"
DBOS_SQLITE = "dbos-sqlite"
DBOS_PG = "dbos-postgres"
CELERY = "celery-redis (AOF everysec)"
CELERY_ALWAYS = "celery-redis (AOF always)"
TEMPORAL = "temporal-devserver-sqlite"
RESTATE = "restate"

# What a completed step survives, per system AS CONFIGURED HERE. "kill -9"
# is the worker process (the one running the task) killed; "power loss" is
# whether the step's record was fsync'd before the next step could start.
DURABILITY: dict[str, dict[str, str]] = {
    SL_FULL: {
        "kill9": "yes", "power_loss": "yes",
        "how": "SQLite WAL, synchronous=FULL (the embedded log's default): a group "
               "commit is fsync'd before any of its checkpoints is acknowledged"},
    SL_NORMAL: {
        "kill9": "yes", "power_loss": "no",
        "how": "SQLite WAL, synchronous=NORMAL: committed to the OS before the step "
               "is acknowledged, fsync'd only at WAL checkpoints"},
    SL_KAFKA: {
        "kill9": "yes", "power_loss": "no",
        "how": "acks=all on a single-node broker with Kafka's default flush settings "
               "(page cache, no fsync per record; Kafka relies on replication, and "
               "this broker has one replica)"},
    DBOS_SQLITE: {
        "kill9": "yes", "power_loss": "yes",
        "how": "DBOS's own SQLite settings, left as shipped: rollback journal "
               "(journal_mode=DELETE), synchronous=FULL, one transaction per step"},
    DBOS_PG: {
        "kill9": "yes", "power_loss": "yes",
        "how": "PostgreSQL 15 defaults: fsync=on, synchronous_commit=on (WAL flushed "
               "at every commit), one transaction per step"},
    CELERY: {
        "kill9": "results kept; the run does not go on",
        "power_loss": "no (up to ~1 s of writes)",
        "how": "redis-server --appendonly yes --appendfsync everysec --save '': each "
               "finished task's result and the chain's next message are in the AOF (OS page "
               "cache) when written, fsync'd once a second. Celery's default early ack: the "
               "task running when its worker is killed is not redelivered, so the chain stops"},
    CELERY_ALWAYS: {
        "kill9": "results kept; the run does not go on",
        "power_loss": "yes (results and the next message)",
        "how": "as above with --appendfsync always: Redis fsyncs the AOF before "
               "replying to each write batch"},
    TEMPORAL: {
        "kill9": "yes", "power_loss": "yes",
        "how": "temporal server start-dev --db-filename (one SQLite file, one connection), no "
               "--sqlite-pragma: SQLite's defaults, rollback journal (read from the file header) "
               "and synchronous=FULL, so every history transaction (an activity's completion "
               "among them) is fsync'd before it is acknowledged; fsync calls per run counted "
               "with strace by the kill -9 check"},
    RESTATE: {
        "kill9": "yes", "power_loss": "yes",
        "how": "restate-server as shipped, one node (replication 1): a ctx.run result is "
               "journaled in the log (Bifrost's replicated loglet on the node's own "
               "log-server, RocksDB WAL with rocksdb-disable-wal-fsync=false, the default) "
               "before the handler goes on; fsync calls per run counted with strace by the "
               "kill -9 check"},
}


def pct(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, as bench/workloads.py computes it."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    if k == lo or math.isinf(s[hi]):  # inf marks a run that never started
        return s[lo] if k == lo else s[hi]
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency_metrics(ms: Sequence[float]) -> dict[str, float]:
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": pct(ms, 0.5), "p99_ms": pct(ms, 0.99),
            "p999_ms": pct(ms, 0.999), "mean_ms": statistics.fmean(ms),
            "min_ms": min(ms), "max_ms": max(ms)}


def slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares y = a + b x; returns (b, a)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return b, my - b * mx


def slope_row(system: str, p50s: dict[int, float], all_ok: bool, extra: dict[str, Any]) -> dict[str, Any]:
    if len(p50s) == len(STEP_COUNTS):
        b, a = slope([float(k) for k in p50s], list(p50s.values()))
        return row(system, "b_slope", {"steps": list(STEP_COUNTS), **extra}, all_ok, [], {
            "ms_per_step": b, "intercept_ms": a, "p50_ms_by_steps": p50s,
            "fit": "least squares over p50 at steps " + ",".join(map(str, p50s))})
    return row(system, "b_slope", {"steps": list(STEP_COUNTS), **extra}, False,
               ["a b_latency point failed; no slope"], {})


def sizes(quick: bool) -> dict[str, Any]:
    """How long each measurement lasts. Time-bounded rather than count-bounded
    for (a), so a system 50x slower than another still finishes in seconds;
    the warm-up is bounded both ways (count and time) for the same reason."""
    if quick:
        return {"a_seconds": 1.0, "a_max_runs": 3000, "a_warmup": {1: 3, 16: 16, 256: 256},
                "a_warmup_s": 0.3,
                "b_runs": {0: 8, 1: 8, 10: 5, 100: 2}, "b_warmup": 2,
                "c_seconds": {10: 1.5, 100: 1.0, 1000: 0.5}, "c_drain_s": 8.0,
                "timeout_s": 120.0}
    return {"a_seconds": 2.5, "a_max_runs": 20000, "a_warmup": {1: 10, 16: 64, 256: 256},
            "a_warmup_s": 0.5,
            "b_runs": {0: 40, 1: 40, 10: 20, 100: 6}, "b_warmup": 3,
            "c_seconds": {10: 4.0, 100: 3.0, 1000: 1.0}, "c_drain_s": 10.0,
            "timeout_s": 300.0}


def row(system: str, workload: str, params: dict[str, Any], ok: bool, errors: list[str],
        metrics: dict[str, Any], wall_s: float = 0.0) -> dict[str, Any]:
    """One result, in bench/run.py's schema (the orchestrator adds ts, rep, env)."""
    metrics = dict(metrics)
    metrics.setdefault("durability", DURABILITY.get(system, {}))
    return {"system": system, "workload": workload, "params": params, "ok": bool(ok),
            "errors": errors[:20], "metrics": metrics, "wall_s": round(wall_s, 3)}


def emit(r: dict[str, Any]) -> None:
    """Rows go to stdout, one JSON line each, marked so logs can share the stream."""
    print("ROW " + json.dumps(_finite(r), default=str, allow_nan=False), flush=True)


def _finite(o: Any) -> Any:
    """JSON has no inf/nan: they become null (a percentile that fell on a run
    that never started, a rate with nothing to divide)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def throughput_metrics(completed: int, triggered: int, elapsed: float) -> dict[str, Any]:
    return {"runs": triggered, "completed": completed, "elapsed_s": elapsed,
            "runs_per_s": completed / elapsed if elapsed > 0 else float("nan"),
            "completion_signal": "the run's output read back"}


class OpenLoop:
    """The schedule of an open-loop load: send i at t0 + i/rate."""

    def __init__(self, rate: float, seconds: float, t0: float | None = None) -> None:
        self.rate = rate
        self.n = max(1, round(rate * seconds))
        self.t0 = (t0 if t0 is not None else time.monotonic()) + 0.05

    def at(self, i: int) -> float:
        return self.t0 + i / self.rate


def start_latency_metrics(loop: OpenLoop, starts: dict[int, float], completed: int,
                          sent_late_ms: list[float]) -> dict[str, Any]:
    """Latency from each SCHEDULED send to the body's first line. Runs that never
    started are counted as +inf, so a saturated system's upper percentiles are
    reported as null instead of being silently left out."""
    ms = [(starts[i] - loop.at(i)) * 1000 if i in starts else math.inf for i in range(loop.n)]
    m: dict[str, Any] = {
        "rate_per_s": loop.rate, "sent": loop.n, "started": len(starts), "completed": completed,
        "p50_ms": pct(ms, 0.5), "p99_ms": pct(ms, 0.99), "p999_ms": pct(ms, 0.999),
        "max_ms": max(ms), "samples_for_p999": loop.n,
        "send_lag_p99_ms": pct(sent_late_ms, 0.99) if sent_late_ms else float("nan"),
        "measured_from": "scheduled send time",
    }
    if len(starts) > 1:
        first, last = min(starts.values()), max(starts.values())
        m["achieved_start_rate_per_s"] = (len(starts) - 1) / (last - first) if last > first else float("nan")
    return m


STALL_S = 2.0  # no completion for this long at the end of the drain: stalled, not busy


def drain_verdict(loop: OpenLoop, completed: int, last_progress: float, drain_s: float,
                  errors: list[str], m: dict[str, Any]) -> None:
    """A rate above what a system sustains leaves runs unfinished when the
    bounded drain ends: that is a measurement (overloaded, still completing
    runs), not an error. A system that stopped completing runs is an error."""
    missing = loop.n - completed
    m["not_completed_at_drain"] = missing
    m["overloaded"] = missing > 0
    if missing and time.monotonic() - last_progress > STALL_S:
        errors.append(f"stalled: {missing}/{loop.n} runs not completed {drain_s:.0f} s after the "
                      f"last send, none completed in the last {STALL_S:.0f} s")


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = fn()
    r["wall_s"] = round(time.perf_counter() - t0, 3)
    return r
