"""Duplicate delivery of every event type changes nothing, on every backend.

A producer that retries an append it could not confirm, a client that sends
a request twice, a router that re-reads an event: each puts the same record
(same event id, same seq) on the log again. The engine must treat the copy
as already seen: no second run, no second execution of a completed step,
no second count, and the same final state as one delivery.

The live tests run one scenario that writes every event type there is
(`BODY_TYPES`) through a log wrapper that writes every record of the runs,
events and queues topics twice: right behind the original ("adjacent"), or
one append later in the same partition so other events land in between
("delayed"). Then they check the side effects, the outcomes, the worker's
state against a rebuild from offset 0, and the folds against the log with
the copies removed, with every event redelivered once more at the end, and
with the whole history folded twice.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import pytest

import stepline as sl
from stepline.core import codec
from stepline.core.events import BODY_TYPES, Event, StepCompleted, StepStarted
from stepline.log.base import (
    AssignCallback,
    Log,
    Membership,
    Record,
    RevokeCallback,
    TopicSpec,
)
from stepline.log.topics import Topics
from stepline.projections.queues import QueuePartition
from stepline.projections.runs import TERMINAL, PartitionRuns, RunState

from .conftest import eventually

ALL_TYPES = frozenset(t.TYPE for t in BODY_TYPES)


class DuplicatingLog(Log):
    """Writes every record of the chosen topics twice, keeping offsets honest.

    `adjacent`: the copy follows the original in the same append.
    `delayed`: the copy is written with the next append to the partition
    (after its records), or by `flush()`.
    """

    def __init__(self, inner: Log, topics: set[str], mode: str) -> None:
        self.inner = inner
        self.url = inner.url
        self._topics = topics
        self._mode = mode
        self._held: dict[tuple[str, int], list[tuple[bytes, bytes]]] = {}

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        await self.inner.ensure_topics(specs)

    async def partitions(self, topic: str) -> int:
        return await self.inner.partitions(topic)

    async def topic_names(self, prefix: str = "") -> list[str]:
        return await self.inner.topic_names(prefix)

    async def append(self, topic: str, partition: int, records: Sequence[tuple[bytes, bytes]]) -> list[int]:
        if topic not in self._topics or not records:
            return await self.inner.append(topic, partition, records)
        if self._mode == "adjacent":
            offsets = await self.inner.append(topic, partition, [*records, *records])
        else:
            held = self._held.pop((topic, partition), [])
            self._held[(topic, partition)] = list(records)
            offsets = await self.inner.append(topic, partition, [*records, *held])
        return offsets[: len(records)]

    async def flush(self) -> None:
        while self._held:
            (topic, partition), records = self._held.popitem()
            await self.inner.append(topic, partition, records)

    async def read(self, topic: str, partition: int, offset: int, max_records: int = 1000,
                   timeout: float = 0.0) -> list[Record]:
        return await self.inner.read(topic, partition, offset, max_records, timeout)

    async def end_offset(self, topic: str, partition: int) -> int:
        return await self.inner.end_offset(topic, partition)

    async def join_group(self, group: str, topic: str, on_assign: AssignCallback,
                         on_revoke: RevokeCallback, *, instance_id: str | None = None) -> Membership:
        return await self.inner.join_group(group, topic, on_assign, on_revoke, instance_id=instance_id)

    async def commit(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        await self.inner.commit(group, topic, offsets)

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        return await self.inner.committed(group, topic)


# --- the scenario: every event type ---------------------------------------------

calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


def scenario_app() -> sl.Registry:
    reg = sl.Registry()

    @sl.step
    async def reserve(order: str) -> str:
        calls["reserve"] += 1
        return f"reserved {order}"

    @sl.step
    async def charge(order: str) -> str:
        calls["charge"] += 1
        if calls["charge"] == 1:
            raise RuntimeError("card network hiccup")  # StepFailed, RetryScheduled
        return f"charged {order}"

    # A limited queue: SlotRequested, SlotGranted, SlotReleased.
    @sl.task(id="pack", registry=reg, queue=sl.Queue("dup-packing", concurrency_limit=1))
    async def pack(order: str) -> str:
        calls["pack"] += 1
        return f"packed {order}"

    @sl.task(id="order", registry=reg, retry=sl.Retry(max_attempts=3, min_timeout=0.05, max_timeout=0.1))
    async def order(p: dict) -> dict:
        gift = sl.patched("dup-gift-wrap")  # PatchRecorded
        reserved = await reserve(p["order"])
        sl.logger.info("reserved", order=p["order"])  # LogRecorded
        charged = await charge(p["order"])
        await sl.sleep(0.2)  # RunSuspended, RunResumed
        approval = await sl.wait_for_event("dup.approved", match={"order": p["order"]}, timeout=120)
        packed = await pack.trigger_and_wait(p["order"])  # WaitCompleted from the child
        calls["order-end"] += 1
        return {"reserved": reserved, "charged": charged, "approval": approval, "packed": packed,
                "gift": gift}

    @sl.task(id="doomed", registry=reg, retry=sl.Retry(max_attempts=1))
    async def doomed(p: dict) -> None:  # RunFailed, RunDeadLettered, then RunRetriggered
        calls["doomed"] += 1
        raise ValueError(f"bad input {p}")

    @sl.task(id="never", registry=reg)
    async def never(_: None) -> None:  # RunCancelled, RunExpired
        calls["never"] += 1

    @sl.task(id="welcome", registry=reg, on=sl.Subscription("dup.user.created"))
    async def welcome(event: dict) -> str:  # DomainEvent
        calls["welcome"] += 1
        return f"welcome {event['name']}"

    return reg


@dataclass
class Rig:
    topics: Topics
    client: sl.Client
    worker: sl.Worker
    logs: list[DuplicatingLog]


@pytest.fixture(params=["adjacent", "delayed"])
async def rig(request: pytest.FixtureRequest, backend_url: str) -> AsyncIterator[Rig]:
    topics = Topics(partitions=3)
    duplicated = {topics.runs, topics.events, topics.queues}
    reg = scenario_app()
    client_log = DuplicatingLog(sl.open_log(backend_url), duplicated, request.param)
    worker_log = DuplicatingLog(sl.open_log(backend_url), duplicated, request.param)
    client = sl.Client(log=client_log, registry=reg, topics=topics)
    await client_log.start()
    await client.__aenter__()
    await worker_log.start()
    worker = sl.Worker(reg, worker_log, topics=topics, client=client)
    await worker.start()
    try:
        yield Rig(topics, client, worker, [client_log, worker_log])
    finally:
        await worker.close()
        await worker_log.close()
        await client.__aexit__(None, None, None)
        await client_log.close()


async def waiting_for(client: sl.Client, run_id: str, reason: str) -> bool:
    state = await client.get_run(run_id)
    return state.status == "suspended" and any(
        s.name == reason and s.status == "waiting" for s in state.steps.values())


async def read_topic(log: Log, topic: str) -> dict[int, list[tuple[int, Event]]]:
    out: dict[int, list[tuple[int, Event]]] = {}
    for p in range(await log.partitions(topic)):
        end = await log.end_offset(topic, p)
        events: list[tuple[int, Event]] = []
        offset = 0
        while offset < end:
            recs = await log.read(topic, p, offset, 5000)
            events += [(r.offset, codec.decode(r.value)) for r in recs if r.value]
            offset = recs[-1].offset + 1 if recs else end
        out[p] = events
    return out


def first_deliveries(events: list[tuple[int, Event]]) -> list[tuple[int, Event]]:
    seen: set[str] = set()
    out = []
    for off, ev in events:
        if ev.event_id not in seen:
            seen.add(ev.event_id)
            out.append((off, ev))
    return out


def fold_runs(p: int, events: list[tuple[int, Event]]) -> PartitionRuns:
    part = PartitionRuns(p)
    for off, ev in events:
        part.apply(ev, off)
    return part


def fold_queues(p: int, events: list[tuple[int, Event]]) -> QueuePartition:
    part = QueuePartition(p)
    for off, ev in events:
        part.apply(ev, off)
    return part


def queue_view(part: QueuePartition) -> dict[str, Any]:
    """What admission decides from: holders, waiters, the grant times, pauses."""
    view: dict[str, Any] = {
        name: (dict(q.holders), dict(q.waiting), +q.per_key, list(q.granted_at),
               (q.limit, q.key_limit, q.rate_limit, q.rate_period_ms))
        for name, q in part.queues.items()}
    view["paused"] = getattr(part, "paused", None)
    return view


def runs_view(part: PartitionRuns) -> dict[str, Any]:
    """Everything a partition's fold holds but where it stands in the log."""
    return {f.name: getattr(part, f.name) for f in fields(part)
            if f.name not in ("partition", "next_offset", "fenced")}


async def run_scenario(rig: Rig) -> dict[str, str]:
    """Every event type onto the log; returns run ids by role once all ended."""
    c = rig.client
    order = await c.trigger("order", {"order": "o-1"})
    doomed = await c.trigger("doomed", {"n": 1})
    cancelled = await c.trigger("never", None, delay=600)
    expired = await c.trigger("never", None, delay=0.5, ttl=0.1)
    await c.publish("dup.user.created", {"name": "ada"}, key="u1")

    await c.cancel(cancelled.run_id)
    with pytest.raises(sl.RunFailedError, match="expired"):
        await expired.result(timeout=60)
    await eventually(lambda: waiting_for(c, order.run_id, "event"), timeout=60, what="the order to wait")
    await c.publish("dup.approved", {"order": "o-1", "by": "ada"}, key="o-1")
    out = await order.result(timeout=60)
    assert out == {"reserved": "reserved o-1", "charged": "charged o-1",
                   "approval": {"order": "o-1", "by": "ada"}, "packed": "packed o-1",
                   "gift": True}

    with pytest.raises(sl.RunFailedError, match="bad input"):
        await doomed.result(timeout=60)
    await c.retry(doomed.run_id, {"n": 2}, new_payload=True)

    async def dead_again() -> bool:
        st = await c.get_run(doomed.run_id)
        return st.status == "failed" and st.dead_lettered and st.attempt == 2

    await eventually(dead_again, timeout=60, what="the retried run to fail again")
    await c.pause(task="never", reason="duplicates")  # PauseChanged
    await c.resume(task="never")

    async def welcomed() -> str | None:
        done = [r for r in await c.list_runs() if r.task_id == "welcome" and r.status == "completed"]
        return done[0].run_id if done else None

    welcome = await eventually(welcomed, timeout=60, what="the subscribed task to complete")
    return {"order": order.run_id, "doomed": doomed.run_id, "cancelled": cancelled.run_id,
            "expired": expired.run_id, "welcome": welcome}


async def quiesce(rig: Rig) -> None:
    """Write every held copy, then wait until the worker has folded the whole log."""
    for log in rig.logs:
        await log.flush()
    log = rig.logs[0].inner
    ends = {p: await log.end_offset(rig.topics.runs, p) for p in range(rig.topics.partitions)}
    await eventually(
        lambda: all(rig.worker._parts[p].next_offset >= end for p, end in ends.items()),
        timeout=60, what="the worker to fold every copy")
    # Anything a copy set off (a second start, a second request) is on the
    # log by now or never: give it the time of a few tail reads to show up.
    await asyncio.sleep(1.0)


def assert_no_step_ran_after_its_checkpoint(history: list[Event]) -> None:
    done: set[int] = set()
    for ev in history:
        if isinstance(ev.body, StepStarted):
            assert ev.body.step not in done, f"{ev.run_id}: step {ev.body.step} started after it completed"
        if isinstance(ev.body, StepCompleted):
            done.add(ev.body.step)


@pytest.mark.slow
async def test_every_event_type_delivered_twice_changes_nothing(rig: Rig) -> None:
    ids = await run_scenario(rig)
    await quiesce(rig)
    log = rig.logs[0].inner

    # 1. Side effects: one per step or attempt, as with a single delivery.
    assert dict(calls) == {"reserve": 1, "charge": 2, "pack": 1, "order-end": 1, "doomed": 2,
                           "welcome": 1}

    runs = await read_topic(log, rig.topics.runs)
    queues = await read_topic(log, rig.topics.queues)
    domain = await read_topic(log, rig.topics.events)
    everything = [ev for topic in (runs, queues, domain) for evs in topic.values() for _, ev in evs]

    # 2. Every run ended, in the state one delivery gives; none invented.
    once = {p: fold_runs(p, first_deliveries(evs)) for p, evs in runs.items()}
    twice = {p: fold_runs(p, evs) for p, evs in runs.items()}
    states: dict[str, RunState] = {}
    for p in runs:
        assert runs_view(twice[p]) == runs_view(once[p])
        assert not twice[p].paused  # paused, then resumed, whatever copies came late
        states.update(twice[p].runs)
    assert {st.task_id for st in states.values()} == {"order", "pack", "doomed", "never", "welcome"}
    assert len(states) == 6
    assert all(st.status in TERMINAL for st in states.values())
    assert states[ids["order"]].status == "completed"
    assert states[ids["order"]].attempt == 2 and len(states[ids["order"]].errors) == 1
    assert len(states[ids["order"]].retries) == 1
    assert states[ids["doomed"]].attempt == 2 and len(states[ids["doomed"]].errors) == 2
    assert states[ids["cancelled"]].status == "cancelled"
    assert states[ids["expired"]].status == "expired"
    assert json.loads(states[ids["welcome"]].output.data) == "welcome ada"  # type: ignore[union-attr]

    # 3. The worker's live state is what a rebuild from offset 0 gives.
    assert rig.worker.runs() == states

    # 4. No completed step started again in any run's accepted history.
    for p, evs in runs.items():
        part = PartitionRuns(p)
        per_run: dict[str, list[Event]] = {}
        for off, ev in first_deliveries(evs):
            before = part.fenced
            part.apply(ev, off)
            if part.fenced == before and ev.run_id:
                per_run.setdefault(ev.run_id, []).append(ev)
        for history in per_run.values():
            assert_no_step_ran_after_its_checkpoint(history)

    # 5. Admission holds nothing and waits for nothing once every run ended,
    #    whichever copies it folded.
    for p, evs in queues.items():
        folded = fold_queues(p, evs)
        assert queue_view(folded) == queue_view(fold_queues(p, first_deliveries(evs)))
        for q in folded.queues.values():
            assert not q.holders and not q.waiting, q.name

    # 6. Every event type was on the log, and delivered twice. A new event
    #    type fails here until the scenario writes it.
    copies = Counter(ev.event_id for ev in everything)
    seen = {ev.type for ev in everything}
    doubled = {ev.type for ev in everything if copies[ev.event_id] >= 2}
    assert seen == ALL_TYPES, f"the scenario writes no {sorted(ALL_TYPES - seen)}: extend it"
    assert doubled == ALL_TYPES, f"never delivered twice: {sorted(ALL_TYPES - doubled)}"


@pytest.mark.slow
async def test_any_event_redelivered_late_or_the_whole_history_twice_folds_to_the_same_state(
    rig: Rig,
) -> None:
    await run_scenario(rig)
    await quiesce(rig)
    log = rig.logs[0].inner
    runs = await read_topic(log, rig.topics.runs)
    queues = await read_topic(log, rig.topics.queues)

    for p, evs in runs.items():
        history = first_deliveries(evs)
        once = fold_runs(p, history)
        # The whole history delivered a second time (a consumer re-reading
        # from offset 0 into the same state).
        again = fold_runs(p, history + history)
        assert runs_view(again) == runs_view(once)
        # Each event redelivered once more, after everything else.
        for _, ev in history:
            late = copy.copy(once)  # run states are immutable: copying the containers will do
            for f in fields(late):
                value = getattr(late, f.name)
                if isinstance(value, (dict, set, list)):
                    setattr(late, f.name, copy.copy(value))
            late.apply(ev)
            assert runs_view(late) == runs_view(once), f"a late copy of {ev.type} changed {ev.run_id or 'the partition'}"

    for p, evs in queues.items():
        history = first_deliveries(evs)
        once_q = fold_queues(p, history)
        assert queue_view(fold_queues(p, history + history)) == queue_view(once_q)
        for _, ev in history:
            late_q = copy.deepcopy(once_q)
            late_q.apply(ev)
            assert queue_view(late_q) == queue_view(once_q), f"a late copy of {ev.type} changed {ev.run_id}"


# --- late copies of requests, where the run's state has moved on ------------------

def _ev(body: Any, seq: int = 0, epoch: int = 0, run_id: str = "r1", event_id: str | None = None,
        time: int = 1) -> Event:
    from stepline.core.ids import new_event_id
    return Event(event_id or new_event_id(), body.TYPE, run_id, "t", seq, time, epoch, body)


def _history_with_a_late_copy(events: list[Event], copy_of: int) -> tuple[list[Event], list[Event]]:
    return events, [*events, events[copy_of]]


def test_a_late_copy_of_a_cancel_does_not_stop_the_retry_it_preceded() -> None:
    from stepline.core.events import JSON, Payload, RunCancelled, RunRetriggered, RunStarted, RunTriggered
    from stepline.projections.runs import fold_events

    events = [
        _ev(RunTriggered(Payload(JSON, b"{}")), seq=1),
        _ev(RunStarted(1, "w"), seq=2, epoch=1),
        _ev(RunCancelled("stop")),
        _ev(RunRetriggered(None)),
        _ev(RunStarted(2, "w"), seq=3, epoch=1),
    ]
    once, late = _history_with_a_late_copy(events, 2)
    assert fold_events(once)["r1"].status == "running"
    assert fold_events(late) == fold_events(once)


def test_a_late_copy_of_a_retrigger_does_not_restart_a_run_that_failed_again() -> None:
    from stepline.core.events import (
        JSON,
        ErrorInfo,
        Payload,
        RunFailed,
        RunRetriggered,
        RunStarted,
        RunTriggered,
    )
    from stepline.projections.runs import fold_events

    boom = ErrorInfo("ValueError", "boom", "", False)
    events = [
        _ev(RunTriggered(Payload(JSON, b"{}")), seq=1),
        _ev(RunStarted(1, "w"), seq=2, epoch=1),
        _ev(RunFailed(boom, 1), seq=3, epoch=1),
        _ev(RunRetriggered(None)),
        _ev(RunStarted(2, "w"), seq=4, epoch=1),
        _ev(RunFailed(boom, 2), seq=5, epoch=1),
    ]
    once, late = _history_with_a_late_copy(events, 3)
    assert fold_events(once)["r1"].status == "failed"
    assert fold_events(late) == fold_events(once)


def test_a_late_copy_of_a_grant_gives_no_slot_to_the_next_attempt() -> None:
    from stepline.core.events import JSON, Payload, RetryScheduled, RunStarted, RunTriggered, SlotGranted
    from stepline.projections.runs import fold_events

    events = [
        _ev(RunTriggered(Payload(JSON, b"{}"), queue="q"), seq=1),
        _ev(SlotGranted("q")),
        _ev(RunStarted(1, "w"), seq=2, epoch=1),
        _ev(RetryScheduled(2, 10, 9, "boom"), seq=3, epoch=1),  # the attempt gave its slot back
    ]
    once, late = _history_with_a_late_copy(events, 1)
    assert fold_events(once)["r1"].slot is None
    assert fold_events(late)["r1"].slot is None


@pytest.mark.parametrize("late", ["SlotRequested", "SlotGranted", "SlotReleased"])
def test_a_late_copy_of_an_admission_event_leaves_the_queue_as_it_was(late: str) -> None:
    from stepline.core.events import PartitionClaimed, SlotGranted, SlotReleased, SlotRequested

    request = SlotRequested("q", limit=1)
    first = [_ev(request, event_id="req-1"), _ev(SlotGranted("q"), epoch=1, event_id="grant-1"),
             _ev(SlotReleased("q", reason="RetryScheduled"), event_id="rel-1")]
    # The next attempt asks again and is admitted again.
    second = [_ev(request, event_id="req-2"), _ev(SlotGranted("q"), epoch=1, event_id="grant-2")]
    claim = _ev(PartitionClaimed(0, "w"), epoch=1, run_id="")
    events = [claim, *first, *second]
    copy_of = {"SlotRequested": first[0], "SlotGranted": first[1], "SlotReleased": first[2]}[late]
    once = fold_queues(0, list(enumerate(events)))
    again = fold_queues(0, list(enumerate([*events, copy_of])))
    assert once.queues["q"].holders == {"r1": None}
    assert queue_view(again) == queue_view(once)
