"""The task module tests/test_compose.py runs in the compose stack's workers and API.

`compose-order` runs three slow steps. Each step appends to the file named
by COMPOSE_RECORDS (on a volume the test reads) a line when its body begins
and one when it ends: `begin|end <run_id>:<step> <hostname> <unix time>`.
The hostname is the container's, so the test can tell which worker ran what:
a step cut off by a killed worker has a `begin` and no `end`; a completed
step executed once has exactly one `end`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import stepline as sl

RECORDS = os.environ.get("COMPOSE_RECORDS", "/records/steps.log")
STEP_SECONDS = float(os.environ.get("COMPOSE_STEP_SECONDS", "4"))
HOST = socket.gethostname()


def _record(kind: str, key: str) -> None:
    # One write() of one short line with O_APPEND: lines from the two
    # workers never interleave.
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, f"{kind} {key} {HOST} {time.time():.3f}\n".encode())
    finally:
        os.close(fd)


@sl.step
async def work(name: str) -> str:
    key = sl.idempotency_key()
    _record("begin", key)
    await asyncio.sleep(STEP_SECONDS)
    _record("end", key)
    return f"{name} by {HOST}"


@sl.task(id="compose-order")
async def compose_order(order: str) -> list[str]:
    return [await work(f"{order}/reserve"), await work(f"{order}/charge"), await work(f"{order}/ship")]
