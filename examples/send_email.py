"""Trigger.dev's `send-email` task: at most 10 sends at once, on a queue.

    .venv/bin/python examples/send_email.py

The reference article caps its email task with `queue: {concurrencyLimit:
10}` so a burst does not trip the provider's rate limit. Here the same task
names `sl.Queue("emails", concurrency_limit=10)`, 50 emails are queued, and a
worker with room for 256 runs starts them. The fake provider takes ~50 ms
per email and counts how many sends are in flight: the peak it prints is
the queue's limit, 10, and each address gets its email once.

The 50 runs are triggered before the worker starts, so the whole burst is
waiting when admission begins (otherwise the first runs could finish before
the last were triggered, and the peak would measure the trigger loop). The
log is `.stepline/stepline.db` unless STEPLINE_LOG says otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter

from pydantic import BaseModel

import stepline as sl

EMAILS = 50


class Email(BaseModel):
    to: str
    subject: str


class FakeEmailProvider:
    """Sends nothing; remembers who got what and how many sends overlapped."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.sent: Counter[str] = Counter()

    async def send(self, email: Email) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.05)  # the provider's API call
            self.sent[email.to] += 1
        finally:
            self.in_flight -= 1


email_provider = FakeEmailProvider()


@sl.task(id="send-email", queue=sl.Queue("emails", concurrency_limit=10))  # max 10 concurrent executions
async def send_email(payload: Email) -> None:
    await email_provider.send(payload)


async def main() -> int:
    sl.configure_logging(json_logs=False, level=logging.WARNING)
    url = os.environ.get("STEPLINE_LOG", sl.DEFAULT_LOG_URL)
    emails = [Email(to=f"user{n}@example.com", subject="Your invoice") for n in range(EMAILS)]
    async with sl.Client(url) as client:
        handles = await send_email.batch_trigger(emails)
        print(f"queued {len(handles)} emails on queue 'emails' (concurrency_limit=10) on {url}")
        began = time.monotonic()
        async with sl.Worker(sl.default_registry, client.log, client=client):
            await asyncio.gather(*(h.result(timeout=60) for h in handles))
        took = time.monotonic() - began
    once = sum(1 for e in emails if email_provider.sent[e.to] == 1)
    print(f"peak concurrency: {email_provider.peak}")
    print(f"sent exactly once: {once} of {EMAILS}")
    print(f"sends in all: {sum(email_provider.sent.values())}")
    print(f"took: {took:.2f} s (50 sends of 50 ms, 10 at a time, need at least 0.25 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
