"""Queue admission state as a fold of the queues topic.

A limited queue's records all live in one partition of `<ns>.queues` (keyed
by queue name), so one owner sees every request, grant and release of the
queue, and its concurrency limit holds across all workers. The fold is pure;
the owner decides grants from it (`next_grants`) and appends them, and a new
owner rebuilding the partition arrives at the same holders and waiters.

Order of admission: higher priority first, then first requested (the run's
trigger time), skipping runs whose concurrency key is at its own limit, and
never more starts per period than the rate limit allows.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stepline.core.events import (
    PAUSE_QUEUE,
    PAUSE_TASK,
    Event,
    PartitionClaimed,
    PauseChanged,
    SlotGranted,
    SlotReleased,
    SlotRequested,
)


@dataclass(frozen=True, slots=True)
class Waiter:
    run_id: str
    task_id: str
    key: str | None
    priority: int
    created_at: int


@dataclass(slots=True)
class QueueState:
    name: str
    limit: int | None = None
    key_limit: int | None = None
    rate_limit: int | None = None
    rate_period_ms: int | None = None
    holders: dict[str, str | None] = field(default_factory=dict)  # run id -> key
    per_key: Counter[str | None] = field(default_factory=Counter)
    waiting: dict[str, Waiter] = field(default_factory=dict)
    # (-priority, created_at, run_id); entries of runs no longer waiting are
    # skipped when they surface (lazy deletion).
    _heap: list[tuple[int, int, str]] = field(default_factory=list)
    # Times of recent grants, for the rate limit.
    granted_at: deque[int] = field(default_factory=deque)

    def _wait(self, w: Waiter) -> None:
        self.waiting[w.run_id] = w
        heapq.heappush(self._heap, (-w.priority, w.created_at, w.run_id))

    def _hold(self, run_id: str, key: str | None, at: int) -> None:
        self.waiting.pop(run_id, None)
        self.holders[run_id] = key
        self.per_key[key] += 1
        self.granted_at.append(at)

    def _drop(self, run_id: str) -> None:
        self.waiting.pop(run_id, None)
        if run_id in self.holders:
            key = self.holders.pop(run_id)
            self.per_key[key] -= 1
            if self.per_key[key] <= 0:
                del self.per_key[key]

    def rate_allows(self, now: int) -> tuple[int, int | None]:
        """(starts allowed now, when the next one frees up) under the rate limit."""
        if self.rate_limit is None or self.rate_period_ms is None:
            return 1 << 30, None
        horizon = now - self.rate_period_ms
        while self.granted_at and self.granted_at[0] <= horizon:
            self.granted_at.popleft()
        free = self.rate_limit - len(self.granted_at)
        if free > 0:
            return free, None
        return 0, self.granted_at[0] + self.rate_period_ms

    def next_grants(self, now: int, held: Callable[[Waiter], bool] | None = None) -> tuple[list[Waiter], int | None]:
        """The waiters to admit now, best first, and when to look again if
        the rate limit holds some back. `held` waiters (their task or queue
        is paused) keep their place and get nothing."""
        capacity = (self.limit - len(self.holders)) if self.limit is not None else 1 << 30
        allowed, retry_at = self.rate_allows(now)
        budget = min(capacity, allowed)
        picked: list[Waiter] = []
        skipped: list[tuple[int, int, str]] = []
        taken: Counter[str | None] = Counter()
        while budget > 0 and self._heap:
            entry = heapq.heappop(self._heap)
            w = self.waiting.get(entry[2])
            if w is None or (-w.priority, w.created_at) != entry[:2]:
                continue  # no longer waiting, or re-queued under another priority
            if held is not None and held(w):
                skipped.append(entry)
                continue
            if self.key_limit is not None and w.key is not None and \
                    self.per_key[w.key] + taken[w.key] >= self.key_limit:
                skipped.append(entry)
                continue
            picked.append(w)
            taken[w.key] += 1
            budget -= 1
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        for w in picked:  # they stay waiting until their grant is folded
            heapq.heappush(self._heap, (-w.priority, w.created_at, w.run_id))
        more_waiting = len(self.waiting) > len(picked)
        if held is not None and more_waiting and all(held(w) for w in self.waiting.values() if w not in picked):
            more_waiting = False  # only paused runs wait: a resume looks again, not the clock
        return picked, retry_at if more_waiting else None


# How many recent admission events a partition remembers by id. Requests,
# grants, releases and pauses carry no sequence number, so a copy of one delivered
# again (a producer's retry) is only known by its id: a late copy of a
# request would queue a run that has ended (and a grant would then hold its
# slot forever), a late release would free the slot of a later attempt. A
# copy comes within a producer's retries, seconds; the window keeps the
# memory bounded, and it is the same for every rebuild from offset 0.
SEEN_WINDOW = 50_000


@dataclass(slots=True)
class QueuePartition:
    partition: int
    epoch: int = 0
    next_offset: int = 0
    queues: dict[str, QueueState] = field(default_factory=dict)
    # Ids of the last SEEN_WINDOW admission events, oldest first.
    seen: dict[str, None] = field(default_factory=dict)
    # Paused tasks and queues, (scope, name): their waiters are not granted.
    paused: set[tuple[str, str]] = field(default_factory=set)

    def held(self, queue: str) -> Callable[[Waiter], bool] | None:
        """The `next_grants` filter of what is paused on this queue, None when nothing is."""
        if not self.paused:
            return None
        if (PAUSE_QUEUE, queue) in self.paused:
            return lambda w: True
        paused = self.paused
        return lambda w: (PAUSE_TASK, w.task_id) in paused

    def queue(self, name: str) -> QueueState:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = QueueState(name)
        return q

    def apply(self, event: Event, offset: int | None = None) -> QueueState | None:
        """Fold one event; the queue it touched, if any."""
        if offset is not None:
            self.next_offset = offset + 1
        body = event.body
        if isinstance(body, PartitionClaimed):
            self.epoch = max(self.epoch, event.epoch)
            return None
        if not isinstance(body, (SlotRequested, SlotGranted, SlotReleased, PauseChanged)):
            return None
        if event.event_id in self.seen:
            return None  # a copy of an event already folded
        self.seen[event.event_id] = None
        if len(self.seen) > SEEN_WINDOW:
            del self.seen[next(iter(self.seen))]
        if isinstance(body, PauseChanged):
            if body.paused:
                self.paused.add((body.scope, body.name))
            else:
                self.paused.discard((body.scope, body.name))
            return None
        if isinstance(body, SlotRequested):
            q = self.queue(body.queue)
            # The newest request states the limits: a deploy that changes
            # them takes effect with the next request.
            q.limit, q.key_limit = body.limit, body.key_limit
            q.rate_limit, q.rate_period_ms = body.rate_limit, body.rate_period_ms
            w = Waiter(event.run_id, event.task_id, body.concurrency_key, body.priority, body.created_at)
            if event.run_id not in q.holders and q.waiting.get(event.run_id) != w:
                q._wait(w)
            return q
        if isinstance(body, SlotGranted):
            if event.epoch < self.epoch:
                return None  # decided by an owner that has been replaced
            q = self.queue(body.queue)
            if event.run_id in q.waiting:
                q._hold(event.run_id, body.concurrency_key, event.time)
            return q
        q = self.queue(body.queue)
        q._drop(event.run_id)
        return q
