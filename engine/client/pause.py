"""Pausing a task or a queue: its runs stay queued until it is resumed.

`Client.pause(task=...)` / `Client.pause(queue=...)` (also `stepline pause
task|queue NAME`, `POST /v1/tasks/{id}/pause`, `POST /v1/queues/{name}/pause`)
appends one `PauseChanged` request (schema v5) to every partition of the runs
topic and of the queues topic, with an empty key and no run:

* Each runs partition's fold (`PartitionRuns.paused`) knows what is paused,
  in log order with that partition's own runs, and snapshots keep it. So the
  partition's owner, whichever worker that is and after any restart or
  rebuild, holds back every run of a paused task or queue: a pending run, a
  due retry or a run woken from a sleep stays queued (status `pending` or
  `retrying`; the run lists mark it `paused`). Triggers are still accepted
  and recorded; nothing is dropped.
* Runs of a limited queue are held by the queue's owner instead: the queues
  partition's fold (`QueuePartition.paused`) grants no slot to a paused
  task's or queue's waiters, who keep their place in the queue.
* An attempt already under way is not interrupted: it runs to its end
  (completed, failed, or suspended at a sleep or wait). Its next attempt, a
  retry or the wake-up after the sleep, is held. A run whose worker died
  mid-attempt is restarted even while paused: that attempt began before.
* Resuming appends `PauseChanged(paused=False)`; every owner then starts the
  held runs in their usual order (priority, then trigger time), and queue
  owners grant again.

A pause and a resume are idempotent (the last one in each partition wins).
Listing what is paused reads partition 0 of the queues topic (`pauses()`),
which carries every pause, and is small next to the runs topic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from stepline.core import codec
from stepline.core.events import PAUSE_QUEUE, PAUSE_TASK, Event, PauseChanged
from stepline.core.ids import new_event_id
from stepline.errors import LogError, SteplineError
from stepline.log.base import Log
from stepline.log.headers import append_event
from stepline.log.topics import Topics
from stepline.sdk.task import Registry


class Connection(Protocol):
    """What a pause asks of a client (`stepline.Client` is one, and calls these)."""

    log: Log
    topics: Topics
    registry: Registry | None
    clock: Callable[[], int]

    async def pools(self) -> list[str]: ...

    async def open_pool(self, pool: str) -> int: ...

SCOPES = (PAUSE_TASK, PAUSE_QUEUE)


class InvalidPause(SteplineError, ValueError):
    """A pause or resume that names no task or queue, or one the app does not have."""


def check_scope(scope: str, name: str) -> None:
    if scope not in SCOPES:
        raise InvalidPause(f"can pause a task or a queue, not {scope!r}")
    if not isinstance(name, str) or not name.strip():
        raise InvalidPause(f"the {scope} to pause or resume needs a non-empty name, got {name!r}")


def scope_of(task: str | None, queue: str | None) -> tuple[str, str]:
    """(scope, name) from exactly one of task= and queue=."""
    if (task is None) == (queue is None):
        raise InvalidPause("name exactly one of task= or queue=")
    scope, name = (PAUSE_TASK, task) if task is not None else (PAUSE_QUEUE, queue)
    assert name is not None
    check_scope(scope, name)
    return scope, name


def _check_known(client: Connection, scope: str, name: str) -> None:
    """With the app's tasks at hand, a misspelt name is an error, not a pause of nothing."""
    registry = client.registry
    if registry is None:
        return
    if scope == PAUSE_TASK:
        registry.get(name)  # raises UnknownTask
        return
    queues = sorted({t.queue.name for t in registry})
    if name not in queues:
        raise InvalidPause(f"no task of this app uses a queue named {name!r}; its queues: {', '.join(queues)}")


async def set_paused(client: Connection, scope: str, name: str, paused: bool, *, reason: str = "",
                     requested_by: str = "api") -> PauseChanged:
    """Append PauseChanged to every partition of the runs and queues topics
    of every worker pool (a queue's runs may live in several pools).

    Returns once every copy is durable, so every partition's owner, present
    or future, folds it. A failure part-way leaves some partitions paused:
    the error says so, and repeating the call (idempotent) finishes it.
    """
    check_scope(scope, name)
    _check_known(client, scope, name)
    body = PauseChanged(scope, name, paused, reason, requested_by)
    event = Event(new_event_id(), body.TYPE, "", "", 0, client.clock(), 0, body)
    codec.encode(event)  # a bad event fails here, before any partition gets it
    appends = []
    names = await client.pools()
    for pool in names:
        # A pool the app declares may have no worker yet, nor topics: made
        # now, so its first worker folds the pause like every other.
        await client.open_pool(pool)
    pools = [client.topics.of_pool(pool) for pool in names]
    for topic in [name for t in pools for name in (t.runs, t.queues)]:
        for p in range(await client.log.partitions(topic)):
            appends.append(append_event(client.log, topic, p, b"", event))
    results = await asyncio.gather(*appends, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        verb = "pause" if paused else "resume"
        raise LogError(
            f"could not {verb} {scope} {name!r} on {len(failed)} of {len(appends)} partitions "
            f"({failed[0]}); repeat the request to finish it") from failed[0]
    return body


async def pauses(client: Connection) -> dict[tuple[str, str], PauseChanged]:
    """What is paused now, by (scope, name): a fold of partition 0 of the queues topic."""
    topic = client.topics.queues
    end = await client.log.end_offset(topic, 0)
    out: dict[tuple[str, str], PauseChanged] = {}
    offset = 0
    while offset < end:
        recs = await client.log.read(topic, 0, offset, 5000)
        if not recs:
            break
        for r in recs:
            if r.offset < end and codec.peek_type(r.value) == b"PauseChanged":
                body = codec.decode(r.value).body
                if isinstance(body, PauseChanged):
                    if body.paused:
                        out[(body.scope, body.name)] = body
                    else:
                        out.pop((body.scope, body.name), None)
        offset = recs[-1].offset + 1
    return out


__all__ = ["SCOPES", "InvalidPause", "check_scope", "pauses", "scope_of", "set_paused"]
