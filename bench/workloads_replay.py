"""Workload e: rebuild the worker's run projection from a long log.

    python bench/run.py --only e_replay [--quick] [--no-kafka]
    python bench/workloads_replay.py rebuild URL fold|decode|read   # one pass, JSON on stdout

Setup, not timed: E events (1,000,000; 20,000 with --quick) written straight
to the log with the codec and `log.append` in large batches. They are
copies of one real run of the three-step no-op task (its 9 events, as a
worker wrote them on memory://), each copy with its own run id, event
ids and times, spread over the partitions by run id as the engine does.

The rebuild is what a worker does when it takes over a partition with no
snapshot: `Worker._catch_up` on a fresh `PartitionRuns`, i.e. `log.read`
in batches of the worker's read_batch, `codec.decode`, and the fold. Each
pass runs in a fresh process (pinned to CPU 0 when taskset is there), so
its peak RSS (VmHWM from /proc/self/status) is the rebuild's own:

  fold    the rebuild itself: events/s, peak RSS, RSS held per run
  decode  read + decode only, the engine's generated decoder
  fastavro read + fastavro's schemaless_reader on the same records: the
          peer the rebuild is measured against (vs_fastavro = fold ÷ this)
  read    read only

A worker compacts runs that ended for good (`Worker(keep_ended=...)`, 2,000
offsets by default): the rebuild keeps only their ids, and decodes none of
the events of a run that ends and leaves that window within the rebuild
(projections/catchup.py); the runs it holds are the whole ones plus those
ids.

Correctness decides `ok`: the fold holds every generated run, completed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fastavro

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import kafka_bench  # noqa: E402
import sl_tasks  # noqa: E402
import workloads  # noqa: E402
import workloads_procs  # noqa: E402

import stepline as sl  # noqa: E402
from stepline.core import codec  # noqa: E402
from stepline.core.events import Event  # noqa: E402
from stepline.core.ids import new_event_id, new_run_id  # noqa: E402
from stepline.log.base import partition_for  # noqa: E402
from stepline.projections.runs import COMPLETED, PartitionRuns  # noqa: E402

MODES = ("read", "decode", "fastavro", "fold")
EVENTS_PER_RUN = 9
APPEND_BATCH = 20_000


def sizes(quick: bool) -> dict[str, Any]:
    # --quick checks the result only: the fold pass, in this process.
    if quick:
        return {"events": 20_000, "modes": ("fold",), "isolated": False}
    return {"events": 1_000_000, "modes": MODES, "isolated": True}


async def template() -> list[Event]:
    """The events of one real run of the three-step task, in order."""
    from stepline.log.memory import forget_store

    store = f"bench-replay-{os.getpid()}-{time.monotonic_ns()}"
    try:
        async with workloads.embedded(f"memory://{store}") as (client, _):
            h = await sl_tasks.noop3.trigger(1, client=client)
            await h.result(timeout=30)
            events = [ev for _, ev in await client.history(h.run_id)]
    finally:
        forget_store(store)
    if len(events) != EVENTS_PER_RUN:
        raise RuntimeError(f"the template run has {len(events)} events, expected {EVENTS_PER_RUN}: "
                           f"{[e.type for e in events]}")
    return events


async def generate(url: str, n_events: int) -> dict[str, Any]:
    """Append ceil(n_events / 9) runs' events; (runs, records, seconds)."""
    tpl = await template()
    t0 = time.perf_counter()
    runs = -(-n_events // EVENTS_PER_RUN)
    base = tpl[0].time
    start_ms = int(time.time() * 1000) - runs  # one run per ms, ending now
    records = 0
    async with sl.Client(url) as client:
        log, topic = client.log, client.topics.runs
        nparts = await log.partitions(topic)
        pending: dict[int, list[tuple[bytes, bytes]]] = {}
        queued = 0
        for k in range(runs):
            at = start_ms + k
            rid = new_run_id(at)
            key = rid.encode()
            batch = pending.setdefault(partition_for(key, nparts), [])
            for ev in tpl:
                batch.append((key, codec.encode(dataclasses.replace(
                    ev, event_id=new_event_id(), run_id=rid, time=at + ev.time - base))))
            queued += EVENTS_PER_RUN
            if queued >= APPEND_BATCH or k == runs - 1:
                await asyncio.gather(*(log.append(topic, p, recs) for p, recs in pending.items()))
                records += queued
                pending, queued = {}, 0
    return {"runs": runs, "records": records, "generate_s": time.perf_counter() - t0}


# --- one pass, in its own process ------------------------------------------------


async def one_pass(url: str, mode: str) -> dict[str, Any]:
    async with sl.Client(url) as client:
        log, topic = client.log, client.topics.runs
        nparts = await log.partitions(topic)
        worker = sl.Worker(sl.Registry(), log, topics=client.topics)
        ends = [await log.end_offset(topic, p) for p in range(nparts)]
        rss0 = workloads_procs.rss_kb(os.getpid())
        cpu0, t0 = time.process_time(), time.perf_counter()
        events = runs = completed = 0
        parts: list[PartitionRuns] = []
        fa_schema = codec._default()._schema
        for p, end in enumerate(ends):
            if mode == "fold":
                # The worker's own rebuild: read, decode, fold.
                part = PartitionRuns(p, keep_ended=worker._partitions.keep_ended)
                await worker._catch_up(part, end)
                parts.append(part)
                events += part.next_offset
                continue
            offset = 0
            while offset < end:
                recs = await log.read(topic, p, offset, worker._read_batch)
                if not recs:
                    continue
                offset = recs[-1].offset + 1
                events += len(recs)
                if mode == "decode":
                    for r in recs:
                        codec.decode(r.value)
                elif mode == "fastavro":
                    for r in recs:
                        buf = io.BytesIO(r.value)
                        buf.seek(10)  # the single-object header
                        fastavro.schemaless_reader(buf, fa_schema, None)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        for part in parts:
            # Compacted runs are ended for good: completed, in this log.
            runs += len(part.runs) + len(part.ended)
            completed += sum(1 for st in part.runs.values() if st.status == COMPLETED) + len(part.ended)
        rss1 = workloads_procs.rss_kb(os.getpid())
        peak = workloads_procs.peak_rss_kb(os.getpid())
    return {"mode": mode, "events": events, "records": sum(ends), "runs": runs, "completed": completed,
            "elapsed_s": elapsed, "cpu_s": cpu, "rss_before_kb": rss0, "rss_after_kb": rss1,
            "peak_rss_kb": peak, "read_batch": worker._read_batch}


def run_pass(url: str, mode: str, timeout: float) -> dict[str, Any]:
    pin = ["taskset", "-c", str(workloads_procs.WORKER_CPU)] if workloads_procs.pinning()["pinned"] else []
    proc = subprocess.run([*pin, sys.executable, str(Path(__file__).resolve()), "rebuild", url, mode],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"rebuild pass {mode} exited {proc.returncode}: {proc.stderr[-1500:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["pinned_cpu"] = workloads_procs.WORKER_CPU if pin else None
    return out


async def replay(url: str, n_events: int, timeout: float, modes: tuple[str, ...] = MODES,
                 isolated: bool = True) -> dict[str, Any]:
    gen = await generate(url, n_events)
    passes = {}
    for mode in modes:
        passes[mode] = (await asyncio.to_thread(run_pass, url, mode, timeout) if isolated
                        else await one_pass(url, mode))
    fold = passes["fold"]
    errors = []
    if fold["events"] != gen["records"] or fold["records"] != gen["records"]:
        errors.append(f"folded {fold['events']} of {fold['records']} records, generated {gen['records']}")
    if fold["runs"] != gen["runs"] or fold["completed"] != gen["runs"]:
        errors.append(f"the fold holds {fold['runs']} runs, {fold['completed']} completed; "
                      f"generated {gen['runs']}")
    for mode in set(modes) - {"fold"}:
        if passes[mode]["events"] != gen["records"]:
            errors.append(f"{mode} pass saw {passes[mode]['events']} of {gen['records']} records")
    m: dict[str, Any] = {
        "events": gen["records"], "runs": gen["runs"], "completed": fold["completed"],
        "generate_s": gen["generate_s"],
        "events_per_s": fold["events"] / fold["elapsed_s"],
        "events_per_cpu_s": fold["events"] / max(fold["cpu_s"], 1e-9),
        "elapsed_s": fold["elapsed_s"],
        "peak_rss_kb": fold["peak_rss_kb"],
        "rss_held_per_run_bytes": (fold["rss_after_kb"] - fold["rss_before_kb"]) * 1024 / max(fold["runs"], 1),
        "passes": passes, "aim_events_per_s": 100_000, "own_process": isolated,
        "what": "Worker._catch_up over every partition from offset 0, fresh process per pass",
    }
    for mode in set(modes) - {"fold"}:
        m[f"{mode}_events_per_s"] = passes[mode]["events"] / passes[mode]["elapsed_s"]
        m[f"{mode}_peak_rss_kb"] = passes[mode]["peak_rss_kb"]
    m["vs_aim"] = m["events_per_s"] / 100_000
    if "fastavro" in passes:
        m["vs_fastavro"] = m["events_per_s"] / m["fastavro_events_per_s"]
    return {"ok": not errors, "errors": errors, "metrics": m}


def one_rep(rec: Any, rep: int, sz: dict[str, int], tmp_root: str | None, timeout: float,
            run_async: Any, bootstrap: str | None, sqlite: bool = True) -> None:
    systems = ([workloads_procs.SQLITE] if sqlite else []) + ([workloads_procs.KAFKA] if bootstrap else [])
    for system in systems:
        with tempfile.TemporaryDirectory(prefix="stepline-bench-", dir=tmp_root) as d:
            ns = kafka_bench.fresh_namespace("bench-e") if system == workloads_procs.KAFKA else ""
            # Setup writes without fsync; the rebuild only reads.
            url = (kafka_bench.log_url(bootstrap, ns) if ns and bootstrap
                   else workloads.log_url(d, "normal"))
            t0 = time.perf_counter()
            try:
                result = run_async(lambda u=url: replay(u, sz["events"], timeout, sz["modes"], sz["isolated"]),
                                   timeout)
            finally:
                if ns and bootstrap:
                    asyncio.run(kafka_bench.delete_namespace(bootstrap, ns))
            rec.add(system, "e_replay", {"events": sz["events"], "projection": "worker runs (PartitionRuns)"},
                    rep, result, time.perf_counter() - t0)


HEADLINES: dict[str, list[tuple[str, str, str]]] = {
    "e_replay": [("events_per_s", "events/s rebuilt (aim ≥ 100,000)", "{:,.0f}"),
                 ("fastavro_events_per_s", "events/s read + fastavro decode (peer)", "{:,.0f}"),
                 ("vs_fastavro", "rebuild ÷ fastavro decode, same records", "{:.2f}x"),
                 ("events_per_cpu_s", "events per CPU s", "{:,.0f}"),
                 ("decode_events_per_s", "events/s read + decoded (ceiling)", "{:,.0f}"),
                 ("read_events_per_s", "events/s read only", "{:,.0f}"),
                 ("peak_rss_kb", "peak RSS KiB", "{:,.0f}"),
                 ("rss_held_per_run_bytes", "RSS bytes held per run", "{:,.0f}")],
}


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "rebuild" and argv[3] in MODES:
        print(json.dumps(asyncio.run(one_pass(argv[2], argv[3]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
