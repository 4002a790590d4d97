"""The worker: owns partitions, folds their events, runs what is runnable.

`Worker` is the public face and the wiring; the work is done by its parts,
each with one job:

* `Owned` (owned.py): the table of owned partitions: their folded runs,
  the epoch of each claim, the trace context of live runs, and the events
  appended here and not yet read back.
* `Partitions` (ownership.py): ownership: claim with a new epoch, rebuild
  from snapshot + tail, tail the owned partitions, revoke (the numbered
  lifecycle is there).
* `Decider` (deciding.py): what each run needs next (start, resume, retry,
  wake, expire, recover), its timers, and the start of ready runs under
  the worker's concurrency.
* `Executor` (executor.py): one attempt: its context, span and body
  (runner.py inline, isolation.py in a child process).
* `Fence` (fence.py): appending a run's events with the epoch of its
  partition's claim and the run's next sequence number; unfenced requests.
* `Slots` (slots.py): the run side of queue admission (admission.py is the
  owner side): slots asked for and held, released before an outcome.

The worker writes its own events through the Appender and folds them when
it reads them back, in log order like everyone else's; to save decoding,
the events it appended are kept by offset until read back.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from stepline.client import Client
from stepline.client.backfill import backfill_new_subscriptions
from stepline.consumers.external import ExternalTopics
from stepline.consumers.router import Router
from stepline.core.events import Body, Event
from stepline.log.appender import Appender
from stepline.log.base import Log, Membership, partition_for
from stepline.log.topics import Topics
from stepline.projections.runs import PartitionRuns, RunState
from stepline.runtime.admission import Admission
from stepline.runtime.background import Background
from stepline.runtime.deciding import Decider
from stepline.runtime.executor import Executor
from stepline.runtime.fence import Fence
from stepline.runtime.owned import Owned
from stepline.runtime.ownership import Partitions
from stepline.runtime.slots import Slots
from stepline.sdk.context import now_ms
from stepline.sdk.interceptors import Interceptor, Interceptors, default_interceptors
from stepline.sdk.schedule import Scheduler
from stepline.sdk.task import Registry, Task
from stepline.security.keystore import KeyStore, default_keystore

# A run that ended for good (completed, expired) stays whole in the worker's
# memory until its partition is this many offsets further on; after that only
# its id is kept, so a repeated trigger of it stays a no-op (~100 bytes, not
# the ~4 KB of a whole run). About 200 three-step runs per partition: enough
# for whoever looks an ended run up right after it ended.
KEEP_ENDED = 2_000


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


class Worker:
    """Runs the tasks of a registry from a log. Use as an async context manager."""

    def __init__(
        self,
        registry: Registry,
        log_: Log,
        *,
        topics: Topics | None = None,
        concurrency: int = 256,
        worker_id: str | None = None,
        clock: Callable[[], int] = now_ms,
        read_batch: int = 2000,
        client: Client | None = None,
        snapshot_every: int = 50_000,
        route_events: bool = True,
        keys: KeyStore | None = None,
        interceptors: Sequence[Interceptor] | None = None,
        keep_ended: int | None = KEEP_ENDED,
        instance_id: str | None = None,
    ) -> None:
        self.log = log_
        self.topics = topics = topics or Topics()
        # The worker pool this worker runs (topics.pool): it owns that pool's
        # runs topic and starts only that pool's tasks; its router, schedules
        # and topic readers serve that pool's tasks alone, so each pool's
        # fleet does its own share whichever pools are running.
        self.pool = topics.pool
        if client is not None and client.topics.pool != self.pool:
            raise ValueError(f"the worker of pool {self.pool!r} needs a client of the same pool "
                             f"(Client(topics=...) with pool={self.pool!r}), not {client.topics.pool!r}")
        mine = Registry(t for t in registry if t.pool == self.pool)
        self.worker_id = worker_id = worker_id or default_worker_id()
        # Its stable identity in the worker group across restarts (Kafka
        # static membership, Log.join_group); None: a new member each start.
        self.instance_id = instance_id
        self.clock = clock
        self._read_batch = read_batch
        # Route domain events to subscribed tasks and waiting runs (needs a
        # client to append with).
        self._router: Router[Task[Any, Any]] | None = (
            Router(mine, client, retroactive=functools.partial(backfill_new_subscriptions, client))
            if route_events and client is not None else None
        )
        # Records of Kafka topics other services write, to tasks subscribed with sl.KafkaTopic.
        self._external: ExternalTopics[Task[Any, Any]] | None = (
            ExternalTopics(mine, client)
            if route_events and client is not None and any(t.topic_subscriptions for t in mine) else None
        )
        self._scheduler: Scheduler | None = (
            Scheduler(mine, client) if client is not None
            and any(t.schedule is not None for t in mine) else None
        )
        # Appends to runs of other pools (a child's answer to its parent).
        self._foreign: dict[str, tuple[Appender, int]] = {}
        # Tasks that trigger other tasks use this client.
        self.client = client
        # Subject keys to open sensitive payload fields with: the client's, unless given.
        self.keys = keys if keys is not None else (
            client.keys if client is not None else default_keystore(log_.url))
        self._membership: Membership | None = None
        # Hooks around runs and attempts (tracing, sealing of sensitive
        # fields): one list per worker, since an interceptor may keep per-run state.
        self.interceptors = hooks = Interceptors(
            default_interceptors() if interceptors is None else interceptors)
        self._owned = owned = Owned(hooks)
        self._background = background = Background()
        # Admission to limited queues: this worker owns some queues
        # partitions (and grants their slots), and its runs ask for slots.
        self._admission = Admission(log_, topics, self._request, clock, worker_id)
        self._slots = slots = Slots(self._admission)
        self._appender = appender = Appender(log_, topics.runs, owned.on_appended, timed=hooks.appended)
        self._fence = fence = Fence(owned, appender, slots, clock, self.pool, self._request_foreign)
        self._executor = executor = Executor(
            registry, log_, topics, owned, fence, slots, background,
            worker_id=worker_id, clock=clock, client=client, keys=self.keys, hooks=hooks,
        )
        self._decider = decider = Decider(
            registry, owned, fence, slots, executor, clock=clock, concurrency=concurrency)
        self._partitions = Partitions(
            log_, topics, owned, appender, decider, slots, background,
            worker_id=worker_id, clock=clock, read_batch=read_batch, snapshot_every=snapshot_every,
            keep_ended=keep_ended,
        )
        self.started = asyncio.Event()

    @property
    def registry(self) -> Registry:
        return self._decider.registry

    @registry.setter
    def registry(self, registry: Registry) -> None:
        self._decider.registry = self._executor.registry = registry

    @property
    def concurrency(self) -> int:
        return self._decider.concurrency

    @concurrency.setter
    def concurrency(self, concurrency: int) -> None:
        self._decider.concurrency = concurrency

    @property
    def snapshot_every(self) -> int:
        """Events folded between snapshots of a partition."""
        return self._partitions.snapshot_every

    @snapshot_every.setter
    def snapshot_every(self, every: int) -> None:
        self._partitions.snapshot_every = every

    @property
    def rebuilt_from(self) -> dict[int, int]:
        """Where each claimed partition's rebuild started (0 without a snapshot)."""
        return self._partitions.rebuilt_from

    # --- lifecycle -------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self.log.ensure_topics(self.topics.specs())
        if self._external is not None:  # a missing subscribed topic fails the start before anything runs
            await self._external.prepare()
        self._owned.nparts = await self.log.partitions(self.topics.runs)
        await self._admission.prepare()
        self._decider.timers.start()
        # Ticks first: on the single-seat backends joining the group waits
        # while another worker holds it, and a standby firing ticks is
        # harmless (one run per tick) and keeps schedules going if the
        # active worker is wedged.
        if self._scheduler is not None:
            self._scheduler.start()
        # Passed only when set: a Log written before join_group took it still works without one.
        static = {} if self.instance_id is None else {"instance_id": self.instance_id}
        self._membership = await self.log.join_group(
            self.topics.worker_group, self.topics.runs, self._partitions.on_assign, self._partitions.on_revoke,
            **static,
        )
        if self._router is not None:
            await self._router.start()
        if self._external is not None:
            await self._external.start()
        await self._admission.start()
        self.interceptors.started(self)
        self.started.set()

    @property
    def draining(self) -> bool:
        """True from the start of a drain (or close): no attempt starts any more."""
        return self._decider.draining or self._decider.stopping

    async def drain(self, grace: float) -> int:
        """The first half of a graceful stop (`close(grace=...)`, or SIGTERM
        to `stepline worker`): start no attempt any more, and give the
        running ones up to `grace` seconds to end. Each ends before its next
        step would start (its completed steps are checkpointed; the run's
        next owner resumes it from there) or by finishing. Returns how many
        still run; `close()` cancels those. Cancelling `drain` cuts the
        wait short. The partitions stay owned until `close()`."""
        return await self._decider.drain(grace)

    async def close(self, grace: float = 0.0) -> None:
        """Stop: with a `grace` (seconds), `drain` first; then cancel the
        attempts still running and give every partition up."""
        if grace > 0 and self._membership is not None:
            await self.drain(grace)
        self._decider.stopping = True
        self.interceptors.stopped(self)
        await self._admission.close()
        if self._scheduler is not None:
            await self._scheduler.close()
        if self._external is not None:
            await self._external.close()
        if self._router is not None:
            await self._router.close()
        if self._membership is not None:
            await self._partitions.on_revoke(frozenset(self._owned.parts))
            await self._membership.leave()
            self._membership = None
        await self._decider.timers.stop()
        await self._background.wait()
        await self._appender.drain()
        for foreign, _ in self._foreign.values():
            await foreign.drain()

    def _request(self, run_id: str, task_id: str, body: Body) -> asyncio.Future[int]:
        """Admission's notices of grants: requests to runs, owned here or not.
        (A method: the fence is built after admission, whose slots it gates.)"""
        return self._fence.request(run_id, task_id, body)

    def _request_foreign(self, ev: Event, pool: str) -> asyncio.Future[int]:
        return asyncio.ensure_future(self._append_foreign(ev, pool))

    async def _append_foreign(self, ev: Event, pool: str) -> int:
        """A request to a run of another pool, on that pool's runs topic
        (unfenced, like every request: that pool's owner folds it)."""
        found = self._foreign.get(pool)
        if found is None:
            topics = self.topics.of_pool(pool)
            await self.log.ensure_topics(topics.pool_specs())
            found = self._foreign[pool] = (Appender(self.log, topics.runs), await self.log.partitions(topics.runs))
        appender, nparts = found
        key = ev.run_id.encode()
        return await appender.submit(ev, key, partition_for(key, nparts))

    # --- introspection (tests, CLI, gauges, benchmarks) ------------------

    def runs(self) -> dict[str, RunState]:
        return self._owned.runs()

    def queue_depths(self) -> dict[str, int]:
        """Runs ready to start here, by queue (the `stepline.queue.depth` gauge)."""
        return self._decider.ready.depths()

    def run_counts(self) -> dict[str, int]:
        """Runs of the owned partitions by state (the `stepline.partition.runs` gauge)."""
        return self._owned.run_counts()

    @property
    def active(self) -> int:
        return self._decider.active

    @property
    def owned(self) -> frozenset[int]:
        return frozenset(self._owned.parts)

    @property
    def _parts(self) -> dict[int, PartitionRuns]:
        return self._owned.parts

    async def _catch_up(self, part: PartitionRuns, end: int) -> None:
        """The rebuild's fold (bench/workloads_replay.py measures it)."""
        await self._partitions.catch_up(part, end)
