"""Admission overhead of a limited queue: from one run's slot release to the
next run's start, against the same workload with no admission at all.

    python bench/run.py --quick --no-kafka     # with the rest (--no-admission leaves it out)
    python bench/admission.py [--quick] [--kafka]   # this part alone, same JSONL and summary

N runs (300; 60 with --quick) of a one-step task, the step holding 1 ms, are
triggered up front by the bench's client; then a Worker on the same log is
started and every result awaited (closed loop: nothing new arrives while
they drain). Two ways to cap concurrency at L = 1 and 10 are measured in the
same repetition, on the same backend:

  by=queue   `sl.Queue(..., concurrency_limit=L)` on a worker of concurrency
             256: every start goes through the queues topic (SlotRequested,
             the owner's SlotGranted, its notice on the runs topic) and every
             end gives the slot back (SlotReleased) before RunCompleted.
  by=worker  an unlimited queue on a worker of concurrency L: no admission;
             the next run starts as soon as the previous attempt's outcome
             is durable and the worker has room.

The gap, read from the log after the run (event times are the worker's
clock, whole milliseconds):

  by=queue   SlotReleased of run A (queues topic) -> RunStarted of the run
             whose grant that release made possible (runs topic). Pairs come
             from the queue partition's own order: a release made while runs
             were waiting is queued, and each SlotGranted takes the oldest
             release not yet paired (a grant with none filled an empty slot:
             the first L).
  by=worker  RunCompleted of run A -> RunStarted of the run that took its
             place: the i-th completion with the (i+L)-th start, both in time
             order (one event loop starts exactly one run per completion).

At L = 1 both are simply "consecutive runs". As the millisecond clock is
coarse next to a sub-millisecond gap, the step also stamps its own entry and
exit with perf_counter, and `step_gap` (the i-th step exit -> the (i+L)-th
step entry, in time order, for both ways) gives the same comparison at
microsecond resolution; it includes the step's checkpoint and RunStarted,
common to both.

`ok` is correctness only, never timing: every run completed with its
output, and at most L runs were ever inside the step at once. The number of
gaps paired (N - L when the queue stayed saturated) is reported as `gaps`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kafka_bench
import workloads

import stepline as sl
from stepline.core import codec
from stepline.core.events import Event
from stepline.log.memory import forget_store
from stepline.log.topics import Topics
from stepline.projections.runs import COMPLETED

LIMITS = (1, 10)
BY = ("worker", "queue")  # worker first: the baseline, then the admission path
HOLD_S = 0.001  # inside the step, so that L runs can actually overlap at L = 10
TASK = "admitted"
QUEUE = "bench-admission"
SYSTEMS = {"sqlite": "stepline-sqlite FULL (fsync)", "memory": "stepline-memory",
           "kafka": "stepline-kafka"}
RESULT_TIMEOUT_S = 120.0


def sizes(quick: bool) -> dict[str, int]:
    return {"runs": 60 if quick else 300}


@dataclass
class Gauge:
    """Runs inside the step right now, the most ever, and when each entered
    and left it (perf_counter, s)."""

    now: int = 0
    peak: int = 0
    entered: list[float] = field(default_factory=list)
    left: list[float] = field(default_factory=list)


def admission_registry(gauge: Gauge, limit: int | None) -> sl.Registry:
    reg = sl.Registry()

    @sl.step
    async def hold(n: int) -> int:
        gauge.entered.append(time.perf_counter())
        gauge.now += 1
        gauge.peak = max(gauge.peak, gauge.now)
        try:
            await asyncio.sleep(HOLD_S)
        finally:
            gauge.now -= 1
            gauge.left.append(time.perf_counter())
        return n + 1

    @sl.task(id=TASK, registry=reg, queue=sl.Queue(QUEUE, concurrency_limit=limit))
    async def admitted(n: int) -> int:
        return await hold(n)

    return reg


# --- one measurement ---------------------------------------------------------


async def admission(url: str, limit: int, by: str, n: int) -> dict[str, Any]:
    gauge = Gauge()
    reg = admission_registry(gauge, limit if by == "queue" else None)
    concurrency = workloads.WORKER_CONCURRENCY if by == "queue" else limit
    sys.setswitchinterval(0.0005)  # as `stepline dev` / `stepline worker` set it
    errors: list[str] = []
    async with sl.Client(url, registry=reg, topics=Topics()) as client:
        # All triggered before any worker runs: the drain alone is measured.
        handles = await asyncio.gather(*(client.trigger(TASK, i) for i in range(n)))
        t0 = time.perf_counter()
        async with sl.Worker(reg, client.log, topics=client.topics, concurrency=concurrency,
                             client=client) as worker:
            outs = await asyncio.gather(*(h.result(timeout=RESULT_TIMEOUT_S) for h in handles),
                                        return_exceptions=True)
            wall = time.perf_counter() - t0
            # Also lets the worker close on a quiet log (see fanout.all_ended).
            completed = await all_ended(worker, n)
        runs = [ev async for _, _, ev in client.events()]
        queues = await read_topic(client.log, client.topics.queues)
    for i, out in enumerate(outs):
        if out != i + 1 and len(errors) < 10:
            errors.append(f"run {i}: {out!r}, want {i + 1}")
    if completed != n:
        errors.append(f"{completed} runs completed, want {n}")
    if gauge.peak > limit:
        errors.append(f"{gauge.peak} runs inside the step at once, limit {limit}")
    metrics = gap_metrics(by, limit, run_times(runs), queues, gauge)
    if not metrics["gaps"] or not metrics["step_gaps"]:
        errors.append("no end -> next start gap measured")
    return {"ok": not errors, "errors": errors, "metrics": {
        "runs": n, "completed": completed, "limit": limit, "worker_concurrency": concurrency,
        "peak_in_step": gauge.peak, "hold_ms": 1000 * HOLD_S, **metrics,
        "wall_s": wall, "worker_start_to_all_results_runs_per_s": n / wall,
    }}


def gap_metrics(by: str, limit: int, times: dict[str, dict[str, int]], queues: list[Event],
                gauge: Gauge) -> dict[str, Any]:
    if by == "queue":
        gaps, legs = queue_gaps(queues, times)
    else:
        gaps, legs = ordered_gaps([float(t) for t in sorted(times["RunCompleted"].values())],
                                  [float(t) for t in sorted(times["RunStarted"].values())], limit), {}
    step_gaps = ordered_gaps(sorted(gauge.left), sorted(gauge.entered), limit, to_ms=1000.0)
    span_ms = max(times["RunCompleted"].values(), default=0) - min(times["RunStarted"].values(), default=0)
    return {
        "gaps": len(gaps), "step_gaps": len(step_gaps),
        "gap_p50_ms": _pct(gaps, 0.5), "gap_p99_ms": _pct(gaps, 0.99),
        "gap_mean_ms": statistics.fmean(gaps) if gaps else None,
        "step_gap_p50_ms": _pct(step_gaps, 0.5), "step_gap_p99_ms": _pct(step_gaps, 0.99),
        "step_gap_mean_ms": statistics.fmean(step_gaps) if step_gaps else None,
        **legs,
        # First RunStarted -> last RunCompleted, as the log has them.
        "runs_per_s": len(times["RunCompleted"]) / (span_ms / 1000) if span_ms > 0 else None,
        "gap_from": "SlotReleased (queues topic)" if by == "queue" else "RunCompleted",
        "gap_to": "RunStarted (runs topic)", "clock": "event time, whole ms",
    }


async def all_ended(worker: sl.Worker, n: int, poll_s: float = 0.02) -> int:
    """Wait until `n` runs have ended; how many of them completed."""
    # Runs compacted to their ids (workloads._compacted) ended, and completed.
    while sum(not r.live for r in worker.runs().values()) + workloads._compacted(worker) < n:
        await asyncio.sleep(poll_s)
    return sum(r.status == COMPLETED for r in worker.runs().values()) + workloads._compacted(worker)


async def read_topic(log: Any, topic: str) -> list[Event]:
    """Every record of `topic` up to its ends now, in order within each partition."""
    out: list[Event] = []
    for p in range(await log.partitions(topic)):
        end, offset = await log.end_offset(topic, p), 0
        while offset < end:
            recs = [r for r in await log.read(topic, p, offset, 5000) if r.offset < end]
            if not recs:
                break
            out += [codec.decode(r.value) for r in recs]
            offset = recs[-1].offset + 1
    return out


def run_times(runs: list[Event]) -> dict[str, dict[str, int]]:
    """Per event type of interest, run id -> time of its first such event."""
    times: dict[str, dict[str, int]] = {"RunStarted": {}, "RunCompleted": {}, "SlotGranted": {}}
    for ev in runs:
        if ev.type in times:
            times[ev.type].setdefault(ev.run_id, ev.time)
    return times


def queue_gaps(queues: list[Event], times: dict[str, dict[str, int]]
               ) -> tuple[list[float], dict[str, float | None]]:
    """release -> next start, paired in the queue partition's order; and the
    mean of each leg: release -> the owner's grant -> its notice on the runs
    topic -> RunStarted."""
    waiting: set[str] = set()
    holders: set[str] = set()
    released: deque[int] = deque()  # releases with a run waiting for the slot
    gaps: list[float] = []
    legs: dict[str, list[float]] = {"decide": [], "notify": [], "start": []}
    for ev in queues:  # one queue, so one partition, in log order
        if ev.type == "SlotRequested" and ev.run_id not in holders:
            waiting.add(ev.run_id)
        elif ev.type == "SlotReleased":
            if ev.run_id in holders and waiting:
                released.append(ev.time)
            holders.discard(ev.run_id)
            waiting.discard(ev.run_id)
        elif ev.type == "SlotGranted" and ev.run_id in waiting:
            waiting.discard(ev.run_id)
            holders.add(ev.run_id)
            if not released:
                continue  # an empty slot filled: the first `limit` grants
            rel = released.popleft()
            started = times["RunStarted"].get(ev.run_id)
            notice = times["SlotGranted"].get(ev.run_id)
            if started is not None:
                gaps.append(float(started - rel))
            if started is not None and notice is not None:
                legs["decide"].append(float(ev.time - rel))
                legs["notify"].append(float(notice - ev.time))
                legs["start"].append(float(started - notice))
    return gaps, {f"leg_{k}_mean_ms": statistics.fmean(v) if v else None for k, v in legs.items()}


def ordered_gaps(ends: list[float], starts: list[float], limit: int, to_ms: float = 1.0) -> list[float]:
    """The i-th end (in time order) -> the (i + limit)-th start, in ms."""
    return [to_ms * (s - e) for e, s in zip(ends, starts[limit:])]


def _pct(xs: list[float], q: float) -> float | None:
    return workloads._pct(xs, q) if xs else None


# --- one repetition ------------------------------------------------------------

RunAsync = Callable[[Callable[[], Coroutine[Any, Any, dict[str, Any]]], float], dict[str, Any]]


@contextlib.contextmanager
def log_for(backend: str, tmp_root: str | None, bootstrap: str | None) -> Iterator[str]:
    """A fresh log of this backend, gone afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="stepline-bench-", dir=tmp_root) as d:
            yield workloads.log_url(d, "full")
    elif backend == "memory":
        store = f"bench-admission-{uuid.uuid4().hex}"
        try:
            yield f"memory://{store}"
        finally:
            forget_store(store)
    else:
        assert bootstrap is not None
        ns = kafka_bench.fresh_namespace("bench-adm")
        try:
            yield kafka_bench.log_url(bootstrap, ns)
        finally:
            asyncio.run(kafka_bench.delete_namespace(bootstrap, ns))


def one_rep(rec: Any, rep: int, sz: dict[str, int], tmp_root: str | None, timeout: float,
            run_async: RunAsync, bootstrap: str | None = None) -> None:
    backends = [b for b in SYSTEMS if b != "kafka" or bootstrap is not None]
    for backend in backends:
        for limit in LIMITS:
            rows: dict[str, dict[str, Any]] = {}
            for by in BY:
                with log_for(backend, tmp_root, bootstrap) as url:
                    t0 = time.perf_counter()
                    result = run_async(lambda u=url, lim=limit, b=by: admission(u, lim, b, sz["runs"]), timeout)
                    wall = time.perf_counter() - t0
                rows[by] = rec.add(SYSTEMS[backend], "q_admission", {"limit": limit, "by": by}, rep, result, wall)
            rec.add(SYSTEMS[backend], "q_ratio", {"limit": limit}, rep,
                    ratios(rows["queue"], rows["worker"]), 0.0)


def ratios(limited: dict[str, Any], unlimited: dict[str, Any]) -> dict[str, Any]:
    """How many times the no-admission figure the admission path takes."""
    if not (limited["ok"] and unlimited["ok"]):
        return {"ok": False, "errors": ["a q_admission point failed; no ratio"], "metrics": {}}
    m, base = limited["metrics"], unlimited["metrics"]
    out: dict[str, Any] = {}
    for key in ("gap_p50_ms", "gap_mean_ms", "step_gap_p50_ms", "step_gap_mean_ms", "runs_per_s"):
        a, b = m.get(key), base.get(key)
        # None when the baseline is 0: a p50 under the millisecond clock's tick.
        out[key.replace("_ms", "") + "_ratio"] = a / b if a is not None and b else None
    return {"ok": True, "errors": [], "metrics": out}


HEADLINES: dict[str, list[tuple[str, str, str]]] = {
    "q_admission": [("gap_p50_ms", "end -> next start p50 ms (log)", "{:.1f}"),
                    ("gap_p99_ms", "end -> next start p99 ms (log)", "{:.1f}"),
                    ("gap_mean_ms", "end -> next start mean ms (log)", "{:.2f}"),
                    ("step_gap_p50_ms", "step exit -> next entry p50 ms", "{:.2f}"),
                    ("runs_per_s", "runs/s", "{:,.0f}")],
    "q_ratio": [("gap_mean_ratio", "mean gap, queue ÷ worker", "{:.1f}"),
                ("gap_p50_ratio", "p50 gap, queue ÷ worker", "{:.1f}"),
                ("step_gap_p50_ratio", "step gap p50, queue ÷ worker", "{:.1f}"),
                ("runs_per_s_ratio", "runs/s, queue ÷ worker", "{:.2f}")],
}


def main(argv: list[str] | None = None) -> int:
    import run  # the benchmark's recorder and summary (run.py imports this module, not the reverse)

    ap = argparse.ArgumentParser(description="Stepline bench: queue admission overhead alone")
    ap.add_argument("--quick", action="store_true", help="1 rep, N=60")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--kafka", action=argparse.BooleanOptionalAction, default=False,
                    help="also on a Kafka broker (tests/kafka_broker.py; default off here)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    bootstrap = kafka_bench.get_broker() if args.kafka else None
    path = Path(args.out) / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-admission.jsonl"
    rec = run.Recorder(path, {"git": run._git_sha(), "quick": args.quick})
    for rep in range(1, reps + 1):
        one_rep(rec, rep, sizes(args.quick), args.tmpdir, 45.0 if args.quick else 300.0,
                run._run_async, bootstrap)
    run.print_summary(rec.rows, path)
    return 0 if all(r["ok"] for r in rec.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
