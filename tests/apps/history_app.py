"""Tasks for the fork, shadow and version tests (v1 of the code).

`history_app_v2.py` is the same app after a safe change (a new step behind
`sl.patched`), `history_app_v3.py` after unsafe ones. Each keeps its tasks
in its own registry, so the versions load side by side; v2 and v3 reuse
the steps declared here, and every step body that runs notes itself in
EXECUTED, so a test sees which bodies ran in this process.
"""

from __future__ import annotations

from pydantic import BaseModel

import stepline as sl

registry = sl.Registry()

# (idempotency key "run_id:step", step name) of every step body run in this process.
EXECUTED: list[tuple[str, str]] = []


def executed(run_id: str) -> list[str]:
    """Names of the step bodies that ran for `run_id`, in order."""
    return [name for key, name in EXECUTED if key.rsplit(":", 1)[0] == run_id]


class Quote(BaseModel):
    sku: str
    qty: int


class Greeting(BaseModel):
    name: str


@sl.step
async def fetch_price(sku: str) -> int:
    EXECUTED.append((sl.idempotency_key(), "fetch_price"))
    return {"apple": 3, "pear": 5}.get(sku, 10)


@sl.step
async def subtotal(price: int, qty: int) -> int:
    EXECUTED.append((sl.idempotency_key(), "subtotal"))
    return price * qty


@sl.step
async def add_tax(amount: int) -> int:
    EXECUTED.append((sl.idempotency_key(), "add_tax"))
    return amount + amount // 10


@sl.step
async def bulk_discount(price: int, qty: int) -> int:
    EXECUTED.append((sl.idempotency_key(), "bulk_discount"))
    return price - 1 if qty >= 10 else price


@sl.step
async def fail_on(value: int, bad: int) -> int:
    EXECUTED.append((sl.idempotency_key(), "fail_on"))
    if value == bad:
        raise ValueError(f"refusing {value}")
    return value


@sl.step
async def compose(name: str) -> str:
    EXECUTED.append((sl.idempotency_key(), "compose"))
    return f"Hello, {name}"


@sl.task(id="quote", registry=registry, version="1")
async def quote(q: Quote) -> dict[str, int | str]:
    price = await fetch_price(q.sku)
    sub = await subtotal(price, q.qty)
    total = await add_tax(sub)
    return {"sku": q.sku, "total": total}


@sl.task(id="approve", registry=registry)
async def approve(q: Quote) -> dict[str, int | str]:
    """Waits for a human between pricing and totalling: a run stays in flight."""
    price = await fetch_price(q.sku)
    decision = await sl.wait_for_token()
    sub = await subtotal(price, q.qty)
    return {"sku": q.sku, "total": sub, "approved_by": str((decision or {}).get("by"))}


@sl.task(id="strict", registry=registry, retry=sl.Retry(max_attempts=1))
async def strict(q: Quote) -> int:
    price = await fetch_price(q.sku)
    return await fail_on(price * q.qty, 15)


@sl.task(id="greet", registry=registry)
async def greet(g: Greeting) -> dict[str, str]:
    return {"message": await compose(g.name)}
