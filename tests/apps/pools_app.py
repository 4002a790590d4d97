"""Tasks in two worker pools, for tests/test_pools.py: a `gpu` pool and the
default one, calling each other as children and through a subscription."""

from __future__ import annotations

import stepline as sl

registry = sl.Registry()


@sl.task(id="render", pool="gpu", registry=registry)
async def render(x: int) -> int:
    return x * 2


@sl.task(id="handle", registry=registry)
async def handle(x: int) -> int:
    """Default pool; its child runs in the gpu pool."""
    return await render.trigger_and_wait(x) + 1


@sl.task(id="label", registry=registry)
async def label(x: int) -> str:
    return f"#{x}"


@sl.task(id="batch", pool="gpu", registry=registry)
async def batch(x: int) -> str:
    """gpu pool; its child runs in the default pool, then it waits for an event."""
    name = await label.trigger_and_wait(x)
    seen = await sl.wait_for_event("batch.approved", timeout=60)
    return f"{name} {seen['by']}"


@sl.task(id="on-upload", pool="gpu", registry=registry, on=sl.Subscription("image.uploaded"))
async def on_upload(data: dict[str, int]) -> int:
    return data["size"]


@sl.task(id="upload", registry=registry)
async def upload(size: int) -> None:
    """Default pool; the event it publishes starts a gpu task."""
    await sl.publish("image.uploaded", {"size": size})
