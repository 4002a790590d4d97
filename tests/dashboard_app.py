"""Tasks for the dashboard's browser test (`stepline dev tests/dashboard_app.py`).

One of each thing the dashboard draws: steps with outputs, a retried step,
a durable sleep, a child run, a permanent failure, a subscription, a
schedule, a limited queue, a queue of one slot and a wait for an event.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel

import stepline as sl

registry = sl.Registry()

# Step keys ("run_id:step") whose first attempt already failed: in this
# process only, which is all the test needs (`stepline dev` runs one).
_failed_once: set[str] = set()


class Greeting(BaseModel):
    name: str


class Charge(BaseModel):
    amount: int


@sl.step
async def fetch_profile(name: str) -> dict:
    return {"name": name, "plan": "pro"}


@sl.step
async def render_message(profile: dict) -> str:
    key = sl.idempotency_key()
    if key not in _failed_once:
        _failed_once.add(key)
        raise ConnectionError("template service timed out")
    return f"Welcome aboard, {profile['name']} ({profile['plan']})"


@sl.step
async def send(message: str) -> dict:
    return {"sent": True, "chars": len(message)}


@sl.task(id="make-avatar", registry=registry)
async def make_avatar(payload: Greeting) -> dict:
    return {"avatar": f"https://example.invalid/{payload.name.lower()}.png"}


@sl.task(id="greet", registry=registry, retry=sl.Retry(fixed=0.2, max_attempts=3))
async def greet(payload: Greeting) -> dict:
    profile = await fetch_profile(payload.name)
    message = await render_message(profile)
    await sl.sleep(timedelta(milliseconds=300))
    avatar = await make_avatar.trigger_and_wait(payload)
    receipt = await send(message)
    return {"message": message, "avatar": avatar["avatar"], **receipt}


@sl.step
async def validate(amount: int) -> int:
    if amount < 0:
        raise ValueError(f"amount must not be negative, got {amount}")
    return amount


@sl.step
async def capture(amount: int) -> dict:
    return {"captured": amount, "currency": "EUR"}


@sl.task(id="charge", registry=registry, retry=sl.Retry(max_attempts=1))
async def charge(payload: Charge) -> dict:
    amount = await validate(payload.amount)
    return await capture(amount)


@sl.task(id="welcome-email", registry=registry, on=sl.Subscription("user.signed_up"),
         queue=sl.Queue("emails", concurrency_limit=5))
async def welcome_email(event: dict) -> str:
    return f"sent to {event['email']}"


@sl.task(id="nightly-report", registry=registry, schedule=sl.Cron("0 3 * * *"))
async def nightly_report(tick: sl.ScheduleTick) -> None:
    return None


class Hold(BaseModel):
    seconds: float


@sl.step
async def hold_slot(seconds: float) -> str:
    # A long step: its run keeps the queue's one slot the whole time.
    await asyncio.sleep(seconds)
    return "done"


@sl.task(id="exclusive", registry=registry, queue=sl.Queue("one-slot", concurrency_limit=1))
async def exclusive(payload: Hold) -> str:
    return await hold_slot(payload.seconds)


@sl.task(id="await-payment", registry=registry)
async def await_payment(payload: dict) -> dict:
    return await sl.wait_for_event("payment.received", match={"order": payload["order"]}, timeout=3600)
