"""Profile workload (a) (3-step no-op task, closed loop) with pyinstrument.

    python bench/profile_a.py [--in-flight 256] [--runs 6000] [--mode full|normal]
                              [--workload a|b100] [--html FILE] [--switchinterval S]

pyinstrument samples the event-loop thread (where all the engine's Python
runs); the writer and reader threads of the sqlite log are measured by
their CPU time from /proc/self/task/*/stat, by thread name. Prints the
per-thread CPU split, the self-time of the loop thread grouped by area
(codec, fold, sqlite port, asyncio, pydantic, structlog, ...), the top
functions by self time, and the call tree.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sl_tasks  # noqa: E402
import workloads  # noqa: E402
from pyinstrument import Profiler  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user+sys) per live thread of this process, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = collections.defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
        name = names.get(int(tid), f"tid-{tid}")
        # Group pool threads: "asyncio_0" / "ThreadPoolExecutor-0_1" etc.
        if name.startswith("stepline-sqlite-writer"):
            name = "sqlite writer thread"
        elif int(tid) == threading.main_thread().native_id:
            name = "event loop (main) thread"
        else:
            name = "other threads (sqlite readers, to_thread pool)"
        out[name] += cpu
    return dict(out)


AREAS = [
    ("idle", "epoll.poll (waiting for I/O or another thread's wake-up)", ()),
    ("stepline/codec", "codec (Avro encode/decode)", ("engine/core/codec.py", "fastavro")),
    ("fold", "projection fold (projections/runs.py)", ("projections/",)),
    ("sqlite port", "sqlite log port, loop side (engine/log/)", ("engine/log/",)),
    ("appender", "appender (engine/log/appender.py)", ("engine/log/appender.py",)),
    ("worker", "worker (engine/runtime/worker.py, dispatch, timers)",
     ("engine/runtime/worker.py", "engine/runtime/dispatch.py", "engine/runtime/timers.py")),
    ("runner/context", "run context + runner (context.py, runner.py)",
     ("engine/sdk/context.py", "engine/runtime/runner.py")),
    ("client", "client + watcher (engine/client/_client.py)", ("engine/client/_client.py",)),
    ("payloads", "payload codec (payloads.py) + pydantic", ("engine/core/payloads.py", "pydantic")),
    ("ids/events", "ids + events dataclasses", ("engine/core/ids.py", "engine/core/events.py")),
    ("structlog", "structlog", ("structlog",)),
    ("bench", "load driver (bench/)", ("bench/",)),
    ("asyncio", "asyncio machinery (tasks, futures, selector, call_soon)",
     ("asyncio/", "selectors.py", "<built-in>")),
    ("stdlib", "other stdlib (dataclasses, contextvars, os...)", ("python3.11/",)),
]


def area_of(file_path: str | None) -> str:
    fp = file_path or ""
    for key, _, needles in AREAS:
        if any(n in fp for n in needles):
            return key
    return "other"


def walk(frame: Any, acc: dict[str, float], funcs: dict[tuple[str, str], float]) -> None:
    # total_self_time = own samples + those of synthetic [self] children.
    self_t = frame.total_self_time
    if self_t and not frame.is_synthetic:
        area = "idle" if frame.function in ("epoll.poll", "poll") else area_of(frame.file_path)
        acc[area] += self_t
        key = (frame.function or "?", f"{frame.file_path_short or '?'}:{frame.line_no or 0}")
        funcs[key] += self_t
    for child in frame.children:
        walk(child, acc, funcs)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix="stepline-prof-", dir=args.tmpdir)
    url = workloads.log_url(d, args.mode)
    async with workloads.embedded(url) as (client, worker):
        if args.workload == "a":
            task, expected = sl_tasks.noop3, sl_tasks.expected_noop3
        else:
            task, expected = sl_tasks.STEPS_TASKS[100], lambda x: sl_tasks.expected_steps(100, x)
        await workloads.drive(client, task, expected, min(512, args.runs), args.in_flight, base=10**9)
        cpu0, threads0, t0 = time.process_time(), thread_cpu(), time.perf_counter()
        profiler = Profiler(interval=args.interval, async_mode="disabled")
        if not args.no_profile:
            profiler.start()
        r = await workloads.drive(client, task, expected, args.runs, args.in_flight)
        if not args.no_profile:
            profiler.stop()
        elapsed, cpu, threads1 = time.perf_counter() - t0, time.process_time() - cpu0, thread_cpu()
    assert r.completed == args.runs and not r.errors, r.errors[:3]
    return {"profiler": profiler, "elapsed": elapsed, "cpu": cpu, "runs": r.completed,
            "threads": {k: threads1.get(k, 0) - threads0.get(k, 0) for k in threads1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-flight", type=int, default=256)
    ap.add_argument("--runs", type=int, default=6000)
    ap.add_argument("--mode", choices=("full", "normal"), default="full")
    ap.add_argument("--workload", choices=("a", "b100"), default="a")
    ap.add_argument("--interval", type=float, default=0.0005)
    ap.add_argument("--html", default=None)
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--switchinterval", type=float, default=None)
    ap.add_argument("--no-profile", action="store_true", help="only the per-thread CPU split, no sampling")
    args = ap.parse_args()
    if args.switchinterval:
        sys.setswitchinterval(args.switchinterval)
    res = asyncio.run(run(args))
    prof: Profiler = res["profiler"]
    session = prof.last_session
    print(f"workload {args.workload}, mode {args.mode}, in flight {args.in_flight}: "
          f"{res['runs']} runs in {res['elapsed']:.2f} s = {res['runs'] / res['elapsed']:,.0f} runs/s; "
          f"process CPU {res['cpu']:.2f} s ({res['cpu'] / res['elapsed']:.0%} of one core), "
          f"{1000 * res['cpu'] / res['runs']:.2f} CPU s per 1k runs")
    print("\nCPU by thread (from /proc):")
    total = sum(res["threads"].values()) or 1
    for name, s in sorted(res["threads"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:50} {s:7.2f} s  {s / total:5.1%}")

    if args.no_profile:
        return
    root = session.root_frame()
    acc: dict[str, float] = collections.defaultdict(float)
    funcs: dict[tuple[str, str], float] = collections.defaultdict(float)
    if root is not None:
        walk(root, acc, funcs)
    tot = sum(acc.values()) or 1
    print(f"\nEvent-loop thread, self time by area (pyinstrument, {tot:.2f} s sampled; "
          f"wall time, not CPU):")
    labels = {k: lbl for k, lbl, _ in AREAS}
    for area, s in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {labels.get(area, area):58} {s:7.2f} s  {s / tot:5.1%}")
    print(f"\nTop {args.top} functions by self time:")
    for (fn, where), s in sorted(funcs.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {s / tot:6.1%}  {fn:40} {where}")
    if args.html:
        Path(args.html).write_text(prof.output_html())
        print(f"\nHTML profile: {args.html}")
    print("\nCall tree (frames >= 2%):")
    print(prof.output_text(unicode=True, color=False, show_all=False, timeline=False,
                           processor_options={"filter_threshold": 0.02}))


if __name__ == "__main__":
    main()
