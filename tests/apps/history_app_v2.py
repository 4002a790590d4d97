"""history_app.py after a safe change: `quote` and `approve` apply a bulk
discount, behind `sl.patched("bulk-discount")`, so runs recorded before
it keep their path. `greet` and `strict` are unchanged (so is their
source, and with it their version hash)."""

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


@sl.task(id="quote", registry=registry, version="2")
async def quote(q: Quote) -> dict[str, int | str]:
    price = await fetch_price(q.sku)
    if sl.patched("bulk-discount"):
        price = await bulk_discount(price, q.qty)
    sub = await subtotal(price, q.qty)
    total = await add_tax(sub)
    return {"sku": q.sku, "total": total}


@sl.task(id="approve", registry=registry)
async def approve(q: Quote) -> dict[str, int | str]:
    """Waits for a human between pricing and totalling: a run stays in flight."""
    price = await fetch_price(q.sku)
    if sl.patched("bulk-discount"):
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
    return {"message": await compose(g.name)}
