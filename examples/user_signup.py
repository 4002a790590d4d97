"""Fan-out: one `user.created` event starts every task subscribed to it.

    .venv/bin/python examples/user_signup.py

One process runs a worker on the embedded SQLite log (`.stepline/stepline.db`
unless STEPLINE_LOG says otherwise) and publishes a few sign-ups. Two tasks
subscribe to `user.created`: `send-welcome` takes every user, `onboard-pro`
only those whose data matches the filter `where={"plan": ["pro"]}`. The
router inside the worker starts one run per matching (event, task) pair, and
the script prints which task ran for which user: the `free` and `team`
users get the welcome only.

Or run a worker and publish from another terminal:

    stepline worker examples/user_signup.py
    stepline publish user.created --data '{"email": "eve@example.com", "plan": "pro"}' --key eve
"""

from __future__ import annotations

import asyncio
import logging
import os

from pydantic import BaseModel

import stepline as sl

# Not public API: no call maps a published event to the runs it started yet,
# so match on the idempotency key the router gives them (a frozen format).
from stepline.consumers.router import fanout_key

SIGNUPS = [
    ("ada@example.com", "pro"),
    ("bob@example.com", "free"),
    ("cyd@example.com", "pro"),
    ("dee@example.com", "team"),
]


class User(BaseModel):
    email: str
    plan: str


@sl.step
async def send_email(to: str, subject: str) -> str:
    return f"{subject!r} sent to {to}"


@sl.task(id="send-welcome", on=sl.Subscription("user.created"))
async def send_welcome(user: User) -> str:
    return await send_email(user.email, "Welcome aboard")


@sl.task(id="onboard-pro", on=sl.Subscription("user.created", where={"plan": ["pro"]}))
async def onboard_pro(user: User) -> str:
    return await send_email(user.email, "Your pro workspace is ready")


async def fanned_out(worker: sl.Worker, keys: set[str], timeout: float = 60) -> list[sl.RunState]:
    """The runs that the events behind `keys` started, once all have ended.

    Every user gets a welcome, and the router triggers all runs of an event
    together; so once each event's welcome run has ended, its other runs
    have long been triggered.
    """
    async with asyncio.timeout(timeout):
        while True:
            runs = [r for r in worker.runs().values() if r.idempotency_key in keys]
            welcomed = {r.idempotency_key for r in runs if r.task_id == "send-welcome" and not r.live}
            if welcomed == keys and not any(r.live for r in runs):
                return runs
            await asyncio.sleep(0.05)


async def main() -> int:
    sl.configure_logging(json_logs=False, level=logging.WARNING)
    url = os.environ.get("STEPLINE_LOG", sl.DEFAULT_LOG_URL)
    async with sl.Client(url) as client:
        async with sl.Worker(sl.default_registry, client.log, client=client) as worker:
            users: dict[str, User] = {}
            for email, plan in SIGNUPS:
                user = User(email=email, plan=plan)
                event_id = await sl.publish("user.created", user.model_dump(), key=email)
                users[fanout_key(event_id)] = user
                print(f"published user.created {email} plan={plan}")
            runs = await fanned_out(worker, set(users))
    ran = []
    for run in runs:
        user = users[str(run.idempotency_key)]
        ran.append(f"ran: {run.task_id} {user.email} plan={user.plan} {run.status}")
    print("", *sorted(ran), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
