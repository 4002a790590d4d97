"""The task module tests/test_cluster_faults.py runs in its worker containers.

`cluster-order` runs STEPS slow steps. Each step body appends to the file
named by CLUSTER_RECORDS (on a volume the test reads from the host) a line
when it begins and one when it ends:

    begin|end <run_id>:<step> <hostname> <unix time>

so the test can tell every execution of every step, by whom and when, and
compare them with what the log accepted. The containers share the host's
clock (one kernel), so these times compare with the brokers' append times.
A step's output names the container that ran it and when: a zombie's late
checkpoint carries a different output from the accepted one, so the test
can see which of the two the fold kept.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import stepline as sl

RECORDS = os.environ.get("CLUSTER_RECORDS", "/records/steps.log")
STEP_SECONDS = float(os.environ.get("CLUSTER_STEP_SECONDS", "0.5"))
STEPS = 4
HOST = socket.gethostname()


def _record(kind: str, key: str) -> None:
    # One write() of one short line with O_APPEND: lines from the workers
    # never interleave.
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, f"{kind} {key} {HOST} {time.time():.3f}\n".encode())
    finally:
        os.close(fd)


@sl.step
async def stage(n: int) -> dict[str, object]:
    key = sl.idempotency_key()
    _record("begin", key)
    await asyncio.sleep(STEP_SECONDS)
    _record("end", key)
    return {"n": n, "by": HOST, "at": time.time()}


@sl.task(id="cluster-order", retry=sl.Retry(max_attempts=20, min_timeout=0.2, max_timeout=2.0))
async def cluster_order(order: int) -> list[str]:
    return [str((await stage(i))["by"]) for i in range(STEPS)]
