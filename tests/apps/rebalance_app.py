"""A three-step task for rebalance tests on Kafka, run by `stepline worker`.

Every step execution appends `run step pid` to `calls.log` (O_APPEND, one
write per line). While `hold` exists, step two parks, polling the file.
With REBALANCE_STUBBORN=1 step two ignores cancellation (it writes
`cancelled-<run>-<pid>` and keeps going): code that does not stop when its
worker loses the partition, and returns a result after that (writing
`returned-late-<run>-<pid>`).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import stepline as sl

STATE = Path(os.environ.get("REBALANCE_DIR", "."))
STUBBORN = os.environ.get("REBALANCE_STUBBORN") == "1"


def record(step: str) -> str:
    run = sl.idempotency_key().split(":")[0]
    fd = os.open(STATE / "calls.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{run} {step} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return run


@sl.step
async def one(n: int) -> int:
    record("one")
    return n * 2


@sl.step
async def two(n: int) -> dict:
    run = record("two")
    cancelled = False
    while (STATE / "hold").exists():
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if not STUBBORN:
                raise
            cancelled = True
            (STATE / f"cancelled-{run}-{os.getpid()}").touch()
    if cancelled:
        (STATE / f"returned-late-{run}-{os.getpid()}").touch()
    return {"value": n + 1, "pid": os.getpid()}


@sl.step
async def three(n: int) -> int:
    record("three")
    return n * 10


@sl.task(id="rebalance")
async def rebalance(payload: dict) -> dict:
    doubled = await one(payload["n"])
    middle = await two(doubled)
    return {"n": payload["n"], "result": await three(middle["value"]), "two_by": middle["pid"]}
