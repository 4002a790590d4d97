"""A checkout with a retry and a durable sleep, for the history and replay tests.

Every step appends a line to the ledger file the payload names, so a test
can see which step bodies ran. `charge` fails the first time it finds no
ledger line of its own (a card network timing out), so each run records
StepFailed and RetryScheduled, then sleeps, then writes its receipt.

The replay tests load edited copies of this file; it keeps its tasks in its
own registry so that copies can be loaded side by side.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

import stepline as sl

registry = sl.Registry()


class Order(BaseModel):
    ledger: str  # a file path
    amount: int
    nap: float = 0.2  # seconds of durable sleep between the charge and the receipt


def _append(ledger: str, line: str) -> list[str]:
    path = Path(ledger)
    before = path.read_text().splitlines() if path.exists() else []
    with path.open("a") as f:
        f.write(line + "\n")
    return before


@sl.step
async def price(ledger: str, amount: int) -> int:
    _append(ledger, f"price {amount}")
    return amount * 100


@sl.step
async def charge(ledger: str, cents: int) -> str:
    before = _append(ledger, f"charge {cents}")
    if not any(line.startswith("charge") for line in before):
        raise ConnectionError("card network timed out")
    return f"ch_{cents}"


@sl.step
async def receipt(ledger: str, charge_id: str) -> str:
    _append(ledger, f"receipt {charge_id}")
    return f"receipt for {charge_id}"


@sl.task(id="checkout", registry=registry,
         retry=sl.Retry(max_attempts=3, min_timeout=0.05, randomize=False))
async def checkout(order: Order) -> dict[str, str]:
    cents = await price(order.ledger, order.amount)
    charge_id = await charge(order.ledger, cents)
    await sl.sleep(order.nap)
    text = await receipt(order.ledger, charge_id)
    return {"charge": charge_id, "receipt": text}
