"""Tasks for the health, metrics and autoscaling tests (tests/test_ops_metrics.py),
run by `stepline worker` in a child process.

* `ok`: two steps, completes.
* `boom`: fails at once, no retry: failed and dead-lettered.
* `flaky`: fails its first attempt, completes on the second (one retry).
* `dozy`: sleeps an hour (the sleeping gauge).
* `gated`: its step waits while the file `$OPS_DIR/gate` exists (runs stay running).
* `hog`: blocks the event loop for 7 s (the liveness check).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import stepline as sl

STATE = Path(os.environ.get("OPS_DIR", "."))


@sl.step
async def add(a: int, b: int) -> int:
    return a + b


@sl.task(id="ok")
async def ok(payload: dict) -> int:
    one = await add(payload["n"], 1)
    return await add(one, 1)


@sl.task(id="boom", retry=sl.Retry(max_attempts=1))
async def boom(payload: dict) -> None:
    raise ValueError("boom")


@sl.step
async def first_fails(key: str) -> str:
    marker = STATE / f"tried-{key}"
    if not marker.exists():
        marker.touch()
        raise RuntimeError("first attempt fails")
    return "fine"


@sl.task(id="flaky", retry=sl.Retry.fixed_delay(0.1, max_attempts=3))
async def flaky(payload: dict) -> str:
    return await first_fails(payload["key"])


@sl.task(id="dozy")
async def dozy(payload: dict) -> None:
    await sl.sleep(3600)


@sl.step
async def wait_for_gate(n: int) -> int:
    while (STATE / "gate").exists():
        await asyncio.sleep(0.05)
    return n


@sl.task(id="gated")
async def gated(payload: dict) -> int:
    return await wait_for_gate(payload["n"])


@sl.task(id="hog")
async def hog(payload: dict) -> None:
    (STATE / "hogging").touch()
    time.sleep(7)  # noqa: ASYNC251 - on purpose: the loop is stuck, /healthz must say so
