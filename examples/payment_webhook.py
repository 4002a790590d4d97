"""A payment provider's webhook starts a run; a forged one starts nothing.

    .venv/bin/python examples/payment_webhook.py

One process runs a worker and the HTTP API (`stepline serve`'s app) on the
embedded log, then plays the payment provider: it posts one delivery signed
with a wrong secret (refused with 401, nothing recorded) and one signed with
the right secret (202). The delivery becomes the domain event
`webhook.payments`; `record-payment` subscribes to it for successful
payments only, and an order waiting in `wait_for_event` for its payment is
resumed by the same event.

In production the pieces run apart:

    STEPLINE_API_TOKEN=... stepline serve --app examples/payment_webhook.py --webhook payments=whsec_...
    stepline worker examples/payment_webhook.py

and the provider signs each delivery as `Stepline-Signature: t=<unix
seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>` (see
`stepline.server.sign_webhook`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

import aiohttp
from aiohttp import web

import stepline as sl
from stepline.server import SIGNATURE_HEADER, ServeConfig, WebhookSource, create_app, sign_webhook

SECRET = "whsec_example_only"


@sl.task(id="record-payment",
         on=sl.Subscription("webhook.payments", where={"type": ["payment.succeeded"]}))
async def record_payment(event: dict) -> str:
    payment = event["data"]
    return f"recorded {payment['id']}: {payment['amount']} {payment['currency']} for {payment['order_id']}"


@sl.task(id="fulfil-order")
async def fulfil_order(order_id: str) -> str:
    paid = await sl.wait_for_event(
        "webhook.payments",
        match={"type": ["payment.succeeded"], "data": {"order_id": [order_id]}},
        timeout=300,
    )
    if paid is None:
        return f"{order_id}: no payment within 5 minutes, cancelled"
    return f"{order_id}: paid by {paid['data']['id']}, shipping"


async def deliver(http: aiohttp.ClientSession, base: str, body: dict, secret: str) -> tuple[int, dict]:
    raw = json.dumps(body).encode()
    headers = {SIGNATURE_HEADER: sign_webhook(secret, raw), "Content-Type": "application/json"}
    async with http.post(f"{base}/v1/webhooks/payments", data=raw, headers=headers) as resp:
        return resp.status, await resp.json()


async def main() -> int:
    sl.configure_logging(json_logs=False, level=logging.WARNING)
    url = os.environ.get("STEPLINE_LOG", sl.DEFAULT_LOG_URL)
    config = ServeConfig(api_token=None, auth_required=False,
                         webhooks={"payments": WebhookSource("payments", SECRET)})
    async with sl.Client(url, registry=sl.default_registry) as client:
        async with sl.Worker(sl.default_registry, client.log, client=client):
            runner = web.AppRunner(create_app(client, config, sl.default_registry))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            base = f"http://{host}:{port}"
            try:
                order = await fulfil_order.trigger("order-81")
                while (await client.get_run(order.run_id)).status != "suspended":
                    await asyncio.sleep(0.05)
                print("order-81 is waiting for its payment")
                payment = {"type": "payment.succeeded",
                           "data": {"id": "pay_123", "amount": 4200, "currency": "EUR", "order_id": "order-81"}}
                async with aiohttp.ClientSession() as http:
                    status, answer = await deliver(http, base, payment, "whsec_guessed")
                    print(f"forged delivery: {status} {answer['error']}")
                    status, answer = await deliver(http, base, payment, SECRET)
                    print(f"signed delivery: {status} event {answer['event_id']}")
                print(f"fulfil-order: {await order.result(timeout=60)}")
                recorded = None
                while recorded is None:
                    done = [r for r in await client.list_runs()
                            if r.task_id == "record-payment" and r.status == "completed"]
                    recorded = done[0] if done else None
                    await asyncio.sleep(0.05)
                print(f"record-payment: {json.loads(recorded.output.data)}")
            finally:
                await runner.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
