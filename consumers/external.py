"""Reading Kafka topics Stepline does not own into runs (`stepline.KafkaTopic`).

Each task's subscription to a topic is a consumer group of its own,
`<namespace>.topic.<topic>:<task id>` (`topic_group`), so every task keeps
its own place in the topic and `since=` means the same for a task added
later. Per assigned partition, in order, a reader decodes a batch of
records, appends one RunTriggered per record that matches, and commits the
offset only once those are durable: delivery is at least once. The run id
derives from the task and the record's place (`record_key`: topic,
partition, offset), so a record read again after a crash before the commit,
or a rebalance, maps to the run it already started, and the fold ignores
the repeated trigger: never a second run.

Where a group has no committed offset for a partition (the subscription's
first start) its reader begins at the partition's end, as Kafka consumers
do by default (`auto.offset.reset=latest`), or at `since=` back in time, and
commits that place at once, so a restart does not skip what came meanwhile.

A record whose value does not decode (not JSON, not Avro of the schema), or
that the engine refuses as a payload (too large), is copied to the
quarantine topic with the reason (engine/log/quarantine.py) and the
partition moves on. A record with no value (a tombstone of a compacted
topic) starts nothing. A failed read, trigger or commit (the broker away) is
logged and the reader starts again from the committed offset after a pause.

Two decisions, made at worker start:

* A subscribed topic that does not exist is an error (`UnknownTopic`),
  as for `sl.emit`: a typo or a missing deployment fails the rollout at once
  instead of becoming a subscription that silently waits; Stepline never
  creates topics it does not own.
* Only the Kafka backend has such topics (its log offers `external_view()`).
  On sqlite and memory the subscriptions are inert and a warning names them:
  the same registry runs on every backend (the test kit and `stepline dev`
  use memory and sqlite), and there is no topic there whose records could
  be missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import structlog

from stepline.consumers.router import RouterClient
from stepline.consumers.topic_subscription import KafkaTopic, MalformedRecord
from stepline.core.ids import record_key
from stepline.errors import PayloadTooLarge, PayloadValidationError, UnknownTopic
from stepline.log.base import Assignment, Log, Membership, Record
from stepline.log.quarantine import quarantine
from stepline.log.redact import redact_url

log = structlog.get_logger("stepline.topics")

__all__ = ["ExternalTopics", "ExternalView", "TopicReader", "TopicSubscriber", "topic_group"]

_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 30.0
_QUARANTINE_MAX_BYTES = 256 * 1024


@runtime_checkable
class ExternalView(Protocol):
    """A log that can read topics Stepline does not own (the Kafka log)."""

    def external_view(self) -> Log: ...


class TopicSubscriber(Protocol):
    """A task as this module sees it (`stepline.Task` is one)."""

    @property
    def id(self) -> str: ...

    @property
    def topic_subscriptions(self) -> Sequence[KafkaTopic]: ...


def topic_group(namespace: str, topic: str, task_id: str) -> str:
    """The consumer group of a task's subscription to a topic.

    NEVER change this format: the committed offsets live under it, and a
    new name would start the subscription again at the topic's end.
    Topic names cannot hold ':', so no two subscriptions share a group.
    """
    return f"{namespace}.topic.{topic}:{task_id}"


S = TypeVar("S", bound=TopicSubscriber)


class ExternalTopics(Generic[S]):
    """Every subscription of a registry to a Kafka topic: what the worker wires.

    `prepare()` checks the backend and the topics before the worker joins
    anything; `start()` joins the groups; `close()` leaves them.
    """

    def __init__(self, registry: Iterable[S], client: RouterClient, read_batch: int = 500) -> None:
        self.client = client
        self.subscribers = [(t.id, tuple(t.topic_subscriptions)) for t in registry if t.topic_subscriptions]
        self._read_batch = read_batch
        self._view: Log | None = None
        self.readers: list[TopicReader] = []
        self.inert = False

    async def prepare(self) -> None:
        described = [f"{task}: {', '.join(sorted({s.topic for s in subs}))}" for task, subs in self.subscribers]
        if not isinstance(self.client.log, ExternalView):
            self.inert = True
            log.warning("subscriptions to Kafka topics are inert: only the Kafka backend has topics "
                        "Stepline does not own", log=redact_url(self.client.log.url), subscriptions=described)
            return
        view = self.client.log.external_view()
        await view.start()
        try:
            for task_id, subs in self.subscribers:
                by_topic: dict[str, list[KafkaTopic]] = {}
                for s in subs:
                    by_topic.setdefault(s.topic, []).append(s)
                for topic, same in by_topic.items():
                    await self._check_exists(view, task_id, topic)
                    self.readers.append(TopicReader(task_id, same, self.client, view, self._read_batch))
        except BaseException:
            self.readers.clear()
            await view.close()
            raise
        self._view = view

    async def _check_exists(self, view: Log, task_id: str, topic: str) -> None:
        try:
            await view.partitions(topic)
        except UnknownTopic:
            raise UnknownTopic(
                f"task {task_id!r} subscribes to the Kafka topic {topic!r} (stepline.KafkaTopic), which "
                f"does not exist on {redact_url(self.client.log.url)}; create it first (Stepline does not "
                "create topics it does not own)") from None

    async def start(self) -> None:
        for reader in self.readers:
            await reader.start()

    async def close(self) -> None:
        for reader in self.readers:
            await reader.close()
        self.readers.clear()
        if self._view is not None:
            view, self._view = self._view, None
            await view.close()

    @property
    def triggered(self) -> int:
        return sum(r.triggered for r in self.readers)

    @property
    def quarantined(self) -> int:
        return sum(r.quarantined for r in self.readers)


class TopicReader:
    """One task's subscriptions to one topic: its group, a reader per partition."""

    def __init__(self, task_id: str, subs: Sequence[KafkaTopic], client: RouterClient, view: Log,
                 read_batch: int = 500) -> None:
        self.task_id = task_id
        self.subs = tuple(subs)
        self.topic = subs[0].topic
        self.client = client
        self.view = view
        self.group = topic_group(client.topics.namespace, self.topic, task_id)
        self._read_batch = read_batch
        self._membership: Membership | None = None
        self._readers: dict[int, asyncio.Task[None]] = {}
        self.triggered = 0
        self.quarantined = 0

    async def start(self) -> None:
        self._membership = await self.view.join_group(self.group, self.topic, self._on_assign, self._on_revoke)

    async def close(self) -> None:
        if self._membership is not None:
            membership, self._membership = self._membership, None
            await membership.leave()
        await self._on_revoke(frozenset(self._readers))

    async def _on_assign(self, assignment: Assignment) -> None:
        # Where each partition starts is fixed before the join returns, so
        # whatever is published once the worker has started is seen.
        try:
            starts = await self._start_offsets(assignment.partitions)
        except Exception as exc:  # each reader finds its place itself, retrying
            log.warning("cannot read where a Kafka topic subscription stands; its readers will retry",
                        topic=self.topic, task=self.task_id, error=f"{type(exc).__name__}: {exc}")
            starts = {}
        for p in assignment.partitions:
            self._readers[p] = asyncio.create_task(self._follow(p, starts.get(p)),
                                                   name=f"stepline-topic-{self.topic}-{p}")

    async def _on_revoke(self, partitions: frozenset[int]) -> None:
        tasks = [self._readers.pop(p) for p in partitions if p in self._readers]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, p: int, offset: int | None) -> None:
        pause = _RETRY_FIRST_S
        while True:
            try:
                if offset is None:
                    offset = (await self._start_offsets(frozenset((p,))))[p]
                recs = await self.view.read(self.topic, p, offset, self._read_batch, timeout=1.0)
                if not recs:
                    continue
                # Durable first, then acknowledge: the runs, then the offset.
                await self._handle(p, recs)
                offset = recs[-1].offset + 1
                await self.view.commit(self.group, self.topic, {p: offset})
                pause = _RETRY_FIRST_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker away, a rebalance: again from the committed offset
                log.warning("reading a Kafka topic failed; retrying from the committed offset",
                            topic=self.topic, partition=p, task=self.task_id, retry_in_s=pause,
                            error=f"{type(exc).__name__}: {exc}")
                offset = None
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX_S)

    async def _start_offsets(self, partitions: frozenset[int]) -> dict[int, int]:
        """The committed offsets; where there is none (the first start), the
        end of the partition or `since` back, committed at once so that a
        restart goes on from there rather than from a later end."""
        committed = await self.view.committed(self.group, self.topic)
        starts = {p: committed[p] for p in partitions if p in committed}
        fresh = {}
        since = self.subs[0].since
        for p in sorted(partitions - starts.keys()):
            if since is None:
                fresh[p] = await self.view.end_offset(self.topic, p)
            else:
                ms = int(since.total_seconds() * 1000)
                fresh[p] = await self.view.offset_for_time(self.topic, p, self.client.clock() - ms)
        if fresh:
            await self.view.commit(self.group, self.topic, fresh)
            log.info("subscription to a Kafka topic starts", topic=self.topic, task=self.task_id,
                     offsets=fresh, since=str(since) if since else "the end")
        return starts | fresh

    async def _handle(self, p: int, recs: Sequence[Record]) -> None:
        work = []
        for r in recs:
            if not r.value:
                continue  # a tombstone: a key deleted, nothing happened
            try:
                data = self.subs[0].decode(r.value)
            except MalformedRecord as exc:
                work.append(self._quarantine(p, r, exc.reason))
                continue
            if any(self._matches(s, data) for s in self.subs):
                work.append(self._start(p, r, data))
        results = await asyncio.gather(*work, return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res

    def _matches(self, sub: KafkaTopic, data: Any) -> bool:
        try:
            return sub.matches(data)
        except Exception as exc:  # a broken predicate: no match for this one only
            log.error("subscription predicate raised; treated as no match", task=self.task_id,
                      topic=self.topic, error=f"{type(exc).__name__}: {exc}")
            return False

    async def _start(self, p: int, r: Record, data: Any) -> None:
        try:
            await self.client.trigger(
                self.task_id, data, idempotency_key=record_key(self.topic, p, r.offset), validate=False,
                tags=(f"topic:{self.topic}", f"record:{self.topic}/{p}/{r.offset}"),
            )
        except (PayloadTooLarge, PayloadValidationError) as exc:
            await self._quarantine(p, r, f"not started as a run: {exc}")
            return
        self.triggered += 1

    async def _quarantine(self, p: int, r: Record, reason: str) -> None:
        # Never block the partition on one bad record; keep it aside.
        log.error("record of a Kafka topic quarantined", topic=self.topic, partition=p, offset=r.offset,
                  task=self.task_id, reason=reason)
        value = r.value
        if len(value) > _QUARANTINE_MAX_BYTES:
            # Base64 in JSON grows a copy by a third: a record near the broker's
            # size limit could never be set aside whole, and would block the partition.
            value = value[:_QUARANTINE_MAX_BYTES]
            reason += (f" (the copy keeps the first {_QUARANTINE_MAX_BYTES} of {len(r.value)} bytes; "
                       "the record stays in its topic)")
        await quarantine(self.client.log, self.client.topics.quarantine, self.topic, p, r.offset, value,
                         reason, f"topic:{self.task_id}")
        self.quarantined += 1
