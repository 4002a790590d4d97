"""Trigger.dev's `process-order` example, durable, on Stepline's embedded log.

    make quickstart                      # or: .venv/bin/python examples/process_order.py

One process runs a worker on the embedded SQLite log (`.stepline/stepline.db`
unless STEPLINE_LOG says otherwise), triggers one order, and prints what
happened. The payment gateway times out on the first call, so you see the
retry policy at work, and the fetched order is NOT fetched again: the retry
resumes from the checkpoint after `fetch_order`. Then the run sleeps
durably (no coroutine held) before sending the confirmation.

Run it as a worker instead, and trigger from another terminal:

    stepline worker examples/process_order.py
    stepline trigger process-order --app examples/process_order.py \
        --payload '{"order_id": "order-7"}' --wait
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections import Counter
from datetime import timedelta

from pydantic import BaseModel

import stepline as sl

SLEEP = timedelta(seconds=float(os.environ.get("ORDER_SLEEP_SECONDS", "2")))

calls: Counter[str] = Counter()
_gateway_seen: set[str] = set()


class OrderIn(BaseModel):
    order_id: str


class GatewayTimeout(TimeoutError):
    """The payment provider did not answer in time: worth retrying."""


@sl.step
async def fetch_order(order_id: str) -> dict:
    calls["fetch_order"] += 1
    return {"id": order_id, "email": "ada@example.com", "total": 42.5, "payment_method": "pm_card_visa"}


@sl.step
async def charge_payment(payment_method: str, total: float) -> dict:
    calls["charge_payment"] += 1
    # The same key on every attempt: a real payment API dedupes on it.
    key = sl.idempotency_key()
    if key not in _gateway_seen:
        _gateway_seen.add(key)
        raise GatewayTimeout("payment gateway did not answer within 10 s")
    return {"charge_id": f"ch_{key.replace(':', '_')}", "amount": total, "method": payment_method}


@sl.step
async def send_confirmation_email(email: str, charge: dict) -> str:
    calls["send_confirmation_email"] += 1
    return f"receipt for {charge['charge_id']} sent to {email}"


@sl.task(
    id="process-order",
    retry=sl.Retry(max_attempts=3, factor=2, min_timeout=1, max_timeout=10),
)
async def process_order(payload: OrderIn) -> dict:
    order = await fetch_order(payload.order_id)                              # checkpoint 1
    charge = await charge_payment(order["payment_method"], order["total"])   # checkpoint 2
    await sl.sleep(SLEEP)                                                    # durable timer
    await send_confirmation_email(order["email"], charge)                    # checkpoint 3
    return {"status": "completed", "orderId": order["id"], "chargeId": charge["charge_id"]}


async def main() -> int:
    sl.configure_logging(json_logs=False, level=logging.WARNING)
    url = os.environ.get("STEPLINE_LOG", sl.DEFAULT_LOG_URL)
    order_id = sys.argv[1] if len(sys.argv) > 1 else "order-42"
    async with sl.Client(url) as client:
        async with sl.Worker(sl.default_registry, client.log, client=client):
            handle = await process_order.trigger(OrderIn(order_id=order_id))
            print(f"triggered process-order as {handle.run_id} on {url}")
            result = await handle.result(timeout=120)
            state = await handle.state()
    print()
    for st in sorted(state.steps.values(), key=lambda s: s.step):
        took = "" if st.ended_at is None or st.started_at is None else f"{st.ended_at - st.started_at} ms"
        print(f"  step {st.step}  {st.name:<24} {st.status:<10} attempt {st.attempt}  {took}")
    for r in state.retries:
        print(f"  retry -> attempt {r.attempt} after {r.delay_ms} ms ({r.reason})")
    print(f"\nexecutions: {dict(calls)}")
    print(f"result: {json.dumps(result)}")
    print(f"\nsee it again:  stepline runs show {handle.run_id}   |   stepline history {handle.run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
