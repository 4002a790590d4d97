"""A subscription added after its events were published, for the backfill CLI test."""

from __future__ import annotations

import stepline as sl


@sl.task(id="welcome-pro", on=sl.Subscription("user.created", where={"plan": ["pro"]}))
async def welcome_pro(event: dict) -> str:
    return f"welcome {event['name']}"
