"""Tasks for the synchronous client's tests, run by `stepline worker` in a child process."""

from __future__ import annotations

import stepline as sl


@sl.task(id="sync-greet")
async def greet(payload: dict) -> dict:
    return {"greeting": f"hello {payload['name']}"}


@sl.task(id="sync-refuse", retry=sl.Retry.never())
async def refuse(payload: dict) -> dict:
    raise sl.FatalError(f"refused {payload['name']}")


@sl.task(id="sync-on-ping", on=sl.Subscription("sync.ping"))
async def on_ping(payload: dict) -> dict:
    return {"pong": payload["n"]}
