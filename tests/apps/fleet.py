"""A three-step task for multi-worker tests on Kafka, run by `stepline worker`.

Every step execution appends one line `run step pid` to `calls.log`
(O_APPEND, one write per line, so lines from several processes never
interleave). While `hold` exists, step two parks after writing
`held-<run>`, so a test can stop or kill a worker with work in flight.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import stepline as sl

STATE = Path(os.environ.get("FLEET_DIR", "."))
PAUSE = float(os.environ.get("FLEET_STEP_SECONDS", "0.02"))


def record(run: str, step: str) -> None:
    fd = os.open(STATE / "calls.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{run} {step} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


@sl.step
async def one(n: int) -> int:
    record(sl.idempotency_key().split(":")[0], "one")
    return n * 2


@sl.step
async def two(n: int) -> dict:
    run = sl.idempotency_key().split(":")[0]
    record(run, "two")
    await asyncio.sleep(PAUSE)
    while (STATE / "hold").exists():
        (STATE / f"held-{run}").touch()
        await asyncio.sleep(0.05)
    return {"value": n + 1, "pid": os.getpid()}


@sl.step
async def three(n: int) -> int:
    record(sl.idempotency_key().split(":")[0], "three")
    return n * 10


@sl.task(id="fleet", retry=sl.Retry(max_attempts=3, min_timeout=0.1))
async def fleet(payload: dict) -> dict:
    doubled = await one(payload["n"])
    middle = await two(doubled)
    return {"n": payload["n"], "result": await three(middle["value"]), "two_by": middle["pid"]}
