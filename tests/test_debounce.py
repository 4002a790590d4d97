"""Debounce: of a key's triggers within the quiet period, only the last one runs."""

from __future__ import annotations

import asyncio

import pytest

import stepline as sl


def debounced_app(seen: list[dict]) -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="reindex", registry=reg,
             debounce=sl.Debounce(0.4, key=lambda p: p["account"]))
    async def reindex(p: dict) -> int:
        seen.append(p)
        return p["version"]

    return reg


async def test_a_burst_of_triggers_runs_once_with_the_last_payload(engine_factory):
    seen: list[dict] = []
    e = await engine_factory(debounced_app(seen))
    handles = []
    for version in range(5):
        handles.append(await e.client.trigger("reindex", {"account": "a", "version": version}))
        await asyncio.sleep(0.05)
    other = await e.client.trigger("reindex", {"account": "b", "version": 99})
    assert len({h.run_id for h in handles}) == 1  # one run for the burst
    assert await handles[-1].result(timeout=20) == 4
    assert await other.result(timeout=20) == 99  # another key is debounced apart
    assert sorted(p["version"] for p in seen) == [4, 99]


async def test_a_trigger_after_the_run_started_opens_a_new_run(engine_factory):
    seen: list[dict] = []
    e = await engine_factory(debounced_app(seen))
    first = await e.client.trigger("reindex", {"account": "a", "version": 1})
    assert await first.result(timeout=20) == 1
    second = await e.client.trigger("reindex", {"account": "a", "version": 2})
    assert second.run_id != first.run_id
    assert await second.result(timeout=20) == 2
    assert [p["version"] for p in seen] == [1, 2]


def test_a_bad_debounce_fails_at_definition() -> None:
    with pytest.raises(sl.TaskDefinitionError, match="period"):
        sl.Debounce(0)
