"""A three-step task for crash tests, run by `stepline worker` in a child process.

Every step execution is appended to `calls.log` (fsynced), so the test can
count executions across processes. While the `block` file exists, step two
parks forever after announcing itself, which is where the test kills the
worker.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import stepline as sl

STATE = Path(os.environ.get("CRASHY_DIR", "."))


def mark(name: str, key: str) -> None:
    with open(STATE / "calls.log", "a") as f:
        f.write(f"{name} {key}\n")
        f.flush()
        os.fsync(f.fileno())


@sl.step
async def step_one(order_id: str) -> dict:
    mark("one", order_id)
    return {"id": order_id, "total": 30}


@sl.step
async def step_two(order: dict) -> str:
    mark("two", order["id"])
    if (STATE / "block").exists():
        (STATE / f"in-two-{order['id']}").touch()
        await asyncio.sleep(3600)
    return f"charged {order['total']} for {order['id']}"


@sl.step
async def step_three(receipt: str) -> str:
    mark("three", receipt.rsplit(" ", 1)[-1])
    return receipt.upper()


@sl.task(id="crashy")
async def crashy(payload: dict) -> dict:
    order = await step_one(payload["order_id"])
    receipt = await step_two(order)
    confirmation = await step_three(receipt)
    return {"order": order["id"], "confirmation": confirmation}
