"""Workload f: one domain event fanned out to 1, 10 or 100 filtered subscriptions.

N no-op tasks subscribe to `bench.fan`, each with a declarative filter on
two fields of the event, `{"order": {"region": [R]}, "amount": [{"numeric":
[">=", j]}]}`; the first max(1, N // 2) ask for R = "eu", the rest for "us".
Every event has region "eu" and amount 1,000, so it starts exactly
max(1, N // 2) runs, and the other filters are evaluated and fail. Client
and Worker share one log and one event loop (as `stepline dev` runs them),
on sqlite FULL and on Kafka (a fresh namespace per N); the worker executes
the runs (concurrency 1,024). A delivery = a subscribed task's body
starting (its first line records time.monotonic()).

  latency     L events published one at a time, each after every delivery
              of the previous has started: publish-to-start = the task
              body's first line - just before `client.publish`; p50/p99
              over all deliveries
  throughput  E events published at once (500 publishes in flight), E x M
              = 5,000 deliveries (200 with --quick): deliveries/s from the
              first publish to the last delivery's start

`ok`: every (event, matching subscription) started exactly once, no
non-matching one ever did, and every run completed. Timings are never judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import kafka_bench
import workloads
import workloads_procs

import stepline as sl
from stepline.log.topics import Topics
from stepline.projections.runs import COMPLETED

EVENT = "bench.fan"
SUB_COUNTS = (1, 10, 100)
CONCURRENCY = 1024
PUBLISH_IN_FLIGHT = 500
WAIT_S = 60.0


def sizes(quick: bool) -> dict[str, int]:
    return {"latency_events": 10, "deliveries": 200} if quick else {"latency_events": 100, "deliveries": 5000}


def matching(n: int) -> int:
    return max(1, n // 2)


class Sink:
    """Where the subscribed tasks' bodies record their start."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.starts: dict[tuple[int, int], float] = {}
        self.repeats = 0
        self.per_event: Counter[int] = Counter()
        self.waiting: dict[int, asyncio.Event] = {}
        self.all_done = asyncio.Event()
        self.want_total = 0

    def record(self, i: int, j: int) -> None:
        t = time.monotonic()
        if (i, j) in self.starts:
            self.repeats += 1
            return
        self.starts[(i, j)] = t
        self.per_event[i] += 1
        if self.per_event[i] == self.m and i in self.waiting:
            self.waiting[i].set()
        if self.want_total and len(self.starts) >= self.want_total:
            self.all_done.set()


def registry(n: int, sink: Sink) -> sl.Registry:
    reg = sl.Registry()
    for j in range(n):
        region = "eu" if j < matching(n) else "us"

        def make(j: int) -> Any:
            async def deliver(event: dict[str, Any]) -> None:
                sink.record(int(event["i"]), j)

            return deliver

        where = {"order": {"region": [region]}, "amount": [{"numeric": [">=", j]}]}
        sl.task(id=f"sub-{j}", registry=reg, on=sl.Subscription(EVENT, where=where))(make(j))
    return reg


def event_data(i: int) -> dict[str, Any]:
    return {"i": i, "order": {"region": "eu", "id": f"ord-{i}"}, "amount": 1000}


@contextlib.asynccontextmanager
async def embedded(url: str, reg: sl.Registry) -> AsyncIterator[tuple[sl.Client, sl.Worker]]:
    sys.setswitchinterval(0.0005)  # as `stepline dev` / `stepline worker` set it
    async with sl.Client(url, registry=reg, topics=Topics()) as client:
        async with sl.Worker(reg, client.log, topics=client.topics, concurrency=CONCURRENCY,
                             client=client) as worker:
            yield client, worker


async def fanout(url: str, n: int, latency_events: int, deliveries: int) -> dict[str, Any]:
    m = matching(n)
    sink = Sink(m)
    reg = registry(n, sink)
    errors: list[str] = []
    n_tput = max(1, deliveries // m)
    lat_ms: list[float] = []
    async with embedded(url, reg) as (client, worker):
        # One event first, untimed: the router's first read, the tasks' first runs.
        base = 0
        for i in range(base, base + latency_events + 1):
            sink.waiting[i] = asyncio.Event()
            t_pub = time.monotonic()
            await client.publish(EVENT, event_data(i), key=f"e-{i}", source="bench")
            try:
                await asyncio.wait_for(sink.waiting[i].wait(), WAIT_S)
            except TimeoutError:
                raise TimeoutError(f"event {i}: {sink.per_event[i]}/{m} deliveries started "
                                   f"within {WAIT_S:.0f} s") from None
            if i > base:
                lat_ms += [1000 * (sink.starts[(i, j)] - t_pub) for j in range(m)]
        first = base + latency_events + 1
        sink.want_total = len(sink.starts) + n_tput * m
        cpu0, t0 = time.process_time(), time.monotonic()
        for s in range(first, first + n_tput, PUBLISH_IN_FLIGHT):
            await asyncio.gather(*(client.publish(EVENT, event_data(i), key=f"e-{i}", source="bench")
                                   for i in range(s, min(s + PUBLISH_IN_FLIGHT, first + n_tput))))
        publish_s = time.monotonic() - t0
        try:
            await asyncio.wait_for(sink.all_done.wait(), WAIT_S + n_tput * m / 100)
        except TimeoutError:
            errors.append(f"{len(sink.starts)}/{sink.want_total} deliveries started")
        cpu = time.process_time() - cpu0
        last = max((sink.starts[(i, j)] for i in range(first, first + n_tput) for j in range(m)
                    if (i, j) in sink.starts), default=float("nan"))
        elapsed = last - t0
        total = (first + n_tput - base) * m
        deadline = time.monotonic() + WAIT_S
        # Runs compacted to their ids (workloads._compacted) ended, and completed.
        while sum(1 for r in worker.runs().values() if r.status == COMPLETED) + workloads._compacted(worker) < total:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        completed = sum(1 for r in worker.runs().values() if r.status == COMPLETED) + workloads._compacted(worker)
        runs = len(worker.runs()) + workloads._compacted(worker)
    want = {(i, j) for i in range(base, first + n_tput) for j in range(m)}
    got = set(sink.starts)
    if got != want:
        errors.append(f"{len(want - got)} deliveries missing, {len(got - want)} unexpected "
                      f"(e.g. {sorted(got - want)[:3]})")
    if sink.repeats:
        errors.append(f"{sink.repeats} deliveries started twice")
    if completed != total or runs != total:
        errors.append(f"{runs} runs, {completed} completed; expected {total}")
    pct = workloads._pct
    return {"ok": not errors, "errors": errors, "metrics": {
        "subscriptions": n, "matching": m, "latency_events": latency_events,
        "throughput_events": n_tput, "deliveries": n_tput * m, "completed": completed, "runs": total,
        "publish_to_start_p50_ms": pct(lat_ms, 0.5), "publish_to_start_p99_ms": pct(lat_ms, 0.99),
        "publish_to_start_max_ms": max(lat_ms) if lat_ms else float("nan"),
        "latency_samples": len(lat_ms),
        "deliveries_per_s": n_tput * m / elapsed, "events_per_s": n_tput / elapsed,
        "publish_s": publish_s, "elapsed_s": elapsed,
        "cpu_us_per_delivery": 1e6 * cpu / max(n_tput * m, 1),
    }}


def one_rep(rec: Any, rep: int, sz: dict[str, int], tmp_root: str | None, timeout: float,
            run_async: Any, bootstrap: str | None, sqlite: bool = True) -> None:
    systems = ([workloads_procs.SQLITE] if sqlite else []) + ([workloads_procs.KAFKA] if bootstrap else [])
    for system in systems:
        for n in SUB_COUNTS:
            with tempfile.TemporaryDirectory(prefix="stepline-bench-", dir=tmp_root) as d:
                ns = kafka_bench.fresh_namespace("bench-f") if system == workloads_procs.KAFKA else ""
                url = kafka_bench.log_url(bootstrap, ns) if ns and bootstrap else workloads.log_url(d, "full")
                t0 = time.perf_counter()
                try:
                    result = run_async(lambda u=url, n=n: fanout(u, n, sz["latency_events"], sz["deliveries"]),
                                       timeout)
                finally:
                    if ns and bootstrap:
                        asyncio.run(kafka_bench.delete_namespace(bootstrap, ns))
                rec.add(system, "f_subscriptions", {"subscriptions": n, "matching": matching(n)}, rep, result,
                        time.perf_counter() - t0)


HEADLINES: dict[str, list[tuple[str, str, str]]] = {
    "f_subscriptions": [("deliveries_per_s", "deliveries/s (burst)", "{:,.0f}"),
                        ("events_per_s", "events/s (burst)", "{:,.0f}"),
                        ("publish_to_start_p50_ms", "publish -> start p50 ms (one at a time)", "{:.1f}"),
                        ("publish_to_start_p99_ms", "publish -> start p99 ms", "{:.1f}"),
                        ("cpu_us_per_delivery", "CPU µs/delivery", "{:,.0f}")],
}
