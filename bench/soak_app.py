"""The task the soak test's worker processes run (`bench/soak.py`).

    stepline worker bench/soak_app.py --log URL

`soak` awaits three steps; each sleeps 1-20 ms and then fails with
probability SOAK_FAIL_RATE (an ordinary exception, so the retry policy
retries it: four attempts, 10-100 ms apart, after which the run is
dead-lettered). A payload with `"sleep": true` also sleeps durably for
0.1 s between the first and the second step; the driver decides that, not
this module, because the journal positions of a replayed attempt must not
change.

Every execution of a step appends one line to the file SOAK_EXECUTIONS
*before* the step does any work:

    <run id> <journal position> <attempt> <time ms> <pid>

with one `write(2)` on an `O_APPEND` descriptor, so a line is either wholly
in the file or not at all, lines from several worker processes never
interleave, and an execution cut short by SIGKILL is still counted (the
kernel holds the data; no fsync is needed when only processes die). The
time is `int(time.time() * 1000)`, the same clock and rounding as an
event's `time`, so the driver can compare it with the StepCompleted that
checkpointed the step.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import time

import stepline as sl
from stepline.sdk.context import current_run

registry = sl.Registry()

RETRY = sl.Retry(max_attempts=4, min_timeout=0.01, max_timeout=0.1)


class InjectedFailure(Exception):
    """The failure the soak injects; retriable like any ordinary exception."""


@functools.cache
def _executions_fd() -> int:
    # Opened on first use, not at import: importing this module has no effects.
    path = os.environ["SOAK_EXECUTIONS"]
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@functools.cache
def _fail_rate() -> float:
    return float(os.environ.get("SOAK_FAIL_RATE", "0"))


def _record_execution() -> None:
    ctx = current_run()
    run_id, _, position = sl.idempotency_key().rpartition(":")
    attempt = ctx.attempt if ctx is not None else 0
    line = f"{run_id} {position} {attempt} {int(time.time() * 1000)} {os.getpid()}\n"
    os.write(_executions_fd(), line.encode())


async def _work(x: int) -> int:
    _record_execution()
    await asyncio.sleep(random.uniform(0.001, 0.020))
    if random.random() < _fail_rate():
        raise InjectedFailure(f"injected failure (rate {_fail_rate()})")
    return x + 1


@sl.step
async def step_one(x: int) -> int:
    return await _work(x)


@sl.step
async def step_two(x: int) -> int:
    return await _work(x)


@sl.step
async def step_three(x: int) -> int:
    return await _work(x)


@sl.task(id="soak", registry=registry, retry=RETRY)
async def soak(payload: dict) -> dict:
    """{"i": n, "sleep": bool} -> {"i": n, "out": n + 3}."""
    x = await step_one(payload["i"])
    if payload.get("sleep"):
        await sl.sleep(0.1)
    x = await step_two(x)
    x = await step_three(x)
    return {"i": payload["i"], "out": x}
