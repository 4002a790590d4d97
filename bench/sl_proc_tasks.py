"""Tasks for the process-level workloads (bench/workloads_procs.py), run by a
real `stepline worker bench/sl_proc_tasks.py` process.

Their side effects go to files in BENCH_STATE (a folder the benchmark
makes), one `os.write` per line on an O_APPEND descriptor, so lines from
the worker before and after a kill -9 are whole and ordered, and the page
cache keeps them when the process dies (no fsync needed: the machine does
not lose power here).

* `crash3` (workload d): step one, step two (blocks while BENCH_STATE/block
  exists), step three; each step's body writes `<step> <x> <pid> <time>`.
  Output x + 3.
* `sleeper` (workload g): sleeps until the payload's `wake_at_ms` (epoch ms,
  chosen by the driver), then one step that returns the time its body
  started. Output {"i": i, "started_ms": ...}.
* `noop3` (workload a, split into worker and driver processes): as in
  bench/sl_tasks.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from typing import Any

import stepline as sl

registry = sl.Registry()

_STATE = os.environ.get("BENCH_STATE", "")
_fd: int | None = None


def _line(text: str) -> None:
    global _fd
    if not _STATE:
        return
    if _fd is None:
        _fd = os.open(os.path.join(_STATE, "calls.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{text} {os.getpid()} {time.time():.6f}\n".encode())


# When the worker process has imported its app: the interpreter and the
# imports are behind it (startup cost apart from the engine's recovery).
_line("loaded -")


@sl.step
async def one(x: int) -> int:
    _line(f"one {x}")
    return x + 1


@sl.step
async def two(x: int) -> int:
    _line(f"two {x}")
    block = os.path.join(_STATE, "block")
    while os.path.exists(block):
        await asyncio.sleep(0.05)
    return x + 1


@sl.step
async def three(x: int) -> int:
    _line(f"three {x}")
    return x + 1


@sl.task(id="crash3", registry=registry)
async def crash3(x: int) -> int:
    y = await one(x)
    y = await two(y)
    return await three(y)


@sl.step
async def woke(i: int) -> float:
    return time.time() * 1000


@sl.task(id="sleeper", registry=registry)
async def sleeper(p: dict[str, Any]) -> dict[str, Any]:
    # The wake time is fixed by the driver, so lateness is measured against
    # a time known before the run started; the engine records
    # now + delay (within a millisecond of it) when the sleep is first reached.
    await sl.sleep(timedelta(milliseconds=max(0, int(p["wake_at_ms"]) - int(time.time() * 1000))))
    return {"i": p["i"], "started_ms": await woke(p["i"])}


@sl.step
async def step_a(x: int) -> int:
    return x + 1


@sl.step
async def step_b(x: int) -> int:
    return x + 1


@sl.step
async def step_c(x: int) -> int:
    return x + 1


@sl.task(id="noop3", registry=registry)
async def noop3(x: int) -> int:
    x = await step_a(x)
    x = await step_b(x)
    return await step_c(x)
