"""A task that emits records to a Kafka topic, run by `stepline worker`
in tests/test_emit.py.

EMIT_TOPIC names the topic; EMIT_COUNT how many records the step emits.
With EMIT_HOLD_DIR set, every transaction stops after its records are on
the broker and before it commits, writing `held` there first: the test
then kills the process with the transaction open. Each execution of the
step appends a line to `calls.log` in EMIT_STATE_DIR.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import stepline as sl
from stepline.log.kafka_txn import TransactionalWriters

TOPIC = os.environ.get("EMIT_TOPIC", "emitted")
COUNT = int(os.environ.get("EMIT_COUNT", "3"))
STATE = Path(os.environ.get("EMIT_STATE_DIR", "."))
HOLD = os.environ.get("EMIT_HOLD_DIR")


async def _hold(topic: str, partition: int) -> None:
    assert HOLD is not None
    (Path(HOLD) / "held").touch()
    await asyncio.Event().wait()  # until the test kills the process


if HOLD:
    TransactionalWriters.before_commit = _hold


@sl.step
async def announce(order: str) -> int:
    with (STATE / "calls.log").open("a") as f:
        f.write(f"{order} {os.getpid()}\n")
    for i in range(COUNT):
        await sl.emit(TOPIC, {"order": order, "i": i}, key=order)
    return COUNT


@sl.task(id="announce", retry=sl.Retry(max_attempts=3, min_timeout=0.1))
async def announce_task(payload: dict) -> dict:
    return {"emitted": await announce(payload["order"])}
