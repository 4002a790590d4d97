"""A three-step task for `stepline worker --processes N` tests (tests/test_processes.py).

Every step execution appends `<step> <key> <pid>` to `calls.log` (one
O_APPEND write, fsynced), so the test counts executions per step across
processes and knows which process ran each. While the `block` file exists,
step two parks after announcing itself (`in-two-<key>`).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import stepline as sl

STATE = Path(os.environ.get("PROCS_DIR", "."))


def mark(name: str, key: str) -> None:
    fd = os.open(STATE / "calls.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{name} {key} {os.getpid()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@sl.step
async def step_one(key: str) -> str:
    mark("one", key)
    return key


@sl.step
async def step_two(key: str) -> str:
    mark("two", key)
    if (STATE / "block").exists():
        (STATE / f"in-two-{key}").touch()
        while (STATE / "block").exists():
            await asyncio.sleep(0.05)
    return key


@sl.step
async def step_three(key: str) -> str:
    mark("three", key)
    return key.upper()


@sl.task(id="procs")
async def procs(payload: dict) -> dict:
    key = await step_one(payload["key"])
    await step_two(key)
    return {"key": await step_three(key), "by": os.getpid()}


@sl.task(id="serial", queue=sl.Queue("serial", concurrency_limit=1))
async def serial(payload: dict) -> dict:
    """One at a time across every process (the queues group's owner grants the slot)."""
    mark("start", payload["key"])
    await asyncio.sleep(0.02)
    mark("end", payload["key"])
    return {"by": os.getpid()}
