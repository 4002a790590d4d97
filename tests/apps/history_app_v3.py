"""history_app.py after unsafe changes: a step inserted without
`sl.patched` (`quote`, `approve`), and a step called with other arguments
and a result shaped differently (`greet`)."""

from __future__ import annotations

import stepline as sl
from tests.apps.history_app import (
    Greeting,
    Quote,
    add_tax,
    bulk_discount,
    compose,
    fail_on,
    fetch_price,
    subtotal,
)

registry = sl.Registry()


@sl.task(id="quote", registry=registry, version="3")
async def quote(q: Quote) -> dict[str, int | str]:
    price = await fetch_price(q.sku)
    price = await bulk_discount(price, q.qty)
    sub = await subtotal(price, q.qty)
    total = await add_tax(sub)
    return {"sku": q.sku, "total": total}


@sl.task(id="approve", registry=registry)
async def approve(q: Quote) -> dict[str, int | str]:
    price = await fetch_price(q.sku)
    price = await bulk_discount(price, q.qty)
    decision = await sl.wait_for_token()
    sub = await subtotal(price, q.qty)
    return {"sku": q.sku, "total": sub, "approved_by": str((decision or {}).get("by"))}


@sl.task(id="strict", registry=registry, retry=sl.Retry(max_attempts=1))
async def strict(q: Quote) -> int:
    price = await fetch_price(q.sku)
    return await fail_on(price * q.qty, 15)


@sl.task(id="greet", registry=registry)
async def greet(g: Greeting) -> dict[str, str]:
    message = await compose(g.name.upper())
    return {"message": message + "!"}
