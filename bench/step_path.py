"""Where one step's time goes, one run at a time (workload b, sqlite).

    python bench/step_path.py [--steps 100] [--runs 10] [--mode full|normal]

Timestamps five points of every step of a `steps`-step no-op task, one run
in flight, and prints the p50 and mean of each segment:

  StepStarted -> writer.submit   the step's events built, encoded, handed to the writer
  writer.submit -> BEGIN         the writer thread wakes and takes the batch
  BEGIN -> COMMIT                SQLite: the transaction and its fsync
  COMMIT -> deliver              the event loop wakes for the result
  deliver -> next StepStarted    the loop's work until the next step starts

The hooks wrap internals (the Appender, the writer thread, the log's
delivery): a measuring tool, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sl_tasks  # noqa: E402
import workloads  # noqa: E402

from stepline.core.events import StepCompleted, StepStarted  # noqa: E402
from stepline.log import appender as appender_mod  # noqa: E402
from stepline.log import sqlite as sqlite_mod  # noqa: E402
from stepline.log import sqlite_writer  # noqa: E402

MARKS: list[tuple[str, float]] = []


def install() -> None:
    pc = time.perf_counter
    submit, transaction = appender_mod.Appender.submit, sqlite_writer._Writer._transaction
    wsubmit, deliver = sqlite_writer._Writer.submit, sqlite_mod.SqliteLog._deliver

    def submit_(self: Any, event: Any, *a: Any, **k: Any) -> Any:
        if isinstance(event.body, (StepStarted, StepCompleted)):
            MARKS.append((type(event.body).__name__, pc()))
        return submit(self, event, *a, **k)

    def transaction_(self: Any, batch: Any) -> Any:
        MARKS.append(("begin", pc()))
        out = transaction(self, batch)
        MARKS.append(("commit", pc()))
        return out

    def wsubmit_(self: Any, op: Any) -> None:
        if isinstance(op, sqlite_writer._Append):
            MARKS.append(("wsubmit", pc()))
        wsubmit(self, op)

    def deliver_(self: Any, results: Any, written: Any) -> None:
        if written:
            MARKS.append(("deliver", pc()))
        deliver(self, results, written)

    appender_mod.Appender.submit = submit_  # type: ignore[method-assign]
    sqlite_writer._Writer._transaction = transaction_  # type: ignore[method-assign]
    sqlite_writer._Writer.submit = wsubmit_  # type: ignore[method-assign]
    sqlite_mod.SqliteLog._deliver = deliver_  # type: ignore[method-assign]


SEGMENTS = ("StepStarted -> writer.submit", "writer.submit -> BEGIN", "BEGIN -> COMMIT",
            "COMMIT -> deliver", "deliver -> next StepStarted")


def segments() -> dict[str, list[float]]:
    seg: dict[str, list[float]] = {k: [] for k in SEGMENTS}
    last: dict[str, float] = {}
    for kind, t in MARKS:
        if kind == "StepStarted":
            if "deliver" in last and "ss" in last and last["deliver"] > last["ss"]:
                seg[SEGMENTS[4]].append(t - last["deliver"])
            last["ss"] = t
        elif kind == "wsubmit" and "ss" in last:
            seg[SEGMENTS[0]].append(t - last["ss"])
            last["wsubmit"] = t
        elif kind == "begin" and "wsubmit" in last:
            seg[SEGMENTS[1]].append(t - last["wsubmit"])
            last["begin"] = t
        elif kind == "commit" and "begin" in last:
            seg[SEGMENTS[2]].append(t - last["begin"])
            last["commit"] = t
        elif kind == "deliver" and "commit" in last:
            seg[SEGMENTS[3]].append(t - last["commit"])
            last["deliver"] = t
    return seg


async def run(steps: int, runs: int, mode: str) -> tuple[float, float]:
    task = sl_tasks.STEPS_TASKS[steps]
    expected = lambda x: sl_tasks.expected_steps(steps, x)  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        async with workloads.embedded(workloads.log_url(d, mode)) as (client, _worker):
            await workloads.drive(client, task, expected, 3, 1, base=10**9)
            MARKS.clear()
            cpu0, t0 = time.process_time(), time.perf_counter()
            r = await workloads.drive(client, task, expected, runs, 1)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert r.completed == runs and not r.errors, r.errors[:3]
    return wall / (runs * steps), cpu / (runs * steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, choices=sorted(sl_tasks.STEPS_TASKS))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--mode", choices=("full", "normal"), default="full")
    args = ap.parse_args()
    install()
    wall, cpu = asyncio.run(run(args.steps, args.runs, args.mode))
    print(f"{args.steps}-step runs, one at a time, {args.mode}: per step {wall * 1e3:.3f} ms wall, "
          f"{cpu * 1e3:.3f} ms CPU (all threads)")
    for name, xs in segments().items():
        if xs:
            print(f"  {name:30} n={len(xs):5d}  p50 {statistics.median(xs) * 1e6:7.1f} µs  "
                  f"mean {statistics.fmean(xs) * 1e6:7.1f} µs")


if __name__ == "__main__":
    main()
