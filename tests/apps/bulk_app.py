"""Tasks for tests/test_bulk.py's CLI test (`--app`): one that succeeds, one held by pauses."""

from __future__ import annotations

from typing import Any

import stepline as sl

registry = sl.Registry()


@sl.task(id="sync", registry=registry, retry=sl.Retry(max_attempts=1))
async def sync(payload: Any) -> str:
    return f"synced {payload['n']}"


@sl.task(id="held", registry=registry)
async def held(payload: Any) -> str:
    return f"held {payload['n']}"
