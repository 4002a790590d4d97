"""Pausing and resuming tasks and queues (engine/client/pause.py), on every backend.

A pause is recorded on the log (PauseChanged on every partition), so it holds
on whichever worker owns a run, across restarts, and for limited queues at
the queue's owner; runs stay queued and start on resume."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest

import stepline as sl
from stepline.client.pause import InvalidPause
from stepline.core import codec
from stepline.core.events import Event, PauseChanged
from stepline.core.ids import idempotent_run_id
from stepline.projections import snapshot
from stepline.projections.query import QueryProjector
from stepline.projections.query_store import QueryStore, RunFilter
from stepline.projections.runs import PartitionRuns

from .conftest import Engine, eventually

FIXTURES = Path(__file__).parent / "fixtures"


def _app() -> tuple[sl.Registry, list[str], dict[str, asyncio.Event]]:
    reg = sl.Registry()
    started: list[str] = []
    gates: dict[str, asyncio.Event] = {}

    @sl.task(id="mail", registry=reg, queue=sl.Queue("outbox"))
    async def mail(payload: Any) -> str:
        started.append(payload["n"])
        gate = gates.get(payload["n"])
        if gate is not None:
            await gate.wait()
        return f"sent {payload['n']}"

    @sl.task(id="sms", registry=reg, queue=sl.Queue("outbox"))
    async def sms(payload: Any) -> str:
        started.append(payload["n"])
        return f"texted {payload['n']}"

    @sl.task(id="other", registry=reg)
    async def other(payload: Any) -> str:
        started.append(payload["n"])
        return "ok"

    @sl.task(id="limited", registry=reg, queue=sl.Queue("scarce", concurrency_limit=1))
    async def limited(payload: Any) -> str:
        started.append(payload["n"])
        return "ok"

    return reg, started, gates


async def _settled(e: Engine) -> None:
    """Every request appended so far has been folded and acted on by the worker:
    a run of an unpaused task in every partition, triggered after them, has ended."""
    nparts = await e.client.log.partitions(e.client.topics.runs)
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < nparts:
        key = f"marker-{i}-{asyncio.get_running_loop().time()}"
        p = e.client.partition_of(idempotent_run_id("other", key))
        keys.setdefault(p, key)
        i += 1
    handles = [await e.client.trigger("other", {"n": f"~marker:{k}"}, idempotency_key=k) for k in keys.values()]
    for h in handles:
        await h.result(timeout=20)


async def test_a_paused_task_keeps_its_runs_queued_and_resume_starts_them(engine_factory: Any) -> None:
    reg, started, _ = _app()
    e = await engine_factory(reg)
    await e.client.pause(task="mail", reason="provider outage")
    held = [await e.client.trigger("mail", {"n": f"m{i}"}) for i in range(4)]
    free = await e.client.trigger("sms", {"n": "s0"})  # same queue, another task: not paused
    assert await free.result(timeout=20) == "texted s0"
    await _settled(e)
    for h in held:
        state = await e.client.get_run(h.run_id)
        assert state.status == "pending" and state.started_at is None
    assert not any(n.startswith("m") for n in started)
    assert await e.client.paused() == {("task", "mail"): "provider outage"}

    await e.client.resume(task="mail")
    assert [await h.result(timeout=20) for h in held] == [f"sent m{i}" for i in range(4)]
    assert await e.client.paused() == {}


async def test_a_pause_survives_a_worker_restart(engine_factory: Any) -> None:
    reg, started, _ = _app()
    e = await engine_factory(reg, snapshot_every=5)  # the restart rebuilds from a snapshot
    await e.client.pause(queue="outbox")
    held = [await e.client.trigger(t, {"n": f"{t}{i}"}) for i in range(3) for t in ("mail", "sms")]
    await _settled(e)
    await e.restart_worker()
    await _settled(e)
    assert e.worker is not None
    assert all(e.worker.runs()[h.run_id].status == "pending" for h in held)
    assert not any(n.startswith(("mail", "sms")) for n in started)

    await e.client.resume(queue="outbox")
    for h in held:
        assert (await h.result(timeout=20)).split()[1] in {"mail0", "mail1", "mail2", "sms0", "sms1", "sms2"}


async def test_an_attempt_under_way_finishes_and_the_next_one_waits(engine_factory: Any) -> None:
    reg = sl.Registry()
    gate = asyncio.Event()
    steps: list[str] = []

    @sl.step
    async def first() -> str:
        steps.append("first")
        await gate.wait()
        return "one"

    @sl.step
    async def second() -> str:
        steps.append("second")
        return "two"

    @sl.task(id="naps", registry=reg)
    async def naps(payload: Any) -> str:
        await first()
        await sl.sleep(0.05)
        return await second()

    @sl.task(id="other", registry=reg)
    async def other(payload: Any) -> str:
        return "ok"

    e = await engine_factory(reg)
    h = await e.client.trigger("naps", {})
    await eventually(lambda: steps == ["first"], what="the first step to run")
    await e.client.pause(task="naps")
    gate.set()
    # The attempt goes on to the sleep (it was under way); the wake-up is held.
    await eventually(lambda: _status(e, h.run_id) == "pending", timeout=20, what="the run to sleep and wake up held")
    await _settled(e)
    state = await e.client.get_run(h.run_id)
    assert state.status == "pending" and state.attempt == 1 and steps == ["first"]
    await e.client.resume(task="naps")
    assert await h.result(timeout=20) == "two"
    assert steps == ["first", "second"]


def _status(e: Engine, run_id: str) -> str | None:
    assert e.worker is not None
    st = e.worker.runs().get(run_id)
    if st is None or st.status != "pending":
        return st.status if st else None
    # Pending after its sleep: the sleep step is done.
    return "pending" if any(s.name == "sleep" and s.status == "completed" for s in st.steps.values()) else "asleep"


async def test_a_paused_limited_queue_grants_nothing_and_resumes_in_priority_order(engine_factory: Any) -> None:
    reg, started, _ = _app()
    e = await engine_factory(reg)
    await e.client.pause(task="limited")
    low = [await e.client.trigger("limited", {"n": f"low{i}"}) for i in range(3)]
    high = await e.client.trigger("limited", {"n": "high"}, priority=5)
    await _settled(e)
    assert not any(n.startswith(("low", "high")) for n in started)
    assert [(await e.client.get_run(h.run_id)).status for h in [*low, high]] == ["pending"] * 4
    await e.client.resume(task="limited")
    for h in [high, *low]:
        await h.result(timeout=20)
    # The queue's owner grants one at a time: priority first, then trigger order.
    assert [n for n in started if n.startswith(("low", "high"))] == ["high", "low0", "low1", "low2"]


async def test_pause_names_exactly_one_known_task_or_queue(engine_factory: Any) -> None:
    reg, _, _ = _app()
    e = await engine_factory(reg)
    with pytest.raises(InvalidPause, match="exactly one"):
        await e.client.pause()
    with pytest.raises(InvalidPause, match="exactly one"):
        await e.client.pause(task="mail", queue="outbox")
    with pytest.raises(sl.UnknownTask):
        await e.client.pause(task="nope")
    with pytest.raises(InvalidPause, match="no task of this app uses a queue named 'nope'"):
        await e.client.pause(queue="nope")
    assert await e.client.paused() == {}


async def test_the_run_list_marks_runs_held_by_a_pause(engine_factory: Any, tmp_path: Path) -> None:
    reg, _, _ = _app()
    e = await engine_factory(reg)
    await e.client.pause(task="mail", reason="outage")
    h = await e.client.trigger("mail", {"n": "x"})
    async with QueryStore(tmp_path / "q.db") as store:
        await QueryProjector(e.client.log, store, topics=e.client.topics).catch_up()
        page = await store.list_runs(RunFilter(task="mail"))
        assert [(r["run_id"], r["status"], r["paused"]) for r in page.items] == [(h.run_id, "pending", True)]
        assert [(p["scope"], p["name"], p["reason"]) for p in await store.pauses()] == [("task", "mail", "outage")]
        await e.client.resume(task="mail")
        await h.result(timeout=20)
        await QueryProjector(e.client.log, store, topics=e.client.topics).catch_up()
        assert await store.pauses() == []
        assert [r["paused"] for r in (await store.list_runs(RunFilter(task="mail"))).items] == [False]


def test_a_snapshot_keeps_what_is_paused() -> None:
    part = PartitionRuns(3)
    part.apply(Event("e1", "PauseChanged", "", "", 0, 1, 0, PauseChanged("queue", "outbox", True, "why", "cli")))
    part.apply(Event("e2", "PauseChanged", "", "", 0, 2, 0, PauseChanged("task", "a", True)))
    part.apply(Event("e3", "PauseChanged", "", "", 0, 3, 0, PauseChanged("task", "a", False)))
    loaded = snapshot.load(snapshot.dump(part))
    assert loaded.paused == {("queue", "outbox"): PauseChanged("queue", "outbox", True, "why", "cli")}
    assert loaded.is_paused("anything", "outbox") and not loaded.is_paused("a", "elsewhere")


def test_the_v5_golden_log_holds_a_readable_pause() -> None:
    data, records, pos = (FIXTURES / "events-v5.bin").read_bytes(), [], 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        records.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    ev = codec.decode(records[-1])
    assert (ev.run_id, ev.epoch) == ("", 0)
    assert ev.body == PauseChanged("queue", "emails", True, "provider outage", "cli")
