"""What holds a run back, read from the log: `Client.why(run_id)`.

The run's own state says whether it is delayed, retrying, waiting or ended.
For a run of a limited queue the queue's admission fold says more: its place
among the waiters, who holds the slots and the concurrency key, when the
rate limit frees up. That fold lives in one partition of the queues topic
(the queue's, projections/queues.py); the same partition carries every
pause, in order, with who paused and when. So one partition is read and
folded, as its owner folds it, and projections/why.py explains.
"""

from __future__ import annotations

from stepline.client._reading import Reading
from stepline.core import codec
from stepline.core.events import PauseChanged
from stepline.log.base import partition_for
from stepline.log.topics import Topics
from stepline.projections.queues import QueuePartition, QueueState
from stepline.projections.runs import LIVE
from stepline.projections.why import Pause, Reason, explain

_BATCH = 5000


async def _fold_queues(client: Reading, topics: Topics, partition: int) -> tuple[QueuePartition, dict[tuple[str, str], Pause]]:
    topic = topics.queues
    fold = QueuePartition(partition)
    pauses: dict[tuple[str, str], Pause] = {}
    end = await client.log.end_offset(topic, partition)
    offset = 0
    while offset < end:
        recs = await client.log.read(topic, partition, offset, _BATCH)
        if not recs:
            break
        for r in recs:
            if r.offset >= end:
                break
            ev = codec.decode(r.value)
            fold.apply(ev, r.offset)
            body = ev.body
            if isinstance(body, PauseChanged):
                if body.paused:
                    pauses[(body.scope, body.name)] = Pause(body.scope, body.name, body.reason,
                                                            body.requested_by, ev.time)
                else:
                    pauses.pop((body.scope, body.name), None)
        offset = recs[-1].offset + 1
    return fold, pauses


async def reasons(client: Reading, run_id: str) -> list[Reason]:
    """The reasons `run_id` is not executing now (UnknownRun when the log has no such run)."""
    state = await client.get_run(run_id)
    now = client.clock()
    if state.status not in LIVE:
        return explain(state, now)
    # A pool's runs are admitted by its own queues topic (engine/log/topics.py).
    pool = await client.home(run_id)
    topics = client.topics.of_pool(pool)
    queue_name = state.queue
    partition = partition_for(queue_name.encode(), await client.log.partitions(topics.queues)) if queue_name else 0
    fold, pauses = await _fold_queues(client, topics, partition)
    queue: QueueState | None = fold.queues.get(queue_name) if queue_name else None
    alive = await client.log.group_alive(topics.worker_group)
    return explain(state, now, queue=queue, pauses=pauses, pool=pool, workers_alive=alive)


__all__ = ["reasons"]
