"""Trigger idempotency keys reused with another payload: refused, as Stripe
refuses a reused key whose parameters differ, with nothing appended."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel

import stepline as sl
from stepline.server import ServeConfig, create_app


class Order(BaseModel):
    order_id: str
    amount: int


def app() -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="charge", registry=reg)
    async def charge(p: Order) -> int:
        return p.amount

    return reg


async def log_size(client: sl.Client) -> int:
    total = 0
    for topic in (client.topics.runs, client.topics.events):
        for p in range(await client.log.partitions(topic)):
            total += await client.log.end_offset(topic, p)
    return total


async def test_a_repeated_key_with_the_same_payload_is_the_same_run(engine_factory):
    e = await engine_factory(app())
    first = await e.client.trigger("charge", {"order_id": "o-1", "amount": 5}, idempotency_key="order-1")
    again = await e.client.trigger("charge", {"amount": 5, "order_id": "o-1"}, idempotency_key="order-1")
    assert again.run_id == first.run_id
    assert await again.result(timeout=30) == 5


@pytest.mark.parametrize("ttl", [None, 3600.0], ids=["key", "key-with-ttl"])
async def test_a_repeated_key_with_another_payload_is_refused_and_appends_nothing(engine_factory, ttl):
    e = await engine_factory(app())
    first = await e.client.trigger("charge", {"order_id": "o-1", "amount": 5}, idempotency_key="order-1",
                                   idempotency_key_ttl=ttl)
    await first.result(timeout=30)
    before = await log_size(e.client)
    with pytest.raises(sl.IdempotencyKeyReused) as caught:
        await e.client.trigger("charge", {"order_id": "o-1", "amount": 6}, idempotency_key="order-1",
                               idempotency_key_ttl=ttl)
    assert caught.value.run_id == first.run_id and caught.value.key == "order-1"
    assert "order-1" in str(caught.value) and first.run_id in str(caught.value)
    assert await log_size(e.client) == before
    assert (await e.client.get_run(first.run_id)).output is not None


async def test_the_http_api_answers_409_to_a_reused_key_with_another_payload(engine_factory):
    e = await engine_factory(app())
    auth = {"Authorization": "Bearer t0ken"}

    async def trigger(body: dict[str, Any]) -> tuple[int, Any]:
        async with TestClient(TestServer(create_app(e.client, ServeConfig("t0ken", {}), app()))) as http:
            resp = await http.post("/v1/tasks/charge/trigger", json=body, headers=auth)
            return resp.status, await resp.json()

    status, first = await trigger({"payload": {"order_id": "o-1", "amount": 5}, "idempotency_key": "order-1"})
    assert status == 202
    status, same = await trigger({"payload": {"order_id": "o-1", "amount": 5}, "idempotency_key": "order-1"})
    assert status == 202 and same["run_id"] == first["run_id"]
    await e.client.wait(first["run_id"], timeout=30)  # the worker's own appends are over
    before = await log_size(e.client)
    status, refused = await trigger({"payload": {"order_id": "o-1", "amount": 6}, "idempotency_key": "order-1"})
    assert status == 409 and first["run_id"] in refused["error"]
    assert await log_size(e.client) == before
