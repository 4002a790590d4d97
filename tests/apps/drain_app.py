"""Tasks for the graceful-drain tests (tests/test_drain.py), run by `stepline
worker`, `stepline dev` or an in-process Worker.

Every step execution appends one line `run step pid` to `calls.log` in
DRAIN_DIR (O_APPEND, one write per line: lines from several processes never
interleave), so a test sees which process executed which step, and how
often. `slow` then sleeps DRAIN_STEP_SECONDS (default 2).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import stepline as sl

registry = sl.Registry()



def pause() -> float:
    return float(os.environ.get("DRAIN_STEP_SECONDS", "2"))


def record(step: str) -> None:
    # Read when called: in-process tests set DRAIN_DIR after the import.
    run = sl.idempotency_key().split(":")[0]
    fd = os.open(Path(os.environ.get("DRAIN_DIR", ".")) / "calls.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{run} {step} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


@sl.step
async def slow(n: int) -> int:
    record("slow")
    await asyncio.sleep(pause())
    return n + 1


@sl.step
async def slow_too(n: int) -> int:
    record("slow_too")
    await asyncio.sleep(pause() / 2)
    return n + 2


@sl.step
async def after(n: int) -> int:
    record("after")
    return n * 10


@sl.task(id="drain", registry=registry)
async def drain(payload: dict) -> dict:
    value = await slow(payload["n"])
    return {"result": await after(value), "after_by": os.getpid()}


@sl.task(id="drain-isolated", registry=registry, isolation="process")
async def drain_isolated(payload: dict) -> dict:
    value = await slow(payload["n"])
    return {"result": await after(value), "after_by": os.getpid()}


@sl.task(id="drain-gather", registry=registry)
async def drain_gather(payload: dict) -> dict:
    # Two steps in parallel: a drain lets both finish before the run stops.
    a, b = await asyncio.gather(slow(payload["n"]), slow_too(payload["n"]))
    return {"result": await after(a + b), "after_by": os.getpid()}
